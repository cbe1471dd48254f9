"""Every benchmark of the repository in one run: the numbers the README shows.

1. exact clustering scores (common.metrics) vs scikit-learn on SAE-like codes, as speed-up ratios;
2. SAE training step throughput as a fraction of the machine's measured GEMM peak;
3. the DIGIT-MNIST faithful preset's stage times (DIGIT-MNIST/benchmark.py, one seed).

    python tests/benchmarks/run_all.py                    # about 10 minutes on a 2-core CPU
    python tests/benchmarks/run_all.py --quick            # about 3 minutes: smaller N, shorter timings
    python tests/benchmarks/run_all.py --device cuda --dtype bf16   # the same on a GPU

Not collected by pytest (pyproject's norecursedirs); each part also runs on its own:
bench_metrics.py, bench_sae.py, DIGIT-MNIST/benchmark.py.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import bench_metrics
import bench_sae


def machine(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    try:
        load = os.getloadavg()[0]
        text += f"; load average {load:.1f} at start"
    except OSError:
        pass
    return text


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 96 - len(title)), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller N and shorter timings (about 3 minutes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (metrics and SAE step)")
    p.add_argument("--dtype", default="fp32", choices=sorted(bench_sae.DTYPES), help="SAE step precision")
    p.add_argument("--n", type=int, default=None, help="metrics: examples (default 50,000; --quick 10,000)")
    p.add_argument("--n-sklearn", type=int, default=None, help="metrics: silhouette subsample for scikit-learn")
    p.add_argument("--sklearn-full", action="store_true", help="metrics: scikit-learn silhouettes at full N (slow)")
    p.add_argument("--data-root", default=os.environ.get("SAE_CEPTION_DATA", str(REPO / "data")),
                   help="MNIST data root for the DIGIT-MNIST benchmark")
    p.add_argument("--skip", nargs="*", default=[], choices=["metrics", "sae", "mnist"], help="parts to leave out")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible")
    started = time.time()
    print(f"machine: {machine(args.device)}", flush=True)

    if "metrics" not in args.skip:
        section("1. exact clustering scores vs scikit-learn (SAE-like codes)")
        margs = bench_metrics.parser().parse_args(
            (["--quick"] if args.quick else []) + ["--device", args.device]
            + (["--n", str(args.n)] if args.n else []) + (["--n-sklearn", str(args.n_sklearn)] if args.n_sklearn else [])
            + (["--sklearn-full"] if args.sklearn_full else []))
        rows = bench_metrics.run(**bench_metrics.args_for_run(margs), log=lambda line: print(line, flush=True))
        print(bench_metrics.report(rows), flush=True)

    if "sae" not in args.skip:
        section("2. SAE training throughput vs the measured GEMM peak")
        rows = bench_sae.run(args.device, args.dtype, seconds=1.0 if args.quick else 2.0)
        print(bench_sae.report(rows, args.device, args.dtype), flush=True)

    if "mnist" not in args.skip:
        section("3. DIGIT-MNIST faithful preset, one seed: stage times")
        script = REPO / "DIGIT-MNIST" / "benchmark.py"
        if not script.exists():
            print(f"({script.relative_to(REPO)} not found: skipped)")
        else:
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            proc = subprocess.run([sys.executable, str(script), "--data-root", args.data_root], cwd=REPO,
                                  capture_output=True, text=True, env=env, check=False)
            print(proc.stdout.rstrip() or "(no output)")
            if proc.returncode != 0:
                print(f"DIGIT-MNIST benchmark failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")

    print(f"\nrun_all: {time.time() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
