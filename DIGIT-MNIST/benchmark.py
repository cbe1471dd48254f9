"""Wall time of every stage of the DIGIT-MNIST faithful preset for one seed, and the total.

    python DIGIT-MNIST/benchmark.py --data-root data [--jobs 2] [--keep DIR] [--key value ...]

Runs run.sh into a fresh directory (nothing is reused), then prints each stage's own time (from
its .done marker: data loading and work, not the interpreter start-up) and the total wall time of
the whole command. The speed target: total <= 180 s on a 2-core machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("SAE_CEPTION_DATA", "./data"))
    parser.add_argument("--jobs", default="2")
    parser.add_argument("--keep", help="run directory to write (default: a temporary one, deleted)")
    args, overrides = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or Path(tmp) / "run")
        if out.exists():
            sys.exit(f"error: {out} exists; the benchmark needs a fresh directory")
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
        started = time.time()
        proc = subprocess.run(["bash", str(HERE / "run.sh"), "--data-root", args.data_root, "--out", str(out),
                               "--jobs", args.jobs, *overrides], env=env, capture_output=True, text=True)
        total = time.time() - started
        if proc.returncode != 0:
            sys.exit(f"error: run.sh failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        rows = []
        for marker in sorted(out.rglob("*.done")):
            where = marker.parent.name
            rows.append((f"{where}/{marker.stem}", json.loads(marker.read_text()).get("seconds", float("nan"))))
        print(f"{'stage':<28}{'seconds':>9}")
        for name, seconds in rows:
            print(f"{name:<28}{seconds:>9.1f}")
        print(f"{'sum of stages':<28}{sum(s for _, s in rows):>9.1f}")
        print(f"{'total wall (run.sh)':<28}{total:>9.1f}   target <= 180 s, --jobs {args.jobs}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main(sys.argv[1:])
