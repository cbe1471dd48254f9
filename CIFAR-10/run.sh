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
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --*=*) overrides+=("$1"); shift ;;
    --*) [[ $# -ge 2 ]] || { echo "error: override $1 has no value" >&2; exit 2; }
         overrides+=("$1" "$2"); shift 2 ;;
    *) echo "error: unexpected argument '$1' (overrides look like --key value)" >&2; exit 2 ;;
  esac
done
[[ "$seeds" =~ ^[1-9][0-9]*$ ]] || { echo "error: --seeds must be a positive integer, got '$seeds'" >&2; exit 2; }
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nproc-per-node must be a positive integer, got '$nproc'" >&2; exit 2; }

if [[ $smoke == 1 ]]; then
  out="${out:-CIFAR-10/runs/smoke-$preset}"
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
out="${out:-CIFAR-10/runs/$preset}"
data_root="${data_root:-${SAE_CEPTION_DATA:-./data}}"

"$PY" -m common.runs --config CIFAR-10/config.yaml --preset "$preset" --out "$out" "${overrides[@]+"${overrides[@]}"}"
cycles="$(awk '/^cycles:/ {print $2}' "$out/config.yaml")"  # the resolved config, top-level key

for ((i = 0; i < seeds; i++)); do
  seed=$((42 + i))
  for ((k = 0; k <= cycles; k++)); do
    echo "== CIFAR-10 $preset: seed $seed, cycle $k of $cycles"
    args=(--run-dir "$out" --seed "$seed" --cycle "$k" --device "$device" --data-root "$data_root")
    if [[ $nproc -gt 1 ]]; then  # DDP for the model passes, then the single-process stages
      "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" CIFAR-10/cycle.py "${args[@]}" \
        --stages adapt,extract
      "$PY" CIFAR-10/cycle.py "${args[@]}" --stages sae,sharpen,metrics
    else  # every stage of the cycle in one process (the same code as the per-stage scripts)
      "$PY" CIFAR-10/cycle.py "${args[@]}"
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
