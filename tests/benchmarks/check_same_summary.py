"""Restructuring changes no number: three short runs give the same summary.csv, to the last digit,
as the saved copies in tests/benchmarks/same_summary/.

    python tests/benchmarks/check_same_summary.py [--out DIR] [--only cifar,imagenet,mnist]
    python tests/benchmarks/check_same_summary.py --save      # after a change that is meant to move numbers

Runs ``bash CIFAR-10/run.sh --smoke --preset corrected``, ``bash ImageNet1K/run.sh --smoke --preset
corrected`` and a short DIGIT-MNIST run (faithful, ``--train.epochs 2``, one cycle, on generated
MNIST files from tests/conftest.py), each into a fresh folder under ``--out``, and compares each
summary.csv with its saved copy as text (every digit, every column). Prints one line per run and
exits 1 on a difference. On a 2-core CPU the three take a few minutes.
"""
from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAVED = Path(__file__).resolve().parent / "same_summary"
MNIST_ARGS = ["--train.epochs", "2", "--cycles", "1", "--data.val_size", "100", "--sae.d_sae", "32",
              "--sharpen.top_k", "4", "--metrics.recon_top_k", "4", "--metrics.probe_max_iter", "50",
              "--jobs", "1"]


def _fake_mnist(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_fake_mnist

    return write_fake_mnist(root)


def commands(work: Path) -> dict[str, list[str]]:
    return {
        "cifar": ["bash", "CIFAR-10/run.sh", "--smoke", "--preset", "corrected", "--out", str(work / "cifar")],
        "imagenet": ["bash", "ImageNet1K/run.sh", "--smoke", "--preset", "corrected", "--out", str(work / "imagenet")],
        "mnist": ["bash", "DIGIT-MNIST/run.sh", "--data-root", str(work / "mnist-data"), "--out", str(work / "mnist"),
                  *MNIST_ARGS],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one, deleted after)")
    parser.add_argument("--only", default="cifar,imagenet,mnist")
    parser.add_argument("--save", action="store_true", help="store the summaries as the new reference copies")
    args = parser.parse_args()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="same-summary-"))
    env = {**os.environ, "PYTHON": sys.executable, "TQDM_DISABLE": "1", "SAE_CEPTION_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    failed = False
    for name, cmd in commands(work).items():
        if name not in args.only.split(","):
            continue
        shutil.rmtree(work / name, ignore_errors=True)
        if name == "mnist" and not (work / "mnist-data").is_dir():
            _fake_mnist(work / "mnist-data")
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            print(f"{name}: run failed ({proc.returncode}) after {seconds:.0f} s\n{proc.stderr[-2000:]}")
            failed = True
            continue
        got = (work / name / "summary.csv").read_text()
        saved = SAVED / f"{name}.csv"
        if args.save:
            SAVED.mkdir(exist_ok=True)
            saved.write_text(got)
            print(f"{name}: saved {saved.relative_to(REPO)} ({seconds:.0f} s)")
            continue
        if got == saved.read_text():
            print(f"{name}: same summary.csv as {saved.relative_to(REPO)} ({seconds:.0f} s)")
        else:
            failed = True
            diff = difflib.unified_diff(saved.read_text().splitlines(), got.splitlines(), "saved", "now", lineterm="")
            print(f"{name}: summary.csv differs ({seconds:.0f} s)\n" + "\n".join(list(diff)[:40]))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
