"""Exact clustering scores of ``common.metrics`` against scikit-learn, on SAE-like codes.

Data: :func:`synthetic.sae_like_codes`, float32, non-negative and sparse (L0 ~ 73 of d = 6144 by
default), 1000 classes, the shape of the ImageNet test set's SAE codes. Each score is timed on
the same data for both: ours gets the float32 tensor the pipeline has; scikit-learn gets the same
values as a numpy array, in float32 and in float64, and the faster of the two is the baseline.
Davies-Bouldin, Calinski-Harabasz and ARI are compared at the full N. scikit-learn's silhouette
is quadratic (N^2 d: 1.5e13 multiply-adds per call at N = 50k, d = 6144), so it is timed at
``--n-sklearn`` points (both sides on the same subsample) and, for the full-N total, extrapolated
as (N / n_sklearn)^2 times that; ``--sklearn-full`` measures it at N instead (slow).

    python tests/benchmarks/bench_metrics.py                   # N = 50,000, silhouettes at 10,000
    python tests/benchmarks/bench_metrics.py --quick
    python tests/benchmarks/bench_metrics.py --device cuda     # ours on the GPU
"""
from __future__ import annotations

import argparse
import os
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


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(best wall seconds over ``repeats`` calls, value)."""
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def sklearn_fastest(fn, X32: np.ndarray, *args, repeats: int = 1) -> tuple[float, float, str]:
    """scikit-learn on float32 and on float64 copies of the same values: (best time, float64 value, dtype)."""
    t32, _ = timed(lambda: fn(X32, *args), repeats)
    X64 = X32.astype(np.float64)
    t64, v64 = timed(lambda: fn(X64, *args), repeats)
    return (t32, v64, "float32") if t32 < t64 else (t64, v64, "float64")


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def run(n: int = 50_000, n_sklearn: int = 10_000, d: int = 6144, classes: int = 1000, l0: int = 70,
        device: str = "cpu", repeats: int = 3, sklearn_full: bool = False, log=print) -> list[dict]:
    X, y = sae_like_codes(n, d, classes, l0)
    pred = X.argmax(dim=1)
    log(f"data: N={n:,} d={d:,} classes={classes} L0={float((X > 0).sum(1).double().mean()):.1f} "
        f"({100 * float((X > 0).double().mean()):.2f}% nonzero), {pred.unique().numel():,} argmax clusters; "
        f"torch threads {torch.get_num_threads()}")
    Xd = X.to(device)
    X32 = X.numpy()
    y_np, pred_np = y.numpy(), pred.numpy()
    rows = []

    def add(name, N, ours_s, sk_s, sk_dtype, ours_v, sk_v, note=""):
        rows.append({"score": name, "n": N, "ours_s": ours_s, "sklearn_s": sk_s, "sklearn_dtype": sk_dtype,
                     "speedup": sk_s / ours_s, "rel_diff": rel(ours_v, sk_v) if sk_v is not None else None,
                     "note": note})
        r = rows[-1]
        diff = f"{r['rel_diff']:.1e}" if r["rel_diff"] is not None else "-"
        log(f"  {name:<30} N={N:>7,}  ours {ours_s:8.2f}s  scikit-learn {sk_s:8.2f}s ({sk_dtype}) "
            f" {r['speedup']:6.1f}x  rel diff {diff} {note}")

    m = min(n_sklearn, n)
    sil_sk = {}
    for name, labels in (("silhouette (true labels)", y_np), ("silhouette (argmax clusters)", pred_np)):
        t_ours, v_ours = timed(lambda labels=labels: metrics.silhouette(Xd[:m], labels[:m]))
        t_sk, v_sk, dt = sklearn_fastest(skm.silhouette_score, X32[:m], labels[:m])
        sil_sk[name] = t_sk
        add(name, m, t_ours, t_sk, dt, v_ours, v_sk)
    full = {}
    for name, ours, sk in (
            ("davies_bouldin", lambda: metrics.davies_bouldin(Xd, y), skm.davies_bouldin_score),
            ("calinski_harabasz", lambda: metrics.calinski_harabasz(Xd, y), skm.calinski_harabasz_score)):
        t_ours, v_ours = timed(ours, repeats)
        t_sk, v_sk, dt = sklearn_fastest(sk, X32, y_np, repeats=repeats)
        full[name] = (t_sk, v_sk)
        add(name, n, t_ours, t_sk, dt, v_ours, v_sk)
    t_ours, v_ours = timed(lambda: metrics.adjusted_rand(y, pred), repeats)
    t_sk, v_sk = timed(lambda: skm.adjusted_rand_score(y_np, pred_np), repeats)
    full["adjusted_rand"] = (t_sk, v_sk)
    add("adjusted_rand", n, t_ours, t_sk, "int64", v_ours, v_sk)

    # everything the metrics stage computes, at the full N
    t_ours, got = timed(lambda: metrics.clustering_metrics(X, y, device=device))
    sk_total = sum(t for t, _ in full.values())
    if sklearn_full and n > m:
        for name, labels in (("silhouette (true labels)", y_np), ("silhouette (argmax clusters)", pred_np)):
            t_sk, v_sk, dt = sklearn_fastest(skm.silhouette_score, X32, labels)
            sk_total += t_sk
            key = "sil_s" if "true" in name else "sil_u"
            log(f"  {name} at N={n:,}: scikit-learn {t_sk:.1f}s ({dt}), rel diff {rel(got[key], v_sk):.1e}")
        note = "scikit-learn measured at full N"
    else:
        sk_total += sum(sil_sk.values()) * (n / m) ** 2
        note = f"scikit-learn silhouettes extrapolated from N={m:,} x{(n / m) ** 2:.0f}" if n > m else ""
    add("clustering_metrics (all five)", n, t_ours, sk_total, "-", got["dbi"], full["davies_bouldin"][1], note)
    rows[-1]["rel_diff"] = max(rel(got["dbi"], full["davies_bouldin"][1]), rel(got["chi"], full["calinski_harabasz"][1]),
                               rel(got["ari"], full["adjusted_rand"][1]))
    return rows


def report(rows: list[dict]) -> str:
    lines = [f"{'score':<31}{'N':>8}{'ours s':>10}{'sklearn s':>11}{'speed-up':>10}{'max rel diff':>14}  note",
             "-" * 100]
    for r in rows:
        diff = f"{r['rel_diff']:.1e}" if r["rel_diff"] is not None else "-"
        lines.append(f"{r['score']:<31}{r['n']:>8,}{r['ours_s']:>10.2f}{r['sklearn_s']:>11.2f}"
                     f"{r['speedup']:>9.1f}x{diff:>14}  {r['note']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="examples (ImageNet test set: 50,000)")
    p.add_argument("--n-sklearn", type=int, default=10_000, help="subsample for timing the silhouettes")
    p.add_argument("--d", type=int, default=6144, help="SAE width")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--l0", type=int, default=70, help="class features per example (L0 ends near l0 + l0/4 - overlap)")
    p.add_argument("--device", default="cpu", help="where ours runs (cpu or cuda)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs for the cheap scores")
    p.add_argument("--sklearn-full", action="store_true", help="time scikit-learn's silhouettes at full N (slow)")
    p.add_argument("--quick", action="store_true", help="N=10,000, silhouettes at 3,000, one repeat")
    return p


def args_for_run(args) -> dict:
    if args.quick:
        args.n, args.n_sklearn, args.repeats = min(args.n, 10_000), min(args.n_sklearn, 3_000), 1
    return {"n": args.n, "n_sklearn": args.n_sklearn, "d": args.d, "classes": args.classes, "l0": args.l0,
            "device": args.device, "repeats": args.repeats, "sklearn_full": args.sklearn_full}


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible")
    print(report(run(**args_for_run(args))))


if __name__ == "__main__":
    main()
