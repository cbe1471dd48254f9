"""Our numbers beside the paper's: ``python -m common.compare <summary.csv> [...]``.

For every published cell (paper_tables.csv) it prints the paper value, ours as mean ± sd over
seeds (sd only with two or more seeds) and the difference, grouped like the paper's tables.
Before any run exists it still prints every table, with ours shown as missing.
"""
from __future__ import annotations

import argparse
import math
import sys

import pandas as pd

from .errors import cli_main
from .paper import EXPERIMENT_ALIASES, TABLE_TITLES, paper_table
from .summary_file import read_summary


def comparison(summaries: list[pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per published cell: table, experiment, cycle, metric, paper, ours, sd, n, diff."""
    paper = paper_table()
    ours = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame(columns=["experiment", "cycle"])
    rows = []
    for cell in paper.itertuples(index=False):
        experiment = EXPERIMENT_ALIASES.get(cell.experiment, cell.experiment)
        values = pd.Series(dtype=float)
        if cell.metric in ours.columns:
            match = ours[(ours["experiment"] == experiment) & (ours["cycle"] == cell.cycle)]
            values = pd.to_numeric(match[cell.metric], errors="coerce").dropna()
        mean = float(values.mean()) if len(values) else math.nan
        sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows.append({"table": cell.table, "experiment": cell.experiment, "cycle": cell.cycle, "metric": cell.metric,
                     "paper": cell.value, "ours": mean, "sd": sd, "n": len(values), "diff": mean - cell.value,
                     "direction": cell.direction})
    return pd.DataFrame(rows)


def _fmt(value: float, digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metric_digits(metric: str) -> int:
    """Decimals a metric is printed with in the comparison tables."""
    return 2 if metric in ("acc", "probe", "l0", "chi") else 3


def render(table: pd.DataFrame) -> str:
    lines = []
    for number, block in table.groupby("table", sort=True):
        lines.append(f"\n{TABLE_TITLES.get(number, f'Table {number}')}")
        for experiment, rows in block.groupby("experiment", sort=False):
            lines.append(f"  {experiment}")
            lines.append(f"    {'k':>2}  {'metric':<20}{'paper':>10}  {'ours (mean ± sd)':>22}{'diff':>10}  n")
            for r in rows.itertuples(index=False):
                d = metric_digits(r.metric)
                ours = _fmt(r.ours, d) + ("" if math.isnan(r.sd) else f" ± {_fmt(r.sd, d)}")
                diff = "—" if math.isnan(r.diff) else f"{r.diff:+.{d}f}"
                arrow = {"up": "↑", "down": "↓"}.get(r.direction, "")
                lines.append(f"    {r.cycle:>2}  {r.metric + arrow:<20}{_fmt(r.paper, d):>10}  {ours:>22}{diff:>10}  {r.n}")
    return "\n".join(lines).lstrip("\n")


def render_markdown(table: pd.DataFrame) -> str:
    """One Markdown table per (paper table, experiment): rows = cycles, cells = "ours ± sd (paper)"."""
    lines = []
    for (number, experiment), block in table.groupby(["table", "experiment"], sort=False):
        metrics = list(dict.fromkeys(block["metric"]))
        lines += [f"**{TABLE_TITLES.get(number, number)} — {experiment}**", "",
                  "| k | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for cycle, rows in block.groupby("cycle"):
            cells = []
            for metric in metrics:
                r = rows[rows["metric"] == metric]
                if r.empty:
                    cells.append("")
                    continue
                r = r.iloc[0]
                d = metric_digits(metric)
                ours = _fmt(r.ours, d) + ("" if math.isnan(r.sd) else f" ± {_fmt(r.sd, d)}")
                cells.append(f"{ours} ({_fmt(r.paper, d)})")
            lines.append(f"| {cycle} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="*", help="summary.csv files of runs (any experiments, any seeds)")
    parser.add_argument("--csv", help="also write the comparison as CSV to this path")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables: ours ± sd (paper) per cycle")
    parser.add_argument("--experiment", action="append", help="only these experiments (repeatable)")
    args = parser.parse_args(argv)
    table = comparison([read_summary(path) for path in args.summaries])
    if args.experiment:
        table = table[table["experiment"].isin(args.experiment)]
    print(render_markdown(table) if args.markdown else render(table))
    if args.csv:
        from .io import atomic_path

        with atomic_path(args.csv) as tmp:
            table.to_csv(tmp, index=False)


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
