#!/usr/bin/env bash
# ImageNet1K / ConvNeXt-V2-L decoupled SAE-ception: every stage of every cycle, in order, resumable.
#
#   ImageNet1K/run.sh [--preset faithful|corrected] [--seeds N] [--data-root DIR] [--out DIR]
#                     [--nproc-per-node N] [--device auto|cpu|cuda] [--smoke] [--key value ...]
#                     [--nnodes N --node-rank R --rdzv-endpoint HOST:PORT] [--preflight] [--dry-run]
#
# Per seed (42, 43, ...) and cycle k = 0..cycles: adapt -> extract -> train_sae -> sharpen (not
# after the last cycle) -> evaluate, one process per cycle (ImageNet1K/cycle.py). Finished stages
# are skipped, so rerunning the same command resumes. Ends with <out>/summary.csv and the
# comparison with the paper.
# With backbone.cache (default) the first adapt extracts the pooled backbone features of all splits
# once (<out>/backbone/); everything after that runs on them, without images.
# --nproc-per-node N runs adapt and extract under torchrun (DDP); the other stages are one process.
# --nnodes N --node-rank R --rdzv-endpoint HOST:PORT: one run.sh per node (R = 0..N-1), all with
# the same --out on a filesystem every node shares; torchrun meets at HOST:PORT (c10d) and
# node 0 runs the single-process stages (docs/cluster.md; slurm.sbatch is an example).
# --dry-run prints the commands it would run and runs nothing.
# --preflight [--preflight-steps N]: a few steps of every stage of cycles 0 and 1 in <out>/preflight
# (removed afterwards), then one table: time per step, projected wall time, memory, disk (docs/cluster.md).
# --smoke: a generated ImageFolder tree (in <out>/data unless --data-root is given) and timm
# convnextv2_atto with random weights at 32 px on the CPU: the whole pipeline in a few minutes.
# Any other --key value is a config override (see ImageNet1K/config.yaml), e.g. --cycles 1.
set -euo pipefail
# The stages of every seed and cycle k = 0..C (C: the config key cycles), in the order they run, one
# process per cycle: ImageNet1K/cycle.py (the recipes: adapt.py, train_sae.py, sharpen.py, evaluate.py).
# Each refuses to start before the stages it is built from have finished, and skips itself when done.
stages='
  # lane  stage    cycles  processes
  cycle   adapt    0..C    torchrun    # ConvNeXt-V2-L: scored as published (k = 0), or head.norm + head.fc fine-tuned
  cycle   extract  0..C    torchrun    # head.flatten (1536-d) for train, val and test (by default from the cached backbone features)
  cycle   sae      0..C                # the 6144-feature SAE of this cycle, lowest validation loss kept
  cycle   sharpen  0..C-1              # one target per training image, for cycle k+1
  cycle   metrics  0..C                # every metric column (docs/conventions.md), torch probe on the codes
'
# The command line is parsed, checked and run by common/launch.py (python -m common.launch --help).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m common.launch ImageNet1K --stage-table "$stages" "$@"
