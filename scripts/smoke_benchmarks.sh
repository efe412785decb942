#!/usr/bin/env bash
# Runs every benchmarks/*.py in its smoke mode (tiny sizes, stand-in models: seconds each), one after another,
# from the repository root, and prints one line per script with its wall time. Exits non-zero if any fails
# (or if a benchmark has no entry below). Smoke reports go under outputs/ (the scripts' own smoke defaults);
# each script's output is logged to outputs/smoke_benchmarks/NAME.log, and the log's tail is shown on failure.
#
#     bash scripts/smoke_benchmarks.sh                  # all of them
#     bash scripts/smoke_benchmarks.sh turbo dpo        # only these (names without .py)
#     bash scripts/smoke_benchmarks.sh --list           # the commands, one per line
#
# PYTHON overrides the interpreter (default: .venv/bin/python); SMOKE_TIMEOUT the seconds a script may take (600).
set -uo pipefail
export LC_NUMERIC=C  # a dot in $EPOCHREALTIME
cd "$(dirname "$0")/.."

# name -> arguments of its smoke mode (every benchmarks/*.py must have one)
declare -A SMOKE=(
  [aesthetic]="--smoke"
  [alignment_detector]="--smoke"
  [dpo]="--smoke"
  [enhancer]="--smoke"
  [enhancer_paraphrase]="--smoke"
  [fid_floor]="--smoke"
  [gpu_image]="--smoke"
  [gpu_moe_hst]="--smoke"
  [paraphrase_eval]="--smoke"
  [serve_load]="--smoke"
  [sparse_efficiency]="--smoke"
  [sparse_lra]="--setting smoke"
  [transformer_speed]="--smoke"
  [turbo]="--smoke"
  [turbo_artifacts]="--smoke"
  [unified_cut_retention]="--smoke"
  [unified_decode_profile]="--smoke"
  [unified_moe_dispatch]="--smoke"
  [unified_next_scale]="--smoke"
  [unified_rl_eval]="--smoke"
  [unified_speculative]="--smoke"
  [unified_speed]="--smoke"
  [unified_table]="--smoke --no-progress"
  [vilg_ablation]="--smoke"
)

all=()
for f in benchmarks/*.py; do
  all+=("$(basename "$f" .py)")
done
missing=()
for name in "${all[@]}"; do
  [[ -v SMOKE[$name] ]] || missing+=("$name")
done
if ((${#missing[@]})); then
  echo "no smoke command for: ${missing[*]} (add it to SMOKE in $0)" >&2
  exit 2
fi

if [[ "${1:-}" == "--list" ]]; then
  for name in "${all[@]}"; do echo "benchmarks/$name.py ${SMOKE[$name]}"; done
  exit 0
fi
names=("$@")
((${#names[@]})) || names=("${all[@]}")
for name in "${names[@]}"; do
  [[ -v SMOKE[$name] ]] || { echo "unknown benchmark: $name (have: ${all[*]})" >&2; exit 2; }
done

PY=${PYTHON:-.venv/bin/python}
limit=${SMOKE_TIMEOUT:-600}  # seconds per script
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
logs=outputs/smoke_benchmarks
mkdir -p "$logs"

since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }  # seconds since $1

failed=()
total_start=$EPOCHREALTIME
for name in "${names[@]}"; do
  start=$EPOCHREALTIME
  # shellcheck disable=SC2086  # the arguments are meant to split
  timeout "$limit" "$PY" "benchmarks/$name.py" ${SMOKE[$name]} >"$logs/$name.log" 2>&1
  rc=$?
  secs=$(since "$start")
  if ((rc == 0)); then
    printf '%-24s %7.1f s  ok\n' "$name" "$secs"
  else
    why="exit $rc"
    ((rc == 124)) && why="timed out after ${limit} s"
    printf '%-24s %7.1f s  FAILED (%s): %s %s\n' "$name" "$secs" "$why" "benchmarks/$name.py" "${SMOKE[$name]}"
    tail -n 20 "$logs/$name.log" | sed 's/^/    | /'
    failed+=("$name")
  fi
done
printf '%-24s %7.1f s  (%d scripts, logs in %s/)\n' "total" "$(since "$total_start")" \
  "${#names[@]}" "$logs"
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
