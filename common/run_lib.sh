# Shared by the experiments' run.sh (sourced, not run): the command line every run.sh accepts, the
# per-seed cycle loop of the decoupled experiments, and the summary at the end.
#
# parse_run_args "$@" sets: preset seeds data_root out device nproc smoke jobs and the array
# overrides (every other --key value / --key=value, passed on as config overrides). Paths are made
# absolute, so the caller may cd to the repository root afterwards.

PY="${PYTHON:-python}"

run_error() { echo "error: $*" >&2; exit 2; }

parse_run_args() {
  preset=faithful seeds=1 data_root="" out="" device=auto nproc=1 smoke=0 jobs=2
  overrides=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --preset|--seeds|--data-root|--out|--device|--nproc-per-node|--jobs)
        [[ $# -ge 2 ]] || run_error "$1 needs a value"
        case "$1" in
          --preset) preset="$2" ;; --seeds) seeds="$2" ;; --data-root) data_root="$2" ;; --out) out="$2" ;;
          --device) device="$2" ;; --nproc-per-node) nproc="$2" ;; --jobs) jobs="$2" ;;
        esac
        shift 2 ;;
      --smoke) smoke=1; shift ;;
      -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
      --*=*) overrides+=("$1"); shift ;;
      --*) [[ $# -ge 2 ]] || run_error "override $1 has no value"; overrides+=("$1" "$2"); shift 2 ;;
      *) run_error "unexpected argument '$1' (overrides look like --key value; see --help)" ;;
    esac
  done
  [[ "$seeds" =~ ^[1-9][0-9]*$ ]] || run_error "--seeds must be a positive integer, got '$seeds'"
  [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || run_error "--nproc-per-node must be a positive integer, got '$nproc'"
  [[ "$jobs" =~ ^[12]$ ]] || run_error "--jobs must be 1 or 2, got '$jobs'"
  if [[ -n "$out" ]]; then out="$(realpath -m "$out")"; fi
  if [[ -n "$data_root" ]]; then data_root="$(realpath -m "$data_root")"; fi
  return 0
}

# init_run EXPERIMENT: resolve EXPERIMENT/config.yaml (+ preset, overrides) into $out/config.yaml,
# or check it against the one there; sets cycles.
init_run() {
  "$PY" -m common.runs --config "$1/config.yaml" --preset "$preset" --out "$out" ${overrides[@]+"${overrides[@]}"}
  cycles="$("$PY" -c 'import sys; from common.config import load_run_config; print(load_run_config(sys.argv[1])["cycles"])' "$out")"
}

# run_decoupled_cycles EXPERIMENT: for each seed and cycle, every stage of the cycle via
# EXPERIMENT/cycle.py (one process per cycle); with --nproc-per-node N, adapt and extract run under
# torchrun (DDP) and the single-process stages after them.
run_decoupled_cycles() {
  local exp=$1 seed k
  for ((i = 0; i < seeds; i++)); do
    seed=$((42 + i))
    for ((k = 0; k <= cycles; k++)); do
      echo "== $exp $preset: seed $seed, cycle $k of $cycles"
      local args=(--run-dir "$out" --seed "$seed" --cycle "$k" --device "$device" --data-root "$data_root")
      if [[ $nproc -gt 1 ]]; then
        "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" "$exp/cycle.py" "${args[@]}" \
          --stages adapt,extract
        "$PY" "$exp/cycle.py" "${args[@]}" --stages sae,sharpen,metrics
      else
        "$PY" "$exp/cycle.py" "${args[@]}"
      fi
    done
  done
}

# finish_run: summary.csv of the run and the comparison with the paper.
finish_run() {
  "$PY" -m common.results "$out"
}
