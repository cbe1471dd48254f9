"""Do the committed reference results reproduce here? ``python -m common.check_results DIGIT-MNIST``.

For every preset folder ``<experiment>/results/<preset>/`` (a ``summary.csv`` beside the resolved
``config.yaml`` it was made with) this reruns seed 42's cycle 0 — the train and metrics stages,
as ``run.sh`` starts them (one ``common.lane`` process, ``OMP_NUM_THREADS=1`` as in run.sh's two
lanes) — in a temporary run directory, and compares the new row with the committed one (seed 42,
cycle 0), metric by metric: ``identical`` at the six significant digits summary.csv keeps, or the
committed and new value and their difference.

The committed config is applied over today's preset: every key it records keeps its recorded
value; keys added to the code since take today's default and are listed; keys the code no longer
knows are listed and not applied. Then it prints the environment found here beside the one the
results recorded (``results/environment.json`` or ``results/<preset>/environment.json`` if present,
else versions, CPU and commit named in ``results/README.md``), and why a rerun can differ.
``--print-environment`` prints this machine's environment as JSON, to commit beside new results.

Options: ``--data-root`` (MNIST, default $SAE_CEPTION_DATA or ./data), ``--results DIR`` (default
``<experiment>/results``), ``--seed`` (default 42), ``--keep DIR`` (keep the rerun there).
Only DIGIT-MNIST can be rerun this way (minutes on a CPU); the large experiments need their GPUs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from .config import PRESETS, flatten, load_config, set_dotted
from .errors import UserError, cli_main, require
from .results import METRIC_COLUMNS, read_summary, write_summary
from .runs import cycle_dir, default_data_root, experiment_validator

CHECKED_EXPERIMENTS = ("DIGIT-MNIST",)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
THREADS_ENV = {"OMP_NUM_THREADS": "1"}      # run.sh --jobs 2 (its default) runs each lane with one OpenMP thread

WHY = """Why a rerun can differ from the committed row: every training step sums many floating-point
products, and the order of those sums decides their last bits. Another CPU (vector width, FMA), another
BLAS or kernel library (MKL, OpenBLAS, oneDNN) or version, another thread count (how partial sums are
split), or other PyTorch / NumPy / scikit-learn versions change that order; 20 epochs of training then
amplify the first differing bit into a different model, by up to about the seed-to-seed spread
(1-1.7 accuracy points). The metrics of one model are far less sensitive than training. A change of the
code since the results were made (a commit other than the recorded one) moves numbers too."""


# ----------------------------------------------------------------------------- environment

def environment() -> dict:
    """Versions, CPU, BLAS, threads and commit of this machine and checkout."""
    import numpy
    import scipy
    import sklearn
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "scikit-learn": sklearn.__version__, "scipy": scipy.__version__, "cpu": cpu_model(),
           "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
           "torch_threads": torch.get_num_threads()}
    shown = torch.__config__.show()
    for key, pattern in (("torch_blas", r"BLAS_INFO=(\w+)"), ("torch_cpu_capability", r"CPU capability usage: (\w+)")):
        found = re.search(pattern, shown)
        env[key] = found.group(1) if found else "unknown"
    try:
        blas = numpy.__config__.CONFIG["Build Dependencies"]["blas"]
        env["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except (AttributeError, KeyError, TypeError):
        env["numpy_blas"] = "unknown"
    env["commit"] = git_commit(Path(__file__).resolve().parents[1])
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


VERSION = r"v?(\d+(?:\.\d+)+(?:\+\w+)?)"      # 2.15, 1.9.1, 2.14.1+cu130 (not a sentence's full stop)
RECORDED_PATTERNS = {
    "torch": r"(?:PyTorch|torch)[ =]+" + VERSION,
    "numpy": r"(?:NumPy|numpy)[ =]+" + VERSION,
    "scikit-learn": r"scikit-learn[ =]+" + VERSION,
    "scipy": r"(?:SciPy|scipy)[ =]+" + VERSION,
    "python": r"Python[ =]+" + VERSION,
    "cpu": r"((?:AMD|Intel|Apple|ARM)[^,;()\n`|]*)",
    "commit": r"commit[ :=`]+([0-9a-f]{7,40})",
}


def recorded_environment(results: Path, preset: str) -> tuple[dict, str]:
    """What the results say they were made with, and where that was read."""
    for path in (results / preset / "environment.json", results / "environment.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text()), str(path)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} is not valid JSON ({err})") from None
    readme = results / "README.md"
    if not readme.is_file():
        return {}, "nothing (no environment.json or README.md)"
    text = readme.read_text()
    found = {}
    for key, pattern in RECORDED_PATTERNS.items():
        match = re.search(pattern, text)
        if match:
            found[key] = match.group(1).strip()
    return found, f"{readme} (versions named in its text)"


# ----------------------------------------------------------------------------- config and rerun

def resolve_committed_config(experiment_dir: Path, committed: dict) -> tuple[dict, list[str], list[str]]:
    """Today's preset with every committed value applied; (config, keys new since, keys not applied)."""
    preset = committed.get("preset")
    require(preset in PRESETS, f"committed config has preset {preset!r}; expected one of {', '.join(PRESETS)}")
    cfg = load_config(experiment_dir / "config.yaml", preset)
    today, recorded = flatten(cfg), flatten(committed)
    for key in sorted(set(today) & set(recorded)):
        set_dotted(cfg, key, recorded[key])
    new = [f"{k}={today[k]!r}" for k in sorted(set(today) - set(recorded))]
    unknown = [f"{k}={recorded[k]!r}" for k in sorted(set(recorded) - set(today))]
    return cfg, new, unknown


def committed_presets(results: Path, seed: int) -> list[tuple[str, dict, pd.Series]]:
    """(preset folder, committed config, committed row of seed/cycle 0) for each folder; checked up front."""
    require(results.is_dir(), f"results folder {results} not found")
    folders = sorted(p.parent for p in results.glob("*/summary.csv"))
    require(folders, f"no <preset>/summary.csv under {results}")
    found = []
    for folder in folders:
        config_path = folder / "config.yaml"
        require(config_path.is_file(), f"{folder} has a summary.csv but no config.yaml to rerun it with")
        try:
            committed = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{config_path} is not valid YAML: {err}") from None
        require(isinstance(committed, dict), f"{config_path} is not a resolved run config")
        summary = read_summary(folder / "summary.csv")
        experiment = committed.get("experiment")
        require(experiment in CHECKED_EXPERIMENTS, f"{config_path}: experiment {experiment!r} cannot be rerun here "
                                                   f"(only {', '.join(CHECKED_EXPERIMENTS)})")
        rows = summary[(summary["experiment"] == experiment) & (summary["seed"] == seed) & (summary["cycle"] == 0)]
        require(len(rows) == 1, f"{folder / 'summary.csv'} has {len(rows)} rows for {experiment} seed {seed} "
                                f"cycle 0; expected one")
        found.append((folder.name, committed, rows.iloc[0]))
    return found


def require_mnist(data_root: Path) -> None:
    raw = data_root / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]
    require(not missing, f"MNIST not found in {raw} (missing {', '.join(missing)}); pass --data-root, the folder "
                         f"that holds MNIST/raw")


def rerun_cycle0(experiment_dir: Path, cfg: dict, run_dir: Path, data_root: Path, seed: int) -> pd.Series:
    """Train and evaluate one seed's cycle 0 into ``run_dir``; the row its summary.csv gets."""
    from .config import freeze_run_config

    validate = experiment_validator(experiment_dir / "config.yaml")
    if validate is not None:
        validate(cfg)
    freeze_run_config(run_dir, cfg)
    common = ["--run-dir", str(run_dir), "--data-root", str(data_root), "--seed", str(seed), "--cycle", "0"]
    items = [shlex.join([str(experiment_dir / script), *common]) for script in ("train.py", "evaluate.py")]
    repo = experiment_dir.parent
    env = {**os.environ, **THREADS_ENV,
           "PYTHONPATH": os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "common.lane", "--", *items], cwd=repo, env=env)
    require(proc.returncode == 0, f"the rerun of seed {seed} cycle 0 in {run_dir} failed (exit {proc.returncode}); "
                                  f"its message is above")
    require((cycle_dir(run_dir, seed, 0) / "metrics.json").is_file(), f"the rerun wrote no metrics.json in {run_dir}")
    summary = read_summary(write_summary(run_dir))
    return summary.iloc[0]


# ----------------------------------------------------------------------------- comparison

def _value(row: pd.Series, metric: str) -> float | None:
    if metric not in row.index:
        return None
    value = pd.to_numeric(pd.Series([row[metric]]), errors="coerce").iloc[0]
    return float(value)


def compare_rows(committed: pd.Series, rerun: pd.Series, metrics=METRIC_COLUMNS) -> pd.DataFrame:
    """Per metric: committed, now, status ('identical', 'differs', 'only committed', 'only rerun')."""
    rows = []
    for metric in metrics:
        old, new = _value(committed, metric), _value(rerun, metric)
        if old is None and new is None:
            continue
        if old is None or new is None:
            status = "only committed" if new is None else "only rerun"
        elif (math.isnan(old) and math.isnan(new)) or old == new:
            status = "identical"
        else:
            status = "differs"
        rows.append({"metric": metric, "committed": old, "now": new, "status": status})
    return pd.DataFrame(rows, columns=["metric", "committed", "now", "status"])


def _fmt(value) -> str:
    return "—" if value is None else "NaN" if math.isnan(value) else f"{value:.6g}"


def render_comparison(preset: str, table: pd.DataFrame) -> list[str]:
    lines = [f"  {'metric':<22}{'committed':>12}{'now':>12}  result"]
    for r in table.itertuples(index=False):
        if r.status == "differs":
            delta = r.now - r.committed
            relative = f", {delta / abs(r.committed):+.2%}" if r.committed else ""
            result = f"differs by {delta:+.6g}{relative}"
        elif r.status == "only committed":
            result = "not written by the rerun (column renamed or removed since)"
        elif r.status == "only rerun":
            result = "not in the committed summary (column added since)"
        else:
            result = "identical"
        lines.append(f"  {r.metric:<22}{_fmt(r.committed):>12}{_fmt(r.now):>12}  {result}")
    differing = int(table["status"].ne("identical").sum())
    verdict = "identical" if differing == 0 else f"differs in {differing} of {len(table)} metrics"
    lines.append(f"  => {preset}: {verdict}")
    return lines


def _same(key: str, here, there) -> bool:
    """Recorded "2.15" matches found "2.15.0+cpu"; a CPU matches when one name contains the other."""
    here, there = str(here).strip(), str(there).strip()
    if key == "cpu":
        return here.lower() in there.lower() or there.lower() in here.lower()
    if key == "commit":
        return here.startswith(there) or there.startswith(here.split()[0])
    return here == there or here.startswith(there + ".") or here.startswith(there + "+")


def render_environment(found: dict, recorded: dict, source: str) -> list[str]:
    lines = [f"environment: found here, and recorded in {source}"]
    for key in ("commit", "python", "torch", "numpy", "scikit-learn", "scipy", "cpu", "cpu_count", "torch_blas",
                "torch_cpu_capability", "numpy_blas", "OMP_NUM_THREADS", "torch_threads"):
        here, there = found.get(key, "—"), recorded.get(key)
        note = "not recorded" if there is None else f"recorded {there}" + ("" if _same(key, here, there) else
                                                                             "  <- different")
        lines.append(f"  {key:<22}{str(here):<48}{note}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", help="experiment folder, e.g. DIGIT-MNIST")
    parser.add_argument("--data-root", default=None, help="folder holding MNIST/raw (default $SAE_CEPTION_DATA or ./data)")
    parser.add_argument("--results", default=None, help="committed results folder (default <experiment>/results)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep", default=None, help="keep the rerun in this (new or empty) folder")
    parser.add_argument("--print-environment", action="store_true", help="print this machine's environment as JSON")
    args = parser.parse_args(argv)
    if args.print_environment:
        print(json.dumps(environment(), indent=2))
        return
    require(args.experiment, "name the experiment folder, e.g. python -m common.check_results DIGIT-MNIST")
    experiment_dir = Path(args.experiment).resolve()
    require((experiment_dir / "config.yaml").is_file(), f"{args.experiment} is not an experiment folder (no config.yaml)")
    require(experiment_dir.name in CHECKED_EXPERIMENTS,
            f"only {', '.join(CHECKED_EXPERIMENTS)} can be rerun here; {experiment_dir.name} needs its GPUs")
    results = Path(args.results).resolve() if args.results else experiment_dir / "results"
    data_root = Path(args.data_root or default_data_root()).resolve()
    presets = committed_presets(results, args.seed)
    require_mnist(data_root)
    keep = Path(args.keep).resolve() if args.keep else None
    if keep is not None:
        require(not keep.exists() or (keep.is_dir() and not any(keep.iterdir())),
                f"--keep {keep} must be a new or empty folder")
    resolved = [(preset, *resolve_committed_config(experiment_dir, committed), row)
                for preset, committed, row in presets]

    found = environment()
    found["OMP_NUM_THREADS"] = THREADS_ENV["OMP_NUM_THREADS"] + " (set for the rerun, as run.sh's two lanes)"
    found["torch_threads"] = ", ".join(sorted({f"train.threads = {cfg['train']['threads']}" for _, cfg, *_ in resolved}))
    differs = False
    with tempfile.TemporaryDirectory(prefix="check-results-") as scratch:
        base = keep or Path(scratch)
        for preset, cfg, new_keys, unknown_keys, row in resolved:
            run_dir = base / preset
            print(f"== {preset}: rerunning seed {args.seed} cycle 0 with {results / preset / 'config.yaml'} "
                  f"into {run_dir}", flush=True)
            rerun = rerun_cycle0(experiment_dir, cfg, run_dir, data_root, args.seed)
            table = compare_rows(row, rerun)
            print(f"\n{preset}: seed {args.seed}, cycle 0, committed {results / preset / 'summary.csv'} vs rerun")
            if new_keys:
                print("  keys the committed config lacks (today's default used): " + ", ".join(new_keys))
            if unknown_keys:
                print("  committed keys the code no longer knows (not applied): " + ", ".join(unknown_keys))
            print("\n".join(render_comparison(preset, table)))
            differs |= bool(table["status"].ne("identical").any())
    recorded, source = recorded_environment(results, resolved[0][0])
    print("\n" + "\n".join(render_environment(found, recorded, source)))
    if differs:
        print("\n" + WHY)
    else:
        print("\nidentical: this machine, these libraries and this code reproduce the committed rows at the "
              "precision summary.csv keeps.")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
