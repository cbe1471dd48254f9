"""A verdict for every claim of the paper: ``python -m common.claims <summary.csv> [...] [--markdown]``.

Each row of ``claims.csv`` is one claim as a paired comparison: a metric in a *baseline* arm
(experiment, cycle) and a *treatment* arm, e.g. ``acc`` of DIGIT-MNIST cycle 0 vs cycle 3, or of
the random-target ablation (experiment ``DIGIT-MNIST-random-targets``, cycle 1) vs sharpened
targets (``DIGIT-MNIST`` cycle 1). Δ = treatment − baseline, one per seed that has both arms
(common/stats.py). ``direction`` is what the paper claims of Δ: ``higher`` (Δ > 0), ``lower``
(Δ < 0; DBI, where lower is better, and "random targets gave higher monosemanticity") or
``changes`` (either sign). ``judged_on`` is ``direction`` when the claim is only about the sign
("improves", "outperformed") and ``size`` when it states a number ("+2.55 points", "doubles",
"0.28 to 0.31"); ``paper_effect`` is the paper's own Δ from its tables (one run each).

Summaries are grouped into *sources* by their ``preset`` column (faithful, corrected; files of the
same preset are pooled, e.g. one per experiment), or by file where there is none. Within a source:
n = paired seeds, mean Δ with its 95% Student-t interval [low, high], p = the exact two-sided
sign-flip p-value, Holm p = p adjusted over the family of every claim of that source that has
data (α = 0.05), and the 95% prediction interval of one new run's Δ ("paper in PI": is the paper's
single-run Δ a plausible draw of ours?).

Verdicts, in this order:

- **not run**: no seed has both arms (the experiment, or that cycle, is not in the summaries, or
  the metric is NaN there).
- **inconclusive** whenever n < 2 (no interval can be formed), whatever else holds.
- Direction claims (``judged_on = direction``):
  **supported** if Holm p < α and the whole interval lies on the claimed side of 0;
  **contradicted** if Holm p < α and the whole interval lies on the other side;
  for ``changes``, supported if Holm p < α and the interval excludes 0, and never contradicted (a
  difference that is not significant does not show that nothing changed);
  otherwise **inconclusive**.
- Size claims (``judged_on = size``): **contradicted** if the interval excludes the paper's Δ, on
  either side (the mean effect is not the stated number), or if the direction is contradicted as
  above; **supported** if the direction is supported as above and the interval contains the
  paper's Δ; otherwise **inconclusive**. The size check uses the unadjusted 95% interval: it
  compares with one fixed published number, not a search over the family.

The t interval and the sign-flip p can disagree near the edge (p < α with an interval touching
0): such a claim stays inconclusive. With 5 seeds p ≥ 0.0625, so nothing can be supported or
contradicted on direction; only a size can be contradicted.
"""
from __future__ import annotations

import argparse
import math
import sys
from importlib import resources
from pathlib import Path

import pandas as pd

from .compare import metric_digits
from .errors import cli_main, require
from .io import write_text
from .paper import EXPERIMENT_ALIASES, paper_table
from .results import read_summary
from .stats import LEVEL, compare_paired, holm, paired_differences

ALPHA = 0.05
DIRECTIONS = ("higher", "lower", "changes")
JUDGED_ON = ("direction", "size")
VERDICTS = ("supported", "contradicted", "inconclusive", "not run")
CLAIM_COLUMNS = ("claim_id", "baseline_experiment", "baseline_cycle", "treatment_experiment", "treatment_cycle",
                 "metric", "direction", "judged_on", "paper_effect", "where", "claim")


def load_claims(path=None) -> pd.DataFrame:
    """claims.csv (the packaged one by default), checked for its columns and allowed values."""
    if path is None:
        with resources.files("common").joinpath("claims.csv").open() as handle:
            frame = pd.read_csv(handle)
    else:
        require(Path(path).is_file(), f"claims file {path} not found")
        frame = pd.read_csv(path)
    missing = [c for c in CLAIM_COLUMNS if c not in frame.columns]
    require(not missing, f"claims file lacks column(s) {', '.join(missing)}")
    bad = frame[~frame["direction"].isin(DIRECTIONS) | ~frame["judged_on"].isin(JUDGED_ON)]
    require(bad.empty, f"claims {', '.join(bad['claim_id'])}: direction must be one of {', '.join(DIRECTIONS)} "
                       f"and judged_on one of {', '.join(JUDGED_ON)}")
    require(not frame["claim_id"].duplicated().any(), "claims file repeats a claim_id")
    return frame


def verdict(direction: str, judged_on: str, n: int, low: float, high: float, p_holm: float,
            paper_effect: float, alpha: float = ALPHA) -> str:
    """The rule of the module docstring for one claim."""
    if n == 0:
        return "not run"
    if n < 2 or math.isnan(low):
        return "inconclusive"
    significant = p_holm < alpha
    if direction == "changes":
        direction_verdict = "supported" if significant and (low > 0 or high < 0) else "inconclusive"
    else:
        above, below = low > 0, high < 0            # the whole interval on one side of 0
        claimed_side, other_side = (above, below) if direction == "higher" else (below, above)
        direction_verdict = ("supported" if significant and claimed_side else
                             "contradicted" if significant and other_side else "inconclusive")
    if judged_on == "direction":
        return direction_verdict
    if direction_verdict == "contradicted" or not (low <= paper_effect <= high):
        return "contradicted"
    return direction_verdict


def _sources(summaries: list[tuple[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """Rows pooled by preset (or by file, where a summary has no preset column)."""
    pooled: dict[str, list[pd.DataFrame]] = {}
    for path, frame in summaries:
        if "preset" in frame.columns and frame["preset"].notna().all():
            for preset, rows in frame.groupby("preset", sort=False):
                pooled.setdefault(str(preset), []).append(rows)
        else:
            pooled.setdefault(str(path), []).append(frame)
    sources = {}
    for name, frames in pooled.items():
        rows = pd.concat(frames, ignore_index=True)
        dup = rows[rows.duplicated(["experiment", "seed", "cycle"], keep=False)]
        require(dup.empty, f"summaries of {name} repeat experiment/seed/cycle "
                           f"{', '.join(f'{r.experiment}/{r.seed}/{r.cycle}' for r in dup.head(3).itertuples())}: "
                           f"pass each run once")
        sources[name] = rows
    return sources


def _arm(rows: pd.DataFrame, experiment: str, cycle: int, metric: str, source: str) -> pd.Series:
    arm = rows[(rows["experiment"] == experiment) & (rows["cycle"] == cycle)]
    if not arm.empty:
        require(metric in rows.columns, f"the {source} summary has {experiment} rows but no '{metric}' column: "
                                        f"it is not a summary.csv of this code (rerun its metrics stage)")
        return pd.Series(pd.to_numeric(arm[metric], errors="coerce").to_numpy(), index=arm["seed"].astype(int))
    return pd.Series(dtype=float)


def _paper_value(paper: pd.DataFrame, experiment: str, cycle: int, metric: str) -> float:
    names = paper["experiment"].map(lambda e: EXPERIMENT_ALIASES.get(e, e))
    cell = paper[(names == experiment) & (paper["cycle"] == cycle) & (paper["metric"] == metric)]
    return float(cell["value"].iloc[0]) if len(cell) else math.nan


def evaluate_claims(summaries: list[tuple[str, pd.DataFrame]], claims: pd.DataFrame | None = None,
                    alpha: float = ALPHA) -> pd.DataFrame:
    """One row per (source, claim): the paper's values, ours, Holm p within the source, and the verdict.

    ``summaries``: (name, summary frame) pairs. With none, every claim is listed once as not run.
    """
    claims = load_claims() if claims is None else claims
    paper = paper_table()
    sources = _sources(summaries) or {"": pd.DataFrame(columns=["experiment", "seed", "cycle"])}
    out = []
    for source, rows in sources.items():
        block = []
        for c in claims.itertuples(index=False):
            a = _arm(rows, c.baseline_experiment, int(c.baseline_cycle), c.metric, source)
            b = _arm(rows, c.treatment_experiment, int(c.treatment_cycle), c.metric, source)
            try:
                d = paired_differences(a, b)
            except ValueError as err:       # one seed twice in an arm
                require(False, f"{source}: claim {c.claim_id}: {err}")
            row = {"source": source, **c._asdict(),
                   "paper_baseline": _paper_value(paper, c.baseline_experiment, int(c.baseline_cycle), c.metric),
                   "paper_treatment": _paper_value(paper, c.treatment_experiment, int(c.treatment_cycle), c.metric),
                   "n": len(d), "mean": math.nan, "sd": math.nan, "low": math.nan, "high": math.nan, "p": math.nan,
                   "predict_low": math.nan, "predict_high": math.nan, "seeds": ""}
            if len(d):
                r = compare_paired(d)
                row.update(mean=r.mean, sd=r.sd, low=r.low, high=r.high, p=r.p, predict_low=r.predict_low,
                           predict_high=r.predict_high, seeds=" ".join(map(str, r.seeds)))
            block.append(row)
        frame = pd.DataFrame(block)
        frame["p_holm"] = holm(frame["p"].to_numpy())
        frame["paper_in_prediction"] = [
            (lo <= pe <= hi) if not (math.isnan(lo) or math.isnan(pe)) else None
            for lo, pe, hi in zip(frame["predict_low"], frame["paper_effect"], frame["predict_high"])]
        frame["verdict"] = [verdict(r.direction, r.judged_on, r.n, r.low, r.high, r.p_holm, r.paper_effect, alpha)
                            for r in frame.itertuples(index=False)]
        out.append(frame)
    return pd.concat(out, ignore_index=True)


# ----------------------------------------------------------------------------- rendering

def _num(value, digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _p(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.4f}" if value < 0.001 else f"{value:.3f}"


def _arms(r) -> str:
    if r.baseline_experiment == r.treatment_experiment:
        return f"{r.metric} k={r.baseline_cycle}→{r.treatment_cycle}"
    short = {"DIGIT-MNIST-random-targets": "random", "DIGIT-MNIST": "sharpened"}
    return (f"{r.metric} {short.get(r.baseline_experiment, r.baseline_experiment)} k={r.baseline_cycle}"
            f"→{short.get(r.treatment_experiment, r.treatment_experiment)} k={r.treatment_cycle}")


def _paper(r) -> str:
    d = metric_digits(r.metric)
    return f"{_num(r.paper_baseline, d)}→{_num(r.paper_treatment, d)} (Δ {_num(r.paper_effect, d, True)})"


def _ours(r) -> tuple[str, str]:
    d = metric_digits(r.metric)
    if r.n == 0:
        return "—", ""
    interval = "" if math.isnan(r.low) else f" [{_num(r.low, d, True)}, {_num(r.high, d, True)}]"
    prediction = "" if math.isnan(r.predict_low) else f"[{_num(r.predict_low, d, True)}, {_num(r.predict_high, d, True)}]"
    return f"{_num(r.mean, d, True)}{interval}", prediction


def _in_pi(r) -> str:
    return {True: "yes", False: "no"}.get(r.paper_in_prediction, "—")


def _header(source: str, block: pd.DataFrame) -> str:
    with_data = int((block["n"] > 0).sum())
    seeds = sorted({s for text in block["seeds"] for s in text.split()}, key=int)
    seed_text = f"seeds {seeds[0]}-{seeds[-1]} ({len(seeds)})" if seeds else "no data"
    return (f"{source or 'no summaries'}: {with_data} of {len(block)} claims with data, {seed_text}; Holm over "
            f"those {with_data}; α = {ALPHA}, {LEVEL:.0%} t intervals, exact sign-flip p")


def render(table: pd.DataFrame) -> str:
    lines = []
    for source, block in table.groupby("source", sort=False):
        lines += ["", _header(source, block),
                  f"  {'claim':<19}{'comparison':<34}{'paper':<28}{'n':>3}  {'ours: mean Δ [95% interval]':<34}"
                  f"{'p':>7}{'Holm p':>8}  {'95% PI of one run':<22}{'paper in PI':<12}verdict"]
        for r in block.itertuples(index=False):
            ours, prediction = _ours(r)
            lines.append(f"  {r.claim_id:<19}{_arms(r):<34}{_paper(r):<28}{r.n:>3}  {ours:<34}{_p(r.p):>7}"
                         f"{_p(r.p_holm):>8}  {prediction:<22}{_in_pi(r):<12}{r.verdict}")
        lines.append("  claims (" + "; ".join(DIRECTIONS) + " = what the paper says of Δ = treatment − baseline):")
        for r in block.drop_duplicates("claim").itertuples(index=False):
            ids = ", ".join(block.loc[block["claim"] == r.claim, "claim_id"])
            lines.append(f"    {ids}: {r.claim} [{r.where}]")
    return "\n".join(lines).lstrip("\n")


def render_markdown(table: pd.DataFrame) -> str:
    lines = []
    for source, block in table.groupby("source", sort=False):
        lines += [f"**{_header(source, block)}**", "",
                  "| claim | comparison (Δ) | paper | claimed | n | ours: mean Δ [95% CI] | p | Holm p | "
                  "paper Δ in 95% PI | verdict |", "|---" * 10 + "|"]
        for r in block.itertuples(index=False):
            ours, _ = _ours(r)
            claimed = r.direction + (" (size)" if r.judged_on == "size" else "")
            lines.append(f"| {r.claim_id} | {_arms(r)} | {_paper(r)} | {claimed} | {r.n} | {ours} | {_p(r.p)} | "
                         f"{_p(r.p_holm)} | {_in_pi(r)} | **{r.verdict}** |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="*", help="summary.csv files (any experiments, presets and seeds)")
    parser.add_argument("--markdown", action="store_true", help="one Markdown table per preset")
    parser.add_argument("--csv", help="also write the whole table (one row per preset and claim) to this path")
    args = parser.parse_args(argv)
    summaries = [(path, read_summary(path)) for path in args.summaries]
    table = evaluate_claims(summaries)
    if args.csv:
        write_text(args.csv, table.to_csv(index=False))
    print(render_markdown(table) if args.markdown else render(table))


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
