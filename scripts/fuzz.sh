#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a while (CI: a short run each),
# starting from the seeds in fuzz/seeds/ and a fresh corpus in a temp dir.
# Fails if any target finds a crash; the input is kept in
# fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [--seconds N] [TARGET...]     (default: 20 s, every target)
#
# cargo-fuzz wants a nightly toolchain; on stable, RUSTC_BOOTSTRAP=1 lets
# rustc accept its flags (the sanitizer runtime ships with stable too).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

SECONDS_EACH=20
TARGETS=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --seconds) SECONDS_EACH=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option: $1" ;;
    *) TARGETS+=("$1"); shift ;;
    esac
done
[[ $SECONDS_EACH =~ ^[0-9]+$ && $SECONDS_EACH -gt 0 ]] || die "--seconds must be a positive integer"

if ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install --locked --quiet cargo-fuzz
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi
if [[ ${#TARGETS[@]} -eq 0 ]]; then
    mapfile -t TARGETS < <(cargo fuzz list)
fi

# Inputs as long as a deep request stream (the seeds reach 200 KB).
declare -A MAX_LEN=([nbd_connection]=262144 [nbd_handshake]=65536 [peer_frame]=65536)

step "building the fuzz targets"
cargo fuzz build

WORK=$(mktemp -d -t hablk-fuzz.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
for target in "${TARGETS[@]}"; do
    step "fuzzing $target for ${SECONDS_EACH}s"
    corpus=("$WORK/$target")
    mkdir -p "${corpus[0]}"
    [[ -d fuzz/seeds/$target ]] && corpus+=("fuzz/seeds/$target")
    args=(-max_total_time="$SECONDS_EACH" -print_final_stats=1)
    [[ -n ${MAX_LEN[$target]:-} ]] && args+=(-max_len="${MAX_LEN[$target]}")
    if ! cargo fuzz run "$target" "${corpus[@]}" -- "${args[@]}" >"$WORK/$target.log" 2>&1; then
        tail -n 40 "$WORK/$target.log" >&2
        die "fuzz target $target failed; the input is in fuzz/artifacts/$target/"
    fi
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "$WORK/$target.log" | sed 's/^/  /'
done
