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
cd "$(dirname "$HERE")"
PY="${PYTHON:-python}"

preset=faithful seeds=1 data_root="" out="" smoke=0 nproc=1 device=auto
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset="${2:?--preset needs a value}"; shift 2 ;;
    --seeds) seeds="${2:?--seeds needs a value}"; shift 2 ;;
    --data-root) data_root="${2:?--data-root needs a value}"; shift 2 ;;
    --out) out="${2:?--out needs a value}"; shift 2 ;;
    --nproc-per-node) nproc="${2:?--nproc-per-node needs a value}"; shift 2 ;;
    --device) device="${2:?--device needs a value}"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --*=*) overrides+=("$1"); shift ;;
    --*) [[ $# -ge 2 ]] || { echo "error: override $1 has no value" >&2; exit 2; }
         overrides+=("$1" "$2"); shift 2 ;;
    *) echo "error: unexpected argument '$1' (overrides look like --key value)" >&2; exit 2 ;;
  esac
done
[[ "$seeds" =~ ^[1-9][0-9]*$ ]] || { echo "error: --seeds must be a positive integer, got '$seeds'" >&2; exit 2; }
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nproc-per-node must be a positive integer, got '$nproc'" >&2; exit 2; }

if [[ $smoke == 1 ]]; then
  out="${out:-ImageNet1K/runs/smoke-$preset}"
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
out="${out:-ImageNet1K/runs/$preset}"
data_root="${data_root:-${SAE_CEPTION_DATA:-./data}}"

"$PY" -m common.runs --config ImageNet1K/config.yaml --preset "$preset" --out "$out" "${overrides[@]+"${overrides[@]}"}"
cycles="$(awk '/^cycles:/ {print $2}' "$out/config.yaml")"  # the resolved config, top-level key

for ((i = 0; i < seeds; i++)); do
  seed=$((42 + i))
  for ((k = 0; k <= cycles; k++)); do
    echo "== ImageNet1K $preset: seed $seed, cycle $k of $cycles"
    args=(--run-dir "$out" --seed "$seed" --cycle "$k" --device "$device" --data-root "$data_root")
    if [[ $nproc -gt 1 ]]; then  # DDP for adaptation and extraction, then the single-process stages
      "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" ImageNet1K/cycle.py "${args[@]}" \
        --stages adapt,extract
      "$PY" ImageNet1K/cycle.py "${args[@]}" --stages sae,sharpen,metrics
    else  # every stage of the cycle in one process (the same code as the per-stage scripts)
      "$PY" ImageNet1K/cycle.py "${args[@]}"
    fi
  done
done

"$PY" -c 'import sys
from common.compare import main
from common.errors import cli_main
from common.results import write_summary
path = write_summary(sys.argv[1])
print(f"wrote {path}\n")
cli_main(main, [str(path)])' "$out"
