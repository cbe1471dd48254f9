"""Benchmark (not a test): stream SAE training over an ImageNet-sized activation cache.

Writes (once) a synthetic cache of ``--rows`` x ``--dim`` float16 activations in the chunked
format of :mod:`common.activation_cache` (1.28M x 1536 by default, the size of ImageNet's train
split at ``head.flatten``: 3.9 GB on disk), then

1. streams the whole cache once, shuffled (chunk order + a window of chunks), and reports rows/s;
2. trains the ImageNet SAE (1536 -> 6144, 'sum' L1, Adam 1e-4, batch 128) from the shuffled stream
   for ``--max-steps`` steps (0 = a full epoch) and reports rows/s;
3. prints the peak resident memory of the process (the goal is <= 4 GB at any dataset size).

    python ImageNet1K/benchmark_sae_stream.py --cache /tmp/sae_stream_cache --max-steps 300
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.activation_cache import ActivationCache, CacheWriter, cache_complete
from common.errors import cli_main, require
from common.sae import SAEConfig, SparseAutoencoder
from common.sae_training import sae_step
from common.seed import pick_device


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # ru_maxrss is in KiB on Linux


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def write_synthetic_cache(path: Path, rows: int, dim: int, chunk_rows: int, n_classes: int = 1000) -> None:
    """Class-structured activations: a class direction plus noise, written chunk by chunk."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_classes, dim)).astype(np.float32)
    writer = CacheWriter(path, dim, chunk_rows=chunk_rows, resume=False)
    for start in tqdm(range(0, rows, chunk_rows), desc="writing synthetic cache"):
        n = min(chunk_rows, rows - start)
        labels = rng.integers(0, n_classes, size=n)
        x = centres[labels] + rng.standard_normal((n, dim), dtype=np.float32)
        writer.append(x, labels, np.arange(start, start + n))
    writer.finish()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="/tmp/sae_stream_cache", help="cache folder (written if missing)")
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--d-sae", type=int, default=6144)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--window", type=int, default=4, help="chunks shuffled together")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=300, help="SAE steps to time (0 = one full epoch)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    require(args.rows > 0 and args.dim > 0 and args.d_sae > 0, "rows, dim and d-sae must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cache_dir = Path(args.cache)
    if not cache_complete(cache_dir):
        started = time.perf_counter()
        write_synthetic_cache(cache_dir, args.rows, args.dim, args.chunk_rows)
        print(f"wrote {args.rows:,} x {args.dim} float16 in {time.perf_counter() - started:.0f} s")
    cache = ActivationCache(cache_dir, window=args.window)
    require(len(cache) == args.rows and cache.dim == args.dim,
            f"{cache_dir} holds {len(cache):,} x {cache.dim}, not {args.rows:,} x {args.dim}; use another --cache")
    size_gb = sum(p.stat().st_size for p in cache_dir.glob("chunk_*.npy")) / 1024 ** 3
    print(f"cache {cache_dir}: {len(cache):,} rows x {cache.dim} ({cache.dtype}), {cache.n_chunks} chunks, "
          f"{size_gb:.2f} GB on disk; window {args.window} chunks")
    print(f"resident memory after opening the cache: {current_rss_gb():.2f} GB")

    started, rows = time.perf_counter(), 0
    for batch in tqdm(cache.iter_batches(args.batch_size, shuffle=True, seed=0),
                      total=-(-len(cache) // args.batch_size), desc="stream only"):
        rows += batch.x.shape[0]
    seconds = time.perf_counter() - started
    print(f"stream only (shuffled, float32 batches of {args.batch_size}): {rows:,} rows in {seconds:.1f} s = "
          f"{rows / seconds:,.0f} rows/s; peak RSS so far {peak_rss_gb():.2f} GB")

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=args.dim, d_sae=args.d_sae, l1_coeff=5e-4, l1_form="sum",
                                      decoder_norm="rows")).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    amp = torch.float16 if device.type == "cuda" else None
    steps_total = -(-len(cache) // args.batch_size)
    steps = steps_total if args.max_steps <= 0 else min(args.max_steps, steps_total)
    batches = cache.iter_batches(args.batch_size, shuffle=True, seed=1)
    loss = float("nan")
    warmup = 5
    for step, batch in enumerate(tqdm(batches, total=steps + warmup, desc="SAE training")):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, rows = time.perf_counter(), 0
        loss = sae_step(sae, optimizer, batch.x.to(device, non_blocking=True), amp)
        if step >= warmup:
            rows += batch.x.shape[0]
        if step + 1 >= steps + warmup:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"SAE {args.dim}->{args.d_sae} training on {device} ({torch.get_num_threads()} threads): {rows:,} rows "
          f"({rows // args.batch_size} steps) in {seconds:.1f} s = {rows / seconds:,.0f} rows/s "
          f"({seconds / max(rows // args.batch_size, 1) * 1e3:.1f} ms/step); last loss {loss:.4f}; "
          f"a full epoch would take {steps_total * seconds / max(rows // args.batch_size, 1) / 60:.1f} min")
    peak = peak_rss_gb()
    print(f"peak resident memory (RSS): {peak:.2f} GB (goal <= 4 GB; the cache is {size_gb:.2f} GB) -> "
          f"{'OK' if peak <= 4 else 'ABOVE GOAL'}")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
