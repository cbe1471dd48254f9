"""SAE training throughput against the machine's measured matrix-multiply rate.

For the three SAE shapes of the paper (MNIST 16->256, CIFAR-10 1280->5120, ImageNet 1536->6144)
it times :func:`common.sae_training.sae_step` (forward, loss, backward, fused Adam, decoder
normalisation: exactly what ``train_sae`` runs per batch) at the batch size of the experiment's
config and at a large "throughput" batch, and divides the step's matrix-multiply FLOPs by the
best float32 (or bf16) GEMM rate measured in the same run.

FLOPs of one step, batch B, widths d_in and d_sae (each GEMM below is B x d_in x d_sae
multiply-adds = 2 B d_in d_sae FLOPs):
  forward   pre = x W_enc^T + b        (B x d_in) @ (d_in x d_sae)    1 GEMM
            x_hat = z W_dec^T + b      (B x d_sae) @ (d_sae x d_in)   1 GEMM
  backward  dL/dW_dec = g^T z                                         1 GEMM
            dL/dz = g W_dec                                           1 GEMM
            dL/dW_enc = g_pre^T x                                     1 GEMM
            (dL/dx is not computed: the activations need no gradient)
  total     10 B d_in d_sae FLOPs.
ReLU, the losses, Adam over the 2 d_in d_sae + d_in + d_sae parameters and the decoder
normalisation are memory-bound and counted as zero useful FLOPs, so "fraction of peak" is the
share of the machine's GEMM rate that the step turns into SAE training.

    python tests/benchmarks/bench_sae.py                          # CPU, float32
    python tests/benchmarks/bench_sae.py --device cuda --dtype bf16  # GPU, bf16 autocast
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from common.sae import SAEConfig, SparseAutoencoder
from common.sae_training import sae_step


@dataclass(frozen=True)
class Shape:
    name: str
    d_in: int
    d_sae: int
    l1_form: str
    decoder_norm: str
    batch: int            # the experiment's config
    threads: int | None   # MNIST's config runs one thread (a 16-wide SAE is all overhead); None = torch's default


SHAPES = (
    Shape("MNIST", 16, 256, "mean", "none", 64, 1),
    Shape("CIFAR-10", 1280, 5120, "sum", "rows", 64, None),
    Shape("ImageNet", 1536, 6144, "sum", "rows", 128, None),
)

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: str, sizes=(2048, 4096), repeats: int = 3) -> float:
    """Best FLOP/s of square matrix products: the machine's attainable GEMM peak. On a CPU in float32
    numpy's BLAS is timed too (it can beat torch's on some CPUs), so the peak is not understated."""
    best = 0.0
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch_dtype)
        b = torch.randn(n, n, device=device, dtype=torch_dtype)
        products = [lambda a=a, b=b: a @ b]
        if device.type == "cpu" and dtype == "fp32":
            an, bn = a.numpy(), b.numpy()
            products.append(lambda an=an, bn=bn: an @ bn)
        for product in products:
            product()
            sync(device)
            for _ in range(repeats):
                start = time.perf_counter()
                product()
                sync(device)
                best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def step_time(shape: Shape, batch: int, device: torch.device, dtype: str, seconds: float) -> float:
    """Median seconds per ``sae_step`` after warm-up, over at least ``seconds`` of steps."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(shape.d_in, shape.d_sae, 1e-3, shape.l1_form, shape.decoder_norm)).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)   # as train_sae
    x = torch.randn(batch, shape.d_in, device=device)
    for _ in range(2):
        sae_step(sae, optimizer, x, DTYPES[dtype])
    sync(device)
    times, total = [], 0.0
    while total < seconds or len(times) < 3:
        start = time.perf_counter()
        sae_step(sae, optimizer, x, DTYPES[dtype])   # returns float(loss): synchronises
        times.append(time.perf_counter() - start)
        total += times[-1]
    times.sort()
    return times[len(times) // 2]


def run(device: str = "cpu", dtype: str = "fp32", seconds: float = 2.0, big_batch: int | None = None,
        threads: int | None = None, shapes=SHAPES) -> list[dict]:
    dev = torch.device(device)
    big_batch = big_batch or (1024 if dev.type == "cpu" else 8192)
    default_threads = torch.get_num_threads()
    rows, peak = [], 0.0
    for shape in shapes:
        for batch in dict.fromkeys((shape.batch, big_batch)):
            # thread counts to try: the given one, MNIST's one thread, else one and all (on a CPU shared
            # with other processes one thread can be several times faster); the fastest is reported
            if threads:
                counts = [threads]
            elif shape.threads or dev.type != "cpu":
                counts = [shape.threads or default_threads]
            else:
                counts = sorted({1, default_threads})
            best = None
            for use in counts:
                torch.set_num_threads(default_threads)
                peak = max(peak, gemm_rate(dev, dtype))      # measured around every point, the best kept
                torch.set_num_threads(use)
                t = step_time(shape, batch, dev, dtype, seconds)
                best = (t, use) if best is None or t < best[0] else best
            t, use = best
            rows.append({"shape": f"{shape.name} {shape.d_in}->{shape.d_sae}", "batch": batch, "threads": use,
                         "config_batch": batch == shape.batch, "step_s": t, "samples_s": batch / t,
                         "gflops": 10 * batch * shape.d_in * shape.d_sae / t / 1e9})
    torch.set_num_threads(default_threads)
    peak = max(peak, gemm_rate(dev, dtype))
    for row in rows:
        row["peak_gflops"] = peak / 1e9
        row["fraction"] = row["gflops"] * 1e9 / peak
    return rows


def report(rows: list[dict], device: str, dtype: str) -> str:
    peak = rows[0]["peak_gflops"]
    lines = [(f"SAE training step (common.sae_training.sae_step, Adam fused) on {device}, {dtype}; "
              f"measured {dtype} GEMM peak {peak:,.0f} GFLOP/s (best square matmul, torch or numpy, all threads); "
              "step FLOPs = 10 * batch * d_in * d_sae"),
             f"{'shape':<22}{'batch':>7}{'threads':>8}{'ms/step':>10}{'samples/s':>12}{'GFLOP/s':>9}{'of peak':>9}"]
    for r in rows:
        tag = " (config)" if r["config_batch"] else ""
        lines.append(f"{r['shape']:<22}{r['batch']:>7}{r['threads']:>8}{1000 * r['step_s']:>10.2f}"
                     f"{r['samples_s']:>12,.0f}{r['gflops']:>9.1f}{r['fraction']:>9.0%}{tag}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16 = autocast (GPU)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per point")
    parser.add_argument("--batch", type=int, default=None, help="throughput batch (default 1024 CPU, 8192 GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every point (default: the faster of 1 and all, MNIST 1)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible")
    print(report(run(args.device, args.dtype, args.seconds, args.batch, args.threads), args.device, args.dtype))


if __name__ == "__main__":
    main()
