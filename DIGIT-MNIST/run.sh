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
# The stages of every seed, in the order they run (k = 0..C, C: the config key cycles). The chain
# runs one stage after another; with --jobs 2 the side lane runs beside it, each side stage of a cycle
# once the chain has finished the stage it waits for. Each script refuses to start before the stages
# it is built from have finished, and skips itself when done.
stages='
  # lane  script and its own arguments  cycles  waits for
  chain   train.py                      0..C               # MLP and SAEs together: the baseline, or towards the targets of cycle k-1
  chain   sharpen.py                    0..C-1             # one target per training example, for cycle k+1
  chain   evaluate.py                   C       alone: --probe-workers 2   # by then alone: its probe on both cores, same numbers
  side    ablation.py                                      # cycle 1 towards random unit targets (Table 10)
  side    evaluate.py --ablation
  side    evaluate.py                   0..C-1  after train
'
# The command line is parsed, checked and run by common/launch.py (python -m common.launch --help).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m common.launch DIGIT-MNIST --stage-table "$stages" "$@"
