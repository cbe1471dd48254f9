"""Where Davies-Bouldin's and Calinski-Harabasz's time goes, part by part, on SAE-like codes.

Times (best of ``--repeats``) the pieces of ``common.metrics.davies_bouldin`` at ImageNet size next to
what the machine allows for them: one read of the input (memory bandwidth), the nonzero scan that
stores each entry's class key, the class sums, the distances to the centroids, the float32 Gram
matrix of the centroids, and the cost of first touches of fresh memory (page faults).

    python tests/benchmarks/bench_metrics_parts.py            # N = 50,000, d = 6,144, 1000 classes
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

from bench_metrics import timed as best
from synthetic import sae_like_codes

from common import metrics
from common import metrics_kernels as M


def run(n: int, d: int, classes: int, repeats: int, log=print) -> None:
    X, y = sae_like_codes(n, d, classes)
    threads = torch.get_num_threads()
    codes, counts = M._encode(y)
    gb = X.numel() * X.element_size() / 1e9
    rows = []

    def add(name, seconds, note=""):
        rows.append((name, seconds, note))
        log(f"  {name:<40}{1000 * seconds:9.1f} ms  {note}")

    log(f"N={n:,} d={d:,} classes={classes}, {gb:.2f} GB float32 input, torch threads {threads}")
    t, _ = best(lambda: X.sum(), repeats)
    add("read the input once (X.sum)", t, f"{gb / t:.0f} GB/s")
    with M._one_thread():
        t, scan = best(lambda: M._scan_sparse(X, M._SPARSE_MAX_DENSITY, threads, codes), repeats)
    add("nonzero scan with class keys", t, f"{scan.values.numel():,} entries")
    P = M._Points(n, d, torch.device("cpu"), crow=scan.crow, val=scan.values, keys=scan.col, keyed_codes=codes)
    t, sums = best(lambda: P.class_sums(codes, classes), repeats)
    add("class sums (numpy bincount)", t)
    centroids = sums / counts.double().unsqueeze(1)
    csq = (centroids * centroids).sum(dim=1)
    t, _ = best(lambda: P.sq_dist_to(centroids, codes, counts, P.keys, csq), repeats)
    add("distances to the centroids", t)
    unit = centroids.float()
    t, _ = best(lambda: M._gram(unit), repeats)
    share = 10 / 16 if classes >= 512 else 1.0      # _gram's blocks start at 512 classes
    add("float32 Gram matrix (_gram)", t, f"{2 * classes * classes * d * share / t / 1e9:.0f} GFLOP/s executed "
        f"({share:.3g} of the full product's)")
    t, _ = best(lambda: unit @ unit.T, repeats)
    add("float32 Gram matrix, full product", t, f"{2 * classes * classes * d / t / 1e9:.0f} GFLOP/s")
    size = classes * d
    fresh, _ = best(lambda: torch.empty(size, dtype=torch.float64).fill_(0.0), repeats)
    kept = torch.empty(size, dtype=torch.float64)
    reused, _ = best(lambda: kept.fill_(0.0), repeats)
    add(f"fresh {size * 8 / 1e6:.0f} MB float64, filled", fresh,
        f"vs {1000 * reused:.1f} ms refilling kept memory: {(fresh - reused) / (size * 8 / 4096) * 1e6:.2f} us "
        "per 4 KB page")
    t, _ = best(lambda: metrics.davies_bouldin(X, y), repeats)
    add("davies_bouldin, whole", t)
    t, _ = best(lambda: metrics.calinski_harabasz(X, y), repeats)
    add("calinski_harabasz, whole", t)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=6144)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.n, args.d, args.classes, args.repeats)


if __name__ == "__main__":
    main()
