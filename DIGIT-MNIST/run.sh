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

# Each lane is one Python process (common/lane.py) running its stages in turn: ~2.5 s of start-up
# saved per stage. stage_cmd prints one stage's command line, shell-quoted, as one lane item.
stage_cmd() { printf '%q ' "$here/$1" --run-dir "$out" --data-root "$data_root" "${@:2}"; }

cycle_chain() {  # lane 1: each cycle needs the previous one's targets; then the last cycle's metrics
  local items=()
  for ((k = 0; k <= cycles; k++)); do
    items+=("$(stage_cmd train.py --seed "$1" --cycle "$k")")
    if ((k < cycles)); then items+=("$(stage_cmd sharpen.py --seed "$1" --cycle "$k")"); fi
  done
  items+=("$(stage_cmd evaluate.py --seed "$1" --cycle "$cycles")")
  "$PY" -m common.lane -- "${items[@]}"
}

side_lane() {  # lane 2: the ablation, then the other cycles' metrics as soon as their training is done
  local seed=$1 chain_pid=$2
  local items=("$(stage_cmd ablation.py --seed "$seed")" "$(stage_cmd evaluate.py --seed "$seed" --ablation)")
  for ((k = 0; k < cycles; k++)); do
    items+=("$(printf '@after %q' "$out/seed_$seed/cycle_$k/train.done")")
    items+=("$(stage_cmd evaluate.py --seed "$seed" --cycle "$k")")
  done
  "$PY" -m common.lane --watch "$chain_pid" -- "${items[@]}"
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
