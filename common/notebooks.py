"""The metrics notebooks: how they find the repository, and executing them with their outputs saved.

The three ``metrics.ipynb`` are committed executed on the committed results (tables and figures
visible without running anything). After the results or the notebook code change, refresh them with

    python -m common.notebooks execute DIGIT-MNIST/metrics.ipynb CIFAR-10/metrics.ipynb ImageNet1K/metrics.ipynb

(tests/test_notebooks.py executes them again and fails when the committed text outputs are stale).
Each notebook picks its input with :func:`common.results.notebook_summaries`.

Their SAE pictures need a few small files of each cycle directory beside a summary. When committing
a run's ``summary.csv`` as reference results, keep them for one seed with

    python -m common.notebooks keep RUN_DIR RESULTS_DIR [--seed 42]

(DIGIT-MNIST: ~100 KB per cycle, most of it the MLP and h1-SAE checkpoints for the decoder images).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError, cli_main, require

REPO = Path(__file__).resolve().parents[1]
# per cycle directory, what the notebooks' pictures read: densities, top features, histories, the
# cycle's metrics, and (DIGIT-MNIST) the MLP and h1 SAE for the decoder-direction images
PICTURE_INPUTS = ("metrics.json", "feature_density.json", "top_features.json", "sharpen.json", "train.json",
                  "adapt.json", "sae_train.json", "mlp.safetensors", "mlp.json", "sae_h1.safetensors", "sae_h1.json")
FIGURE_DPI = 60   # committed outputs stay small (a 12 x 3 inch figure is ~720 x 180 px)


def shown_path(path: str | os.PathLike) -> str:
    """A path as the notebooks print it: relative to the repository when inside it (the committed
    outputs do not depend on where the clone lives), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def side_by_side(table, number: int):
    """One paper table from :func:`common.compare.comparison` rows: rows = cycle; per metric the paper's
    value, ours (mean ± sd over seeds) and the difference."""
    import pandas as pd

    block = table[table["table"] == number]
    rows = {}
    for r in block.itertuples(index=False):
        digits = 2 if r.metric in ("acc", "probe", "l0", "chi") else 3
        ours = "—" if pd.isna(r.ours) else f"{r.ours:.{digits}f}" + ("" if pd.isna(r.sd) else f" ± {r.sd:.{digits}f}")
        row = rows.setdefault(r.cycle, {})
        row[(r.metric, "paper")] = f"{r.paper:.{digits}f}"
        row[(r.metric, "ours")] = ours
        row[(r.metric, "diff")] = "—" if pd.isna(r.diff) else f"{r.diff:+.{digits}f}"
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    frame.index.name = "cycle k"
    return frame.sort_index()


def plot_paper_vs_ours(table, experiment: str):
    """Each published metric across cycles: the paper (dashed) and ours (mean ± sd over seeds, when
    there are results), from :func:`common.compare.comparison` rows."""
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(table["metric"]))
    ncols = 4
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.6 * nrows), squeeze=False, constrained_layout=True)
    for ax, metric in zip(axes.flat, metrics):
        cells = table[table["metric"] == metric].sort_values("cycle")
        ax.plot(cells["cycle"], cells["paper"], "o--", color="gray", label="paper")
        ours = cells.dropna(subset=["ours"])
        if len(ours):
            ax.errorbar(ours["cycle"], ours["ours"], yerr=ours["sd"].fillna(0), fmt="o-", capsize=3, label="ours")
        arrow = {"up": " (higher is better)", "down": " (lower is better)"}.get(cells["direction"].iloc[0], "")
        ax.set_title(metric + arrow)
        ax.set_xlabel("cycle k")
        ax.set_xticks(sorted(table["cycle"].unique()))
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle(f"{experiment}: SAE-ception cycles, ours vs paper")
    return fig


def execute(path: str | os.PathLike, summary: str | None = None, timeout: int = 600):
    """Execute a notebook in its own folder (as Jupyter would) and return it with its outputs;
    ``summary`` sets ``SAE_CEPTION_SUMMARY`` for the kernel (None: the notebook's default input)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from .results import SUMMARY_ENV

    path = Path(path)
    require(path.is_file(), f"notebook {path} not found")
    nb = nbformat.read(path, as_version=4)
    saved = os.environ.get(SUMMARY_ENV)
    os.environ.pop(SUMMARY_ENV, None)
    if summary is not None:
        os.environ[SUMMARY_ENV] = summary
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    except CellExecutionError as err:
        raise UserError(f"{path}: a cell failed ({err.ename}: {err.evalue})") from None
    finally:
        os.environ.pop(SUMMARY_ENV, None)
        if saved is not None:
            os.environ[SUMMARY_ENV] = saved
    return nb


def text_outputs(nb) -> list[str]:
    """Per code cell, its printed text and plain-text results (what a reader sees, figures aside)."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(out.get("text", ""))
            elif "data" in out and "image/png" not in out["data"]:
                parts.append(str(out["data"].get("text/plain", "")))
        cells.append("".join(parts))
    return cells


def keep_picture_inputs(run_dir: str | os.PathLike, dest: str | os.PathLike, seed: int | None = None) -> list[Path]:
    """Copy :data:`PICTURE_INPUTS` of one seed's cycle directories (default: the smallest seed) from a
    run directory to ``dest`` (e.g. ``DIGIT-MNIST/results/faithful``), keeping the layout."""
    import shutil

    run_dir, dest = Path(run_dir), Path(dest)
    seeds = sorted(int(p.name[len("seed_"):]) for p in run_dir.glob("seed_*") if p.name[len("seed_"):].isdigit())
    require(seeds, f"no seed_<s> directories in {run_dir}")
    seed = seeds[0] if seed is None else seed
    require(seed in seeds, f"{run_dir} has no seed_{seed} (seeds: {', '.join(map(str, seeds))})")
    copied = []
    for cycle_dir in sorted((run_dir / f"seed_{seed}").glob("cycle_*")):
        for name in PICTURE_INPUTS:
            if (cycle_dir / name).is_file():
                target = dest / cycle_dir.relative_to(run_dir) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cycle_dir / name, target)
                copied.append(target)
    return copied


def main(argv: list[str] | None = None) -> None:
    import nbformat

    parser = argparse.ArgumentParser(description="Execute notebooks in place, saving their outputs; or keep a "
                                                 "run's picture inputs beside its committed summary.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("execute", help="execute notebooks in place, saving their outputs")
    run.add_argument("notebooks", nargs="+")
    keep = sub.add_parser("keep", help="copy one seed's small per-cycle files from a run directory to a results folder")
    keep.add_argument("run_dir")
    keep.add_argument("dest")
    keep.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    if args.command == "keep":
        copied = keep_picture_inputs(args.run_dir, args.dest, args.seed)
        print(f"copied {len(copied)} files ({sum(p.stat().st_size for p in copied) / 1024:.0f} KB) to {args.dest}")
        return
    for path in args.notebooks:
        experiment = Path(path).resolve().parent
        if not list(experiment.glob("results/**/summary.csv")) and list(experiment.glob("runs/*/summary.csv")):
            print(f"warning: {path} reads {experiment.name}/runs/ (no committed results there); commit its outputs "
                  f"only from a clone without runs/", file=sys.stderr)
        nb = execute(path)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        require(not errors, f"{path}: a cell failed ({errors[0].get('ename') if errors else ''})")
        nbformat.write(nb, path)
        print(f"executed {path} ({Path(path).stat().st_size / 1024:.0f} KB with its outputs)")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
