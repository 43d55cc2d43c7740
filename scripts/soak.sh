#!/usr/bin/env bash
# Counts false failures under load: a cluster of two data nodes and a
# witness, with the default timeouts, serves a steady fio load while the
# same machine builds hablk from scratch (a debug build) over and over and
# runs two CPU
# hogs. Nothing fails on purpose, so every peer loss, new generation or
# resync the nodes log is a false alarm. Prints the counts (and the
# reasons the nodes gave); exits 1 if there was any.
#
#   scripts/soak.sh [--minutes N] [--no-load] [--ping-timeout DUR]
#
# Runs in a private network namespace (needs root). KEEP=1 keeps the logs.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

MINUTES=10
LOAD=1
PING_TIMEOUT=""
while [[ $# -gt 0 ]]; do
    case $1 in
    --minutes) MINUTES=${2:?}; shift 2 ;;
    --no-load) LOAD=""; shift ;;
    --ping-timeout) PING_TIMEOUT=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option: $1" ;;
    esac
done
[[ $MINUTES =~ ^[0-9]+$ && $MINUTES -gt 0 ]] || die "--minutes must be a positive integer"

if [[ -z ${HABLK_SOAK_NETNS:-} ]]; then
    [[ $EUID -eq 0 ]] || die "the soak test needs root (a network namespace)"
    step "checking packages and building (release)"
    ensure_packages fio libnbd-bin iproute2 util-linux
    cargo build --release --quiet --bins
    # The load builds offline inside the namespace: fetch what it needs now.
    cargo fetch --quiet
    exec unshare -n env HABLK_SOAK_NETNS=1 "$0" "$@"
fi
ip link set lo up

BIN="$REPO_ROOT/target/release/hablk"
DIR=$(mktemp -d -t hablk-soak.XXXXXX)
NODES=(alpha beta witness)
declare -A IP=([alpha]=127.0.0.1 [beta]=127.0.0.2 [witness]=127.0.0.3)
declare -A PID=()
LOAD_PIDS=()

hablk() { local node=$1; shift; "$BIN" -c "$DIR/hablk.toml" -n "$node" "$@"; }

# count_lines PATTERN FILE: lines of FILE matching PATTERN (0 if none or no file).
count_lines() {
    local n
    n=$(grep -c "$1" "$2" 2>/dev/null) || true
    printf '%s\n' "${n:-0}"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    for pid in "${LOAD_PIDS[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null; done
    for node in "${NODES[@]}"; do
        [[ -n ${PID[$node]:-} ]] || continue
        hablk "$node" down --force >/dev/null 2>&1 || kill "${PID[$node]}" 2>/dev/null
        wait "${PID[$node]}" 2>/dev/null
    done
    if [[ -n ${KEEP:-} ]]; then printf 'kept %s\n' "$DIR"; else rm -rf "$DIR"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "a cluster of two data nodes and a witness, default timeouts${PING_TIMEOUT:+ (ping-timeout $PING_TIMEOUT)}"
{
    printf '[resource]\nname = "r0"\n'
    [[ -n $PING_TIMEOUT ]] && printf 'ping-timeout = "%s"\n' "$PING_TIMEOUT"
    id=0
    for node in "${NODES[@]}"; do
        printf '\n[[node]]\nname = "%s"\nid = %s\naddress = "%s:7789"\ncontrol = "%s"\n' \
            "$node" "$id" "${IP[$node]}" "$DIR/$node.sock"
        if [[ $node == witness ]]; then
            printf 'meta = "%s"\n' "$DIR/$node.meta"
        else
            truncate -s 1G "$DIR/$node.img"
            printf 'nbd = "%s:10809"\ndisk = "%s"\n' "${IP[$node]}" "$DIR/$node.img"
        fi
        id=$((id + 1))
    done
} >"$DIR/hablk.toml"
for node in "${NODES[@]}"; do
    hablk "$node" create-md >/dev/null
    RUST_LOG=${RUST_LOG:-info} "$BIN" -c "$DIR/hablk.toml" -n "$node" up >"$DIR/$node.log" 2>&1 &
    PID[$node]=$!
done
connected() {
    local node
    for node in "${NODES[@]}"; do
        [[ $(hablk "$node" status --json 2>/dev/null | grep -o '"connection":"Connected"' | wc -l) -eq 2 ]] || return 1
    done
}
wait_until 60 "every node to connect" connected
hablk alpha skip-initial-sync >/dev/null
hablk alpha primary >/dev/null
declare -A MARK=()
for node in "${NODES[@]}"; do MARK[$node]=$(wc -l <"$DIR/$node.log"); done

if [[ -n $LOAD ]]; then
    step "load: two CPU hogs and hablk built from scratch (debug) in a loop"
    for _ in 1 2; do
        setsid yes >/dev/null &
        LOAD_PIDS+=($!)
    done
    setsid bash -c "while :; do
        rm -rf '$DIR/build'
        echo started >>'$DIR/builds'
        if CARGO_TARGET_DIR='$DIR/build' cargo build --offline --quiet >'$DIR/build.log' 2>&1; then
            echo built >>'$DIR/builds'
        else
            echo failed >>'$DIR/builds'
            sleep 1
        fi
    done" &
    LOAD_PIDS+=($!)
fi

step "fio on alpha for $MINUTES min: random 4-64 KiB writes and reads, QD8"
fio --name=soak --ioengine=nbd --uri="nbd://${IP[alpha]}:10809/r0" --rw=randrw --rwmixread=30 \
    --bsrange=4k-64k --iodepth=8 --size=768M --time_based --runtime=$((MINUTES * 60)) \
    --output="$DIR/fio.txt" || die "fio failed: $(tail -n 5 "$DIR/fio.txt")"
grep -E '^ +(read|write):' "$DIR/fio.txt" | sed 's/^ */  /'
if [[ -n $LOAD ]]; then
    printf '  beside it: two CPU hogs and builds of hablk from scratch: %s started, %s finished, %s failed\n' \
        "$(count_lines started "$DIR/builds")" "$(count_lines built "$DIR/builds")" \
        "$(count_lines failed "$DIR/builds")"
fi

step "false alarms during the run (nothing failed on purpose)"
total=0
for node in "${NODES[@]}"; do
    since=$((MARK[$node] + 1))
    tail -n +"$since" "$DIR/$node.log" >"$DIR/$node.run.log"
    lost=$(count_lines 'peer connection lost' "$DIR/$node.run.log")
    generations=$(count_lines 'new generation' "$DIR/$node.run.log")
    resyncs=$(count_lines 'resync: streaming\|resync: this node is the target' "$DIR/$node.run.log")
    printf '  %-8s peer losses %3s   new generations %3s   resyncs %3s\n' "$node" "$lost" "$generations" "$resyncs"
    { grep 'peer connection lost' "$DIR/$node.run.log" || true; } |
        sed -n 's/.*peer=\([^ ]*\) reason=\(.*\)/    lost \1: \2/p' | head -n 5
    total=$((total + lost + generations + resyncs))
done
if [[ $total -gt 0 ]]; then
    printf '\n%s false alarm(s)\n' "$total"
    exit 1
fi
printf '\nno false alarm\n'
