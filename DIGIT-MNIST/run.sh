#!/usr/bin/env bash
# DIGIT-MNIST end to end: for each seed, the baseline and cycles 1..C (train -> sharpen -> train ...),
# the random-target ablation, and the metrics of every cycle; then summary.csv and the comparison
# with the paper. Rerun the same command to resume after an interruption: finished stages are skipped.
#
#   bash DIGIT-MNIST/run.sh [--preset faithful|corrected] [--seeds N] [--data-root DIR] [--out DIR]
#                           [--jobs 1|2] [--key.sub value ...]      (any other --key is a config override)
# --jobs 2 (default) runs two lanes on two cores: the cycle chain, and the ablation plus the metrics
# of cycles whose training is done.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../common/run_lib.sh"
parse_run_args "$@"
[[ $smoke == 0 && $nproc == 1 && $device == auto ]] || run_error "DIGIT-MNIST runs on real MNIST on the CPU: no --smoke, --nproc-per-node or --device"
cd "$(dirname "$here")"
out="${out:-$here/runs/$preset}"
data_root="${data_root:-${SAE_CEPTION_DATA:-./data}}"

init_run DIGIT-MNIST
[ "$jobs" = 2 ] && export OMP_NUM_THREADS=1   # two lanes share the two cores

stage() { "$PY" "$here/$1" --run-dir "$out" --data-root "$data_root" "${@:2}"; }

cycle_chain() {  # lane 1: each cycle needs the previous one's targets; then the last cycle's metrics
  for ((k = 0; k <= cycles; k++)); do
    stage train.py --seed "$1" --cycle "$k"
    if ((k < cycles)); then stage sharpen.py --seed "$1" --cycle "$k"; fi
  done
  stage evaluate.py --seed "$1" --cycle "$cycles"
}

side_lane() {  # lane 2: the ablation, then the other cycles' metrics as soon as their training is done
  local seed=$1 chain_pid=$2
  stage ablation.py --seed "$seed"
  stage evaluate.py --seed "$seed" --ablation
  for ((k = 0; k < cycles; k++)); do
    local done_file="$out/seed_$seed/cycle_$k/train.done"
    while [ ! -f "$done_file" ]; do
      kill -0 "$chain_pid" 2>/dev/null || [ -f "$done_file" ] || return 1
      sleep 1
    done
    stage evaluate.py --seed "$seed" --cycle "$k"
  done
}

trap 'kill $(jobs -p) 2>/dev/null' INT TERM
for ((i = 0; i < seeds; i++)); do
  seed=$((42 + i))
  if [ "$jobs" = 2 ]; then
    cycle_chain "$seed" & chain_pid=$!
    side_lane "$seed" "$chain_pid" & side_pid=$!
    status=0
    wait "$chain_pid" || status=$?
    wait "$side_pid" || status=$((status ? status : $?))
    [ "$status" = 0 ] || exit "$status"
  else
    cycle_chain "$seed"
    side_lane "$seed" $$
  fi
done
finish_run
