#!/usr/bin/env bash
# DIGIT-MNIST end to end: for each seed, the baseline and cycles 1..C (train -> sharpen -> train ...),
# the random-target ablation, and the metrics of every cycle; then summary.csv and the comparison
# with the paper. Rerun the same command to resume after an interruption: finished stages are skipped.
#
#   bash DIGIT-MNIST/run.sh [--preset faithful|corrected] [--seeds N] [--data-root DIR] [--out DIR]
#                           [--jobs 1|2] [--key.sub value ...]      (any other --key is a config override)
# --jobs 2 (default) runs two lanes on two cores: the cycle chain, and the ablation plus the metrics
# of cycles whose training is done.
# --dry-run prints the commands it would run and runs nothing.
set -euo pipefail
# The command line is parsed, checked and run by common/launch.py (python -m common.launch DIGIT-MNIST --help).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m common.launch DIGIT-MNIST "$@"
