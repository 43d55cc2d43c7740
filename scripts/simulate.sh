#!/usr/bin/env bash
# Long runs of the engine simulation: random histories of the real cluster
# cores (cuts, held directions, crashes, disk faults, promotions,
# demotions, time), each checked after every step for two serving
# Primaries and a reported split-brain, and at its end for a Primary, and
# every data node in sync with it, once the network heals. Seeds are split
# over parallel jobs; a failing seed is printed, shrunk, with the command
# that replays it.
#
#   scripts/simulate.sh [--histories N] [--jobs J] [--first-seed S] [--shape 2+1|3]
#
# Defaults: 100000 histories per shape (two data nodes and a witness, and
# three data nodes), one job per CPU, a random first seed.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

HISTORIES=100000
JOBS=$(nproc)
FIRST=$((RANDOM << 15 | RANDOM))
SHAPES=("2+1" "3")
while [[ $# -gt 0 ]]; do
    case $1 in
    --histories) HISTORIES=${2:?}; shift 2 ;;
    --jobs) JOBS=${2:?}; shift 2 ;;
    --first-seed) FIRST=${2:?}; shift 2 ;;
    --shape)
        [[ ${2:-} == "2+1" || ${2:-} == "3" ]] || die "--shape is 2+1 or 3"
        SHAPES=("$2"); shift 2 ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option: $1" ;;
    esac
done
for number in "$HISTORIES" "$JOBS" "$FIRST"; do
    [[ $number =~ ^[0-9]+$ ]] || die "options take non-negative integers"
done
[[ $JOBS -gt 0 ]] || die "--jobs must be at least 1"

step "building the library's tests"
cargo test --lib --no-run --quiet
TEST="cluster::tests::random_histories_of_the_real_engine_are_safe_and_heal"
per_job=$(( (HISTORIES + JOBS - 1) / JOBS ))
step "$HISTORIES histories per shape (${SHAPES[*]}) in $JOBS jobs from seed $FIRST"
started=$(date +%s)
outputs=$(mktemp -d)
trap 'rm -rf "$outputs"' EXIT
pids=()
for shape in "${SHAPES[@]}"; do
    for ((job = 0; job < JOBS; job++)); do
        ENGINE_SIM_SHAPE=$shape ENGINE_SIM_FIRST_SEED=$((FIRST + job * per_job)) \
            ENGINE_SIM_HISTORIES=$per_job \
            cargo test --lib --quiet -- --exact "$TEST" --nocapture >"$outputs/$shape.$job" 2>&1 &
        pids+=($!)
    done
    # One shape at a time: the jobs share the CPUs.
    for pid in "${pids[@]}"; do
        wait "$pid" || echo "failed" >"$outputs/failed"
    done
    pids=()
done
status=0
[[ -e $outputs/failed ]] && status=1
elapsed=$(( $(date +%s) - started ))
grep -hE "histories without|replays it|panicked" "$outputs"/* || true
if [[ $status -ne 0 ]]; then
    die "a history failed (its seed and replay command are above)"
fi
total=$((per_job * JOBS * ${#SHAPES[@]}))
log "$total histories, 0 violations, in ${elapsed}s ($(( total / (elapsed > 0 ? elapsed : 1) )) per second on $JOBS jobs)"
log "transitions made, all jobs (machine: from -> to: times):"
# Lines look like "  phase: Serving -> Recording: 26 (why it may be 0)".
grep -hE '^  (phase|disk|replication): ' "$outputs"/* |
    awk -F': ' '{ key = $1 ": " $2; split($3, n, " "); sum[key] += n[1]; if (!(key in order)) { order[key] = ++count; keys[count] = key } }
        END { for (i = 1; i <= count; i++) printf "%s: %d\n", keys[i], sum[keys[i]] }' >&2
