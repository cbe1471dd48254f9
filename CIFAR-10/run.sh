#!/usr/bin/env bash
# CIFAR-10 / ViT-H/14 decoupled SAE-ception: every stage of every cycle, in order, resumable.
#
#   CIFAR-10/run.sh [--preset faithful|corrected] [--seeds N] [--data-root DIR] [--out DIR]
#                   [--nproc-per-node N] [--device auto|cpu|cuda] [--smoke] [--key value ...]
#
# Per seed (42, 43, ...) and cycle k = 0..cycles: adapt -> extract -> train SAE -> sharpen (not
# after the last cycle) -> evaluate, via CIFAR-10/cycle.py (one process per cycle; each stage also
# has its own script). Finished stages are skipped, so rerunning the same command resumes. Ends with
# <out>/summary.csv and the comparison with the paper.
# --nproc-per-node N runs adapt and extract under torchrun (DDP); the other stages are one process.
# --smoke: generated data in the real CIFAR-10 format (in <out>/data unless --data-root is given)
# and a 2-layer VisionTransformer at 32 px on the CPU: the whole pipeline in a few minutes.
# Any other --key value is a config override (see CIFAR-10/config.yaml), e.g. --cycles 1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../common/run_lib.sh"
parse_run_args "$@"
cd "$(dirname "$HERE")"

if [[ $smoke == 1 ]]; then
  out="${out:-$PWD/CIFAR-10/runs/smoke-$preset}"
  # small model of the same class, generated data, CPU-sized settings; later overrides win
  overrides=(--model.arch custom --model.weights none --model.image_size 32 --data.verify_md5 false
             --data.num_workers 0 --runtime.threads 1
             --baseline.batch_size 16 --baseline.eval_batch_size 64 --baseline.finetune.epochs 3
             --baseline.finetune.accum_steps 1 --baseline.finetune.cosine_steps null --baseline.finetune.lr 0.05
             --baseline.finetune.amp none
             --adapt.batch_size 16 --adapt.eval_batch_size 64 --adapt.finetune.epochs 2
             --adapt.finetune.accum_steps 2 --adapt.finetune.lr 0.01 --adapt.finetune.amp none
             --aux.sweep "[0.01, 0.3]"
             --activations.batch_size 64 --activations.chunk_rows 128 --activations.amp none
             --sae.d_sae 64 --sae.epochs 3 --sae.batch_size 32 --sae.lr 1.0e-3
             --sharpen.top_k 5 --metrics.recon_top_k 5 --metrics.probe.epochs 3 --metrics.probe.lr 0.01
             "${overrides[@]+"${overrides[@]}"}")
  if [[ -z "$data_root" ]]; then
    data_root="$out/data"
  fi
  if [[ ! -f "$data_root/cifar-10-batches-py/batches.meta" ]]; then
    "$PY" CIFAR-10/make_smoke_data.py --root "$data_root"
  fi
fi
out="${out:-$PWD/CIFAR-10/runs/$preset}"
data_root="${data_root:-${SAE_CEPTION_DATA:-./data}}"

init_run CIFAR-10
run_decoupled_cycles CIFAR-10
finish_run
