"""``common.metrics.clustering_metrics`` and its five scores against scikit-learn, over a grid of shapes.

Cells: the three experiments' real shapes (MNIST 10k x 256, 10 classes, ~14% nonzero; CIFAR-10
10k x 5120, 10 classes, ~1% nonzero, L0 ~ 50; ImageNet 50k x 6144, 1000 classes, ~1.2% nonzero)
and a sweep over N, classes and density at d = 1024. Data: :func:`synthetic.sae_like_codes`
(float32, non-negative, class-structured). Ours gets the float32 tensor the pipeline has;
scikit-learn gets numpy copies (float32 and float64 for Davies-Bouldin / Calinski-Harabasz, the
faster counts; float64 for the silhouettes, which upcast float32 in chunks anyway).

Timing: the two sides alternate, ``--repeats`` times; the ratio is scikit-learn's best over ours'
best, and the spread is the range of the ratios of the single alternating pairs. ARI, DBI and
CHI are timed and compared at the full N. The silhouettes (scikit-learn's is O(N^2 d)) are timed
and compared at ``n_sil`` = min(N, a per-cell cap) points, both sides on the same points; the
"all five" column times ours at the full N (the best of ``--repeats`` calls) and takes scikit-learn's silhouettes at the full N as
(N / n_sil)^2 times their time at n_sil (marked "*" where that scaling was used). Every value
ours computes is compared with scikit-learn's on the same points (DBI and CHI with its float64
values): the table's last column is the largest relative difference in the cell.

    python tests/benchmarks/bench_metrics_grid.py                       # ~15 min on 2 idle cores, more if shared
    python tests/benchmarks/bench_metrics_grid.py --quick               # three small cells
    python tests/benchmarks/bench_metrics_grid.py --out tests/benchmarks/results/metrics_grid.txt
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from sklearn import metrics as skm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

from synthetic import sae_like_codes

from common import metrics

SCORES = ("ari", "sil_u", "sil_s", "dbi", "chi")

# (name, N, d, classes, fraction of nonzero entries, points for the silhouette comparison)
REAL = [("MNIST", 10_000, 256, 10, 0.14, 3_000),
        ("CIFAR-10", 10_000, 5120, 10, 0.01, 2_000),
        ("ImageNet", 50_000, 6144, 1000, 0.012, 2_000)]
SWEEP = [("sweep", n, 1024, k, rho, 2_000)
         for n in (2_000, 10_000, 50_000) for k in (10, 1000) for rho in (0.01, 0.10)]
QUICK = [("MNIST-small", 2_000, 256, 10, 0.14, 2_000), ("CIFAR-small", 2_000, 5120, 10, 0.01, 2_000),
         ("sweep-small", 2_000, 1024, 100, 0.03, 2_000)]


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def alternate(ours, theirs, repeats: int) -> tuple[float, float, float, float, float, object, object]:
    """(ours best s, theirs best s, ratio of bests, lowest and highest pair ratio, ours value, theirs value)."""
    t_ours, t_theirs, pairs = [], [], []
    v_ours = v_theirs = None
    for _ in range(repeats):
        start = time.perf_counter()
        v_ours = ours()
        a = time.perf_counter() - start
        start = time.perf_counter()
        v_theirs = theirs()
        b = time.perf_counter() - start
        t_ours.append(a)
        t_theirs.append(b)
        pairs.append(b / a)
    return min(t_ours), min(t_theirs), min(t_theirs) / min(t_ours), min(pairs), max(pairs), v_ours, v_theirs


def sklearn_best_dtype(fn, X32: np.ndarray, X64: np.ndarray, labels: np.ndarray):
    """scikit-learn's faster input dtype for ``fn``, chosen by one call on each (not timed in the ratio)."""
    times = {}
    for name, X in (("float32", X32), ("float64", X64)):
        start = time.perf_counter()
        fn(X, labels)
        times[name] = time.perf_counter() - start
    return X32 if times["float32"] <= times["float64"] else X64


def l0_for(density: float, d: int) -> int:
    """sae_like_codes' class features per example for a given fraction of nonzero entries (it adds a
    quarter as many noise entries, and 20% of the class features are off)."""
    return max(1, round(density * d / 1.05))


def run_cell(name, n, d, classes, density, n_sil, repeats, log) -> dict:
    X, y = sae_like_codes(n, d, classes, l0_for(density, d))
    pred = X.argmax(dim=1)
    X32 = X.numpy()
    X64 = X32.astype(np.float64)
    y_np, pred_np = y.numpy(), pred.numpy()
    n_sil = min(n_sil, n)
    nonzero = float((X != 0).double().mean())
    row = {"name": name, "n": n, "d": d, "classes": classes, "density": nonzero, "n_sil": n_sil,
           "clusters": int(pred.unique().numel()), "ratio": {}, "spread": {}, "ours_s": {}, "sk_s": {}, "rel": {}}
    log(f"{name}: N={n:,} d={d:,} classes={classes} nonzero {100 * nonzero:.2f}% (L0 {nonzero * d:.0f}), "
        f"{row['clusters']} argmax clusters, silhouettes compared at N={n_sil:,}")

    # DBI and CHI are timed on scikit-learn's faster input dtype, but compared with its float64
    # values (its float32 sums are off by ~1e-8 themselves)
    exact = {"dbi": skm.davies_bouldin_score(X64, y_np), "chi": skm.calinski_harabasz_score(X64, y_np)}

    def record(key, result):
        t_o, t_s, ratio, lo, hi, v_o, v_s = result
        row["ours_s"][key], row["sk_s"][key], row["ratio"][key], row["spread"][key] = t_o, t_s, ratio, (lo, hi)
        if v_s is not None:
            row["rel"][key] = rel(v_o, exact.get(key, v_s))
        log(f"  {key:<6} ours {t_o:8.3f}s  scikit-learn {t_s:8.3f}s  {ratio:6.2f}x (pairs {lo:.2f}-{hi:.2f})"
            + (f"  rel diff {row['rel'][key]:.1e}" if v_s is not None else ""))

    record("ari", alternate(lambda: metrics.adjusted_rand(y, pred), lambda: skm.adjusted_rand_score(y_np, pred_np),
                            repeats))
    Xs = sklearn_best_dtype(skm.davies_bouldin_score, X32, X64, y_np)
    record("dbi", alternate(lambda: metrics.davies_bouldin(X, y), lambda: skm.davies_bouldin_score(Xs, y_np), repeats))
    Xs = sklearn_best_dtype(skm.calinski_harabasz_score, X32, X64, y_np)
    record("chi", alternate(lambda: metrics.calinski_harabasz(X, y), lambda: skm.calinski_harabasz_score(Xs, y_np),
                            repeats))
    sil_repeats = max(1, min(repeats, 2))
    for key, labels in (("sil_s", y), ("sil_u", pred)):
        lab = labels[:n_sil]
        record(key, alternate(lambda: metrics.silhouette(X[:n_sil], lab),
                              lambda: skm.silhouette_score(X64[:n_sil], lab.numpy()), sil_repeats))
    # everything the metrics stage computes, ours at the full N: the best of ``repeats`` calls
    t_all = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        got = metrics.clustering_metrics(X, y)
        t_all = min(t_all, time.perf_counter() - start)
    scale = (n / n_sil) ** 2
    sk_all = sum(row["sk_s"][k] for k in ("ari", "dbi", "chi")) + scale * (row["sk_s"]["sil_s"] + row["sk_s"]["sil_u"])
    row["ours_s"]["all"], row["sk_s"]["all"], row["ratio"]["all"] = t_all, sk_all, sk_all / t_all
    row["scaled"] = n > n_sil
    want = {"ari": skm.adjusted_rand_score(y_np, pred_np), **exact}
    if n == n_sil:
        want["sil_s"] = skm.silhouette_score(X64, y_np)
        want["sil_u"] = skm.silhouette_score(X64, pred_np)
    row["rel"]["all"] = max(rel(got[k], v) for k, v in want.items())
    log(f"  all    ours {t_all:8.3f}s  scikit-learn {sk_all:8.3f}s{' (silhouettes x%.0f from N=%d)' % (scale, n_sil) if n > n_sil else ''}"
        f"  {sk_all / t_all:6.2f}x  rel diff of {', '.join(want)} {row['rel']['all']:.1e}")
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'cell':<10}{'N':>7}{'d':>6}{'K':>6}{'nz %':>6}{'clus':>6}{'N sil':>7}"
            + "".join(f"{k:>17}" for k in SCORES) + f"{'all five':>11}{'max rel':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r['ratio'][k]:>6.1f}x ({r['spread'][k][0]:.1f}-{r['spread'][k][1]:.1f})".rjust(17)
                        for k in SCORES)
        all_cell = f"{r['ratio']['all']:.1f}x" + ("*" if r["scaled"] else " ")
        lines.append(f"{r['name']:<10}{r['n']:>7,}{r['d']:>6}{r['classes']:>6}{100 * r['density']:>6.1f}"
                     f"{r['clusters']:>6}{r['n_sil']:>7,}{cells}{all_cell:>11}{max(r['rel'].values()):>9.0e}")
    worst = min(min(r["ratio"][k] for k in SCORES + ("all",)) for r in rows)
    lines += ["", f"lowest ratio in the grid: {worst:.2f}x; lowest 'all five': {min(r['ratio']['all'] for r in rows):.2f}x",
              "ratios: scikit-learn's best time / ours' best time (spread: lowest-highest ratio of single alternating pairs);",
              "ARI, DBI, CHI at the full N; Sil-U, Sil-S at 'N sil' points; 'all five': clustering_metrics at the full N,",
              "* = scikit-learn's silhouettes at the full N scaled as (N / N sil)^2 from their time at N sil;",
              "max rel: largest relative difference from scikit-learn of any value ours computed in the cell."]
    return "\n".join(lines)


def sweep_cell(spec: str) -> tuple:
    """``N,CLASSES,DENSITY`` (e.g. 2000,10,0.10) -> a sweep cell at d = 1024; argparse reports a bad one."""
    try:
        n, k, rho = spec.split(",")
        n, k, rho = int(n), int(k), float(rho)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{spec}' is not N,CLASSES,DENSITY (e.g. 2000,10,0.10)") from None
    if not (n >= 3 and 2 <= k < n and 0.0 < rho <= 1.0):
        raise argparse.ArgumentTypeError(f"'{spec}': want N >= 3, 2 <= CLASSES < N and 0 < DENSITY <= 1")
    return ("sweep", n, 1024, k, rho, 2_000)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="alternating pairs per score (silhouettes: at most 2)")
    p.add_argument("--quick", action="store_true", help="three cells at N = 2,000")
    p.add_argument("--only", default="", help="comma-separated cell names (MNIST, CIFAR-10, ImageNet, sweep)")
    p.add_argument("--cell", action="append", default=[], type=sweep_cell, metavar="N,CLASSES,DENSITY",
                   help="a sweep cell at d = 1024 instead of the grid (repeatable), e.g. 2000,10,0.10")
    p.add_argument("--out", default="", help="also write the log and the table to this file")
    args = p.parse_args(argv)
    cells = QUICK if args.quick else REAL + SWEEP
    if args.only:
        cells = [c for c in cells if c[0] in args.only.split(",")]
    if args.cell:
        cells = args.cell
    lines = []

    def log(line=""):
        print(line, flush=True)
        lines.append(line)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    log(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; load average at start {load[0]:.1f} (shared machine)" if load else f"CPU: {cpu_name()}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    for cell in cells:
        rows.append(run_cell(*cell, repeats=args.repeats, log=log))
    if load:
        log(f"load average at the end {os.getloadavg()[0]:.1f}")
    log("")
    log(table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
