"""The DIGIT-MNIST faithful preset for one seed against the authors' floating-point path, in one run.

    python DIGIT-MNIST/benchmark.py --data-root data [--jobs 2] [--references 2] [--keep DIR] [--key value ...]

Reference: one 20-epoch cycle-0 training (train.py in its own process) on the authors' path —
``train.adam plain`` (torch.optim.Adam's defaults), ``train.threads 0`` (torch's default thread
count, OMP_NUM_THREADS unset), ``train.step autograd``, no lanes. The authors' whole single-λ
MNIST pipeline took about 14.6 times one such training, stage by stage (issue 13), so the whole
``run.sh --preset faithful --seeds 1`` is 8x faster than theirs at <= 14.6 / 8 = 1.83 times the
reference (10x, the moonshot: <= 1.46). The reference runs before and after the preset (``--references``
of them in all, alternating), so both sides see the same machine; their mean is the reference.

Prints each stage's own time (from its .done marker: data loading and work, not the interpreter
start-up), the total wall time of run.sh, the reference's times and the ratio. Any ``--key value``
is a config override for both (e.g. ``--metrics.probe_backend fast``, ``--train.step manual``); the
reference then sets the authors' path on top.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AUTHORS_PATH = ["--train.adam", "plain", "--train.threads", "0", "--train.step", "autograd"]
AUTHORS_PIPELINE_FACTOR = 14.6      # the authors' pipeline / one 20-epoch training of theirs (issue 13)


def quiet_env(**extra) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def reference_training(data_root: str, run_dir: Path, overrides: list[str]) -> tuple[float, float]:
    """(process wall s, stage s) of one cycle-0 training on the authors' floating-point path (the
    overrides apply too, the authors' path settings after them)."""
    env = quiet_env()
    env.pop("OMP_NUM_THREADS", None)    # threads 0: torch's own default, as the authors ran
    subprocess.run([sys.executable, "-m", "common.runs", "--config", str(HERE / "config.yaml"), "--preset",
                    "faithful", "--out", str(run_dir), *overrides, "--cycles", "0", *AUTHORS_PATH], env=env, check=True,
                   capture_output=True, cwd=REPO)
    started = time.time()
    proc = subprocess.run([sys.executable, str(HERE / "train.py"), "--run-dir", str(run_dir), "--data-root", data_root,
                           "--cycle", "0"], env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"error: the reference training failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    marker = json.loads((run_dir / "seed_42" / "cycle_0" / "train.done").read_text())
    return wall, marker["seconds"]


def preset_run(data_root: str, out: Path, jobs: str, overrides: list[str]) -> tuple[float, list[tuple[str, float]]]:
    started = time.time()
    proc = subprocess.run(["bash", str(HERE / "run.sh"), "--preset", "faithful", "--seeds", "1", "--data-root",
                           data_root, "--out", str(out), "--jobs", jobs, *overrides], env=quiet_env(),
                          capture_output=True, text=True, cwd=REPO)
    total = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"error: run.sh failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    rows = [(f"{m.parent.name}/{m.stem}", json.loads(m.read_text()).get("seconds", float("nan")))
            for m in sorted(out.rglob("*.done"))]
    return total, rows


def machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} (default {torch.get_num_threads()} "
            f"threads); load average {load:.1f} at start")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("SAE_CEPTION_DATA", "./data"))
    parser.add_argument("--jobs", default="2")
    parser.add_argument("--references", type=int, default=2,
                        help="reference trainings, alternating before/after the preset run (default 2)")
    parser.add_argument("--keep", help="run directory of the preset run to write (default: a temporary one, deleted)")
    args, overrides = parser.parse_known_args(argv)
    if args.references < 1:
        sys.exit("error: --references must be >= 1")
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or Path(tmp) / "run")
        if out.exists():
            sys.exit(f"error: {out} exists; the benchmark needs a fresh directory")
        references = []
        before = (args.references + 1) // 2
        for i in range(before):
            references.append(reference_training(args.data_root, Path(tmp) / f"reference_{i}", overrides))
        total, rows = preset_run(args.data_root, out, args.jobs, overrides)
        for i in range(before, args.references):
            references.append(reference_training(args.data_root, Path(tmp) / f"reference_{i}", overrides))
    print(f"\n{'stage':<28}{'seconds':>9}")
    for name, seconds in rows:
        print(f"{name:<28}{seconds:>9.1f}")
    by_kind = {}
    for name, seconds in rows:
        by_kind[name.split("/")[1]] = by_kind.get(name.split("/")[1], 0.0) + seconds
    print(f"{'sum of stages':<28}{sum(s for _, s in rows):>9.1f}   (" +
          ", ".join(f"{kind} {s:.1f}" for kind, s in sorted(by_kind.items())) + ")")
    print(f"{'total wall (run.sh)':<28}{total:>9.1f}   --jobs {args.jobs}" +
          (f", overrides {' '.join(overrides)}" if overrides else ""))
    walls, stages = [w for w, _ in references], [s for _, s in references]
    ref = sum(walls) / len(walls)
    print(f"\nreference: one cycle-0 training on the authors' path ({' '.join(AUTHORS_PATH)}), its own process")
    print("  process wall s: " + ", ".join(f"{w:.1f}" for w in walls) + f"   mean {ref:.1f}")
    print("  of which the stage s: " + ", ".join(f"{s:.1f}" for s in stages))
    ratio = total / ref
    print(f"\nwhole faithful run / reference = {total:.1f} / {ref:.1f} = {ratio:.2f}   "
          f"(goal <= {AUTHORS_PIPELINE_FACTOR / 8:.2f} = 8x faster than the authors' pipeline, "
          f"moonshot <= {AUTHORS_PIPELINE_FACTOR / 10:.2f} = 10x)")
    print(f"speed-up over the authors' pipeline (14.6 x reference): {AUTHORS_PIPELINE_FACTOR / ratio:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
