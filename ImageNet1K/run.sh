#!/usr/bin/env bash
# ImageNet1K / ConvNeXt-V2-L decoupled SAE-ception: every stage of every cycle, in order, resumable.
#
#   ImageNet1K/run.sh [--preset faithful|corrected] [--seeds N] [--data-root DIR] [--out DIR]
#                     [--nproc-per-node N] [--device auto|cpu|cuda] [--smoke] [--key value ...]
#
# Per seed (42, 43, ...) and cycle k = 0..cycles: adapt -> extract -> train_sae -> sharpen (not
# after the last cycle) -> evaluate, one process per cycle (ImageNet1K/cycle.py). Finished stages
# are skipped, so rerunning the same command resumes. Ends with <out>/summary.csv and the
# comparison with the paper.
# With backbone.cache (default) the first adapt extracts the pooled backbone features of all splits
# once (<out>/backbone/); everything after that runs on them, without images.
# --nproc-per-node N runs adapt and extract under torchrun (DDP); the other stages are one process.
# --smoke: a generated ImageFolder tree (in <out>/data unless --data-root is given) and timm
# convnextv2_atto with random weights at 32 px on the CPU: the whole pipeline in a few minutes.
# Any other --key value is a config override (see ImageNet1K/config.yaml), e.g. --cycles 1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../common/run_lib.sh"
parse_run_args "$@"
cd "$(dirname "$HERE")"

if [[ $smoke == 1 ]]; then
  out="${out:-$PWD/ImageNet1K/runs/smoke-$preset}"
  # small model of the same class, generated data, CPU-sized settings; later overrides win
  overrides=(--model.name convnextv2_atto --model.weights none --data.image_size 32 --data.val_size 8
             --data.num_workers 0 --runtime.threads 1 --backbone.amp none --backbone.batch_size 16 --activations.amp none
             --activations.batch_size 64 --activations.chunk_rows 16
             --baseline.train true --baseline.batch_size 8 --baseline.eval_batch_size 64
             --baseline.finetune.epochs 4 --baseline.finetune.lr 0.05 --baseline.finetune.amp none
             --adapt.batch_size 8 --adapt.eval_batch_size 64 --adapt.finetune.epochs 2 --adapt.finetune.lr 0.02
             --adapt.finetune.amp none --aux.sweep "[0.01, 0.5]"
             --sae.d_sae 64 --sae.epochs "[3, 2, 2, 2]" --sae.batch_size 16 --sae.lr 1.0e-3 --sae.amp none
             --sae.l1_coeff "[1.0e-3, 1.0e-3, 1.0e-3, 1.0e-3]"
             --sharpen.top_k 5 --sharpen.batch_size 64 --metrics.recon_top_k 5 --metrics.batch_size 64
             --metrics.probe.batch_size 16 --metrics.probe.epochs 20 --metrics.probe.lr 0.01
             --metrics.probe.subset_fraction 1.0
             "${overrides[@]+"${overrides[@]}"}")
  if [[ -z "$data_root" ]]; then
    data_root="$out/data"
  fi
  if [[ ! -d "$data_root/imagenet/train" ]]; then
    "$PY" ImageNet1K/make_smoke_data.py --root "$data_root"
  fi
fi
out="${out:-$PWD/ImageNet1K/runs/$preset}"
data_root="${data_root:-${SAE_CEPTION_DATA:-./data}}"

init_run ImageNet1K
run_decoupled_cycles ImageNet1K
finish_run
