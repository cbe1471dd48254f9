"""The MNIST linear probe: scikit-learn's ``LogisticRegression(max_iter=1000)`` (backend "sklearn",
the authors' code) against the same fit evaluated by ``common.probe_kernel`` (backend "fast"), on
the same codes in one run: the two are interleaved (the order alternates between repeats) and the
best of ``--repeats`` is kept for each. Prints wall and CPU seconds, their ratios, both test
accuracies, the largest coefficient difference and both iteration counts. CPU seconds are the
fairer figure on a machine shared with other processes.

    python tests/benchmarks/bench_probe.py --codes CODES.npz              # real codes (see below)
    python tests/benchmarks/bench_probe.py --run-dir RUN --data-root DATA --save-codes CODES.npz
    python tests/benchmarks/bench_probe.py --synthetic cifar              # 4000 + 1000 x 5120, 1% nonzero
    python tests/benchmarks/bench_probe.py --synthetic mnist              # 50000 + 10000 x 256, 14% nonzero

``--run-dir`` takes a DIGIT-MNIST run (``bash DIGIT-MNIST/run.sh --cycles 0 --out RUN``) and
encodes its seed/cycle's training and test images with the h1 SAE, as DIGIT-MNIST/evaluate.py does
(``--save-codes`` keeps them for later runs). BLAS, OpenMP and torch run on ``--threads`` threads
(default 1, as each lane of run.sh does).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from common.probes import fit_probe


def mnist_codes(run_dir: str, data_root: str, seed: int, cycle: int) -> dict[str, np.ndarray]:
    """The h1 SAE codes of a DIGIT-MNIST run's training and test images (as evaluate.py makes them)."""
    import yaml

    sys.path.insert(0, str(REPO / "DIGIT-MNIST"))
    from mnist import load_checkpoint, load_splits

    from common.runs import cycle_dir

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    model, saes = load_checkpoint(cycle_dir(Path(run_dir), seed, cycle), cfg, seed)
    splits = load_splits(data_root, cfg)
    layer = cfg["aux"]["layer"]
    out = {}
    with torch.no_grad():
        for split in ("train", "test"):
            x, y = splits[split]
            out[f"{split}_x"] = saes[layer].encode(model(x)[layer]).numpy()
            out[f"{split}_y"] = y.numpy()
    return out


def synthetic_codes(kind: str, label_noise: float = 0.25) -> dict[str, np.ndarray]:
    """SAE-like codes (tests/benchmarks/synthetic.py), 10 classes, with a share ``label_noise`` of
    labels redrawn at random so that the probe does not separate the classes in a few iterations."""
    from synthetic import sae_like_codes

    n_train, n_test, d, l0 = {"cifar": (4000, 1000, 5120, 51), "mnist": (50000, 10000, 256, 36)}[kind]
    x, y = sae_like_codes(n_train + n_test, d, 10, l0, seed=0)
    x, y = x.numpy(), y.numpy()
    rng = np.random.default_rng(0)
    noisy = rng.random(len(y)) < label_noise
    y[noisy] = rng.integers(0, 10, int(noisy.sum()))
    return {"train_x": x[:n_train], "train_y": y[:n_train], "test_x": x[n_train:], "test_y": y[n_train:]}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                "unknown CPU")


def timed_fit(codes: dict, backend: str, max_iter: int):
    wall, cpu = time.perf_counter(), time.process_time()
    probe = fit_probe(codes["train_x"], codes["train_y"], max_iter=max_iter, backend=backend)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    accuracy = 100.0 * float((probe.predict(codes["test_x"]) == codes["test_y"]).mean())
    return wall, cpu, accuracy, probe


def coef_difference(a, b) -> float:
    return max(float(np.abs(a.coef - b.coef).max()), float(np.abs(a.intercept - b.intercept).max()))


def run(codes: dict, max_iter: int = 1000, repeats: int = 2, float64_reference: bool = False,
        log=print) -> dict:
    x = codes["train_x"]
    warm = {key: value[:500] for key, value in codes.items()}
    for backend in ("sklearn", "fast"):  # imports and first-call costs, outside the timings
        timed_fit(warm, backend, 5)
    live = int(np.count_nonzero(np.count_nonzero(x, axis=0)))
    log(f"codes: train {x.shape} {x.dtype}, test {codes['test_x'].shape}, "
        f"{100 * np.count_nonzero(x) / x.size:.1f}% nonzero, {live} of {x.shape[1]} features ever nonzero, "
        f"{len(np.unique(codes['train_y']))} classes; max_iter {max_iter}")
    best = {"sklearn": [np.inf, np.inf], "fast": [np.inf, np.inf]}
    result = {}
    for repeat in range(repeats):
        for backend in (("sklearn", "fast") if repeat % 2 == 0 else ("fast", "sklearn")):
            wall, cpu, accuracy, probe = timed_fit(codes, backend, max_iter)
            best[backend] = [min(best[backend][0], wall), min(best[backend][1], cpu)]
            result[backend] = (accuracy, probe)
            log(f"  repeat {repeat + 1} {backend:7s}: {wall:7.2f} s wall, {cpu:7.2f} s CPU, "
                f"accuracy {accuracy:.2f}%, {probe.n_iter} iterations")
    (acc_s, sk), (acc_f, fast) = result["sklearn"], result["fast"]
    coef_diff = coef_difference(sk, fast)
    scale = max(float(np.abs(sk.coef).max()), float(np.abs(sk.intercept).max()))
    ratio_wall, ratio_cpu = best["sklearn"][0] / best["fast"][0], best["sklearn"][1] / best["fast"][1]
    for name, accuracy, probe in (("sklearn", acc_s, sk), ("fast", acc_f, fast)):
        log(f"{name:8s} best {best[name][0]:7.2f} s wall, {best[name][1]:7.2f} s CPU; "
            f"accuracy {accuracy:.2f}%, {probe.n_iter} iterations")
    log(f"speed-up {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x CPU; "
        f"accuracy difference {acc_f - acc_s:+.2f} points; max |coef difference| {coef_diff:.3g} "
        f"(largest |coef| {scale:.3g}, relative {coef_diff / scale:.3g})")
    if float64_reference:  # scikit-learn on float64 copies: every product and sum in float64
        codes64 = {key: (value.astype(np.float64) if key.endswith("_x") else value)
                   for key, value in codes.items()}
        wall, cpu, acc_r, ref = timed_fit(codes64, "sklearn", max_iter)
        log(f"float64 reference (scikit-learn on float64 codes, {wall:.1f} s): accuracy {acc_r:.2f}%, "
            f"{ref.n_iter} iterations; max |coef difference| to it: sklearn {coef_difference(sk, ref):.3g}, "
            f"fast {coef_difference(fast, ref):.3g}")
    return {"ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu, "accuracy_sklearn": acc_s,
            "accuracy_fast": acc_f, "coef_diff": coef_diff, "coef_scale": scale}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--codes", help="npz with train_x, train_y, test_x, test_y")
    source.add_argument("--run-dir", help="a DIGIT-MNIST run directory to encode the codes from")
    source.add_argument("--synthetic", choices=["cifar", "mnist"], help="SAE-like random codes of that shape")
    parser.add_argument("--data-root", default=os.environ.get("SAE_CEPTION_DATA", "./data"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cycle", type=int, default=0)
    parser.add_argument("--save-codes", help="with --run-dir: write the codes to this npz")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--float64-reference", action="store_true",
                        help="also fit scikit-learn on float64 copies and compare both fits with it")
    parser.add_argument("--out", help="also write the printed lines to this file")
    args = parser.parse_args(argv)
    lines = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    if args.codes:
        codes = dict(np.load(args.codes))
    elif args.run_dir:
        codes = mnist_codes(args.run_dir, args.data_root, args.seed, args.cycle)
        if args.save_codes:
            np.savez(args.save_codes, **codes)
    else:
        codes = synthetic_codes(args.synthetic)
    log(f"machine: {machine()}, {os.cpu_count()} logical CPUs, {args.threads} thread(s); "
        f"load average {os.getloadavg()[0]:.1f} at start (shared machine); "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        run(codes, max_iter=args.max_iter, repeats=args.repeats, float64_reference=args.float64_reference, log=log)
    log(f"load average {os.getloadavg()[0]:.1f} at end")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
