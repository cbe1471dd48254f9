"""Result files: ``metrics.json`` per cycle and ``summary.csv`` per run (docs/conventions.md)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from .errors import UserError, require
from .io import atomic_path, read_json, write_json

from .summary_file import KEY_COLUMNS, METRIC_COLUMNS, read_summary  # noqa: F401  (read_summary: re-exported)


def write_metrics(path: str | os.PathLike, *, experiment: str, seed: int, cycle: int, metrics: dict,
                  **extra) -> None:
    """One cycle's metrics; every standard column must be present (NaN where undefined)."""
    missing = [c for c in METRIC_COLUMNS if c not in metrics]
    require(not missing, f"metrics for {experiment} cycle {cycle} lack {', '.join(missing)}")
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    write_json(path, {"experiment": experiment, "seed": int(seed), "cycle": int(cycle), **clean, **extra})


def collect(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every ``metrics.json`` under a run directory as one row."""
    rows = [read_json(p) for p in sorted(Path(run_dir).rglob("metrics.json"))]
    require(rows, f"no metrics.json under {run_dir}; run the metrics stage first")
    frame = pd.DataFrame(rows)
    scalar = [c for c in frame.columns if c in KEY_COLUMNS or c in METRIC_COLUMNS or
              frame[c].map(lambda v: isinstance(v, (int, float, str)) or v is None).all()]
    ordered = list(KEY_COLUMNS) + list(METRIC_COLUMNS) + sorted(set(scalar) - set(KEY_COLUMNS) - set(METRIC_COLUMNS))
    return frame[ordered].sort_values(list(KEY_COLUMNS)).reset_index(drop=True)


def write_summary(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / "summary.csv"
    frame = collect(run_dir)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return path


SUMMARY_ENV = "SAE_CEPTION_SUMMARY"


def notebook_summaries(experiment_dir: str | os.PathLike) -> list[Path]:
    """The ``summary.csv`` files an experiment's metrics notebook shows.

    ``$SAE_CEPTION_SUMMARY`` names them (summary.csv files or run directories, separated by
    ``os.pathsep``); otherwise the experiment's committed reference results
    (``results/summary.csv``, ``results/<preset>/summary.csv``), then its runs (``runs/*/summary.csv``).
    """
    experiment_dir = Path(experiment_dir)
    chosen = os.environ.get(SUMMARY_ENV)
    if chosen:
        paths = [Path(p) / "summary.csv" if Path(p).is_dir() else Path(p) for p in chosen.split(os.pathsep) if p]
        missing = [str(p) for p in paths if not p.is_file()]
        require(not missing, f"{SUMMARY_ENV} names {', '.join(missing)}, which does not exist")
        return paths
    for pattern in ("results/summary.csv", "results/*/summary.csv", "runs/*/summary.csv"):
        found = sorted(experiment_dir.glob(pattern))
        if found:
            return found
    raise UserError(f"no summary.csv under {experiment_dir}/results or {experiment_dir}/runs: run "
                    f"{experiment_dir.name}/run.sh first, or set {SUMMARY_ENV}=path/to/summary.csv")


def main(argv: list[str] | None = None) -> None:
    """``python -m common.results RUN_DIR``: write RUN_DIR/summary.csv and print the paper comparison."""
    import argparse

    from .compare import comparison, render

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    path = write_summary(args.run_dir)
    print(render(comparison([read_summary(path)]).query("n > 0")))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    import sys

    from .errors import cli_main

    cli_main(main, sys.argv[1:])
