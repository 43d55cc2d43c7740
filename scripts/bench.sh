#!/usr/bin/env bash
# Benchmarks hablk against reference NBD servers in one run, on one file
# system, with the same fio workloads (fio's nbd engine), and prints medians
# and hablk's ratio to each peer: the servers users would pick instead
# (nbdkit, qemu-nbd, a qemu-storage-daemon quorum as the replicated
# reference) and fio's four classic rows. Absolute numbers drift between
# runs and machines, so compare the ratios.
#
# Every server listens on 127.0.0.1 only and everything is torn down on exit.
# Repetitions are interleaved: each repetition runs every workload on every
# server (in a rotated order) before the next repetition starts.
#
# Adding a server: write server_start_NAME (start it, wait until it serves,
# set SERVER_URI[NAME]) and server_stop_NAME, give it a SERVER_TITLE, and
# name it in --servers ('-' in NAME becomes '_' in the function names). A
# server that is not an NBD export (the plain-file baseline) instead defines
# fio_target_NAME, printing the fio options that pick its target. Every
# server whose name starts with "hablk" gets a ratio column against every
# server whose name does not.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

usage() {
    cat <<'USAGE'
usage: scripts/bench.sh [options]

  --runtime SECONDS   measured time per fio run (default 6; env BENCH_RUNTIME)
  --ramp SECONDS      fio ramp time before measuring (default 1; env BENCH_RAMP)
  --reps N            repetitions of each workload on each server (default 3;
                      env BENCH_REPS)
  --quick             a smoke run: --runtime 2 --reps 1 (flags given later win)
  --servers LIST      comma-separated (default hablk,hablk2,hablk2-sync,
                      hablk3,hablk3-failover,nbdkit,qemu-nbd,qsd-quorum; env
                      BENCH_SERVERS). hablk2 = two data nodes, protocol C,
                      set up with skip-initial-sync; hablk2-sync = the same
                      after a real initial sync (primary --force copies 256
                      MiB of data from alpha); hablk3 = two data nodes and a witness
                      (skip-initial-sync); hablk3-failover = two data nodes
                      and a witness after an initial sync, a kill -9 of the
                      Primary under writes, promotion of beta and alpha's
                      resync, measured on beta; qsd-quorum =
                      qemu-storage-daemon quorum of a local file and an
                      nbdkit replica; file = fio io_uring on a plain file
  --single            only the single-node comparison (hablk,nbdkit,qemu-nbd)
  --no-resync         skip the resync measurement
  --no-failover       skip the failover measurement
  --workloads LIST    comma-separated from randwrite,randread,seqwrite,qd1write
                      (default all; env BENCH_WORKLOADS)
  --hablk-io ENGINE   uring | threads (default: hablk's default; env HABLK_IO)
  --dir DIR           where the 1 GiB files go (default a temp dir under
                      $TMPDIR or /tmp; env BENCH_DIR); all on one file system
  --port-base PORT    first TCP port used (default 10930; env BENCH_PORT_BASE)
  --keep              keep the work dir (logs, fio output, raw results)
  -h, --help          this text
USAGE
}

RUNTIME=${BENCH_RUNTIME:-6}
RAMP=${BENCH_RAMP:-1}
REPS=${BENCH_REPS:-3}
SERVERS_ARG=${BENCH_SERVERS:-hablk,hablk2,hablk2-sync,hablk3,hablk3-failover,nbdkit,qemu-nbd,qsd-quorum}
RESYNC=1
FAILOVER=1
WORKLOADS_ARG=${BENCH_WORKLOADS:-randwrite,randread,seqwrite,qd1write}
HABLK_IO=${HABLK_IO:-}
PARENT_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}
PORT_BASE=${BENCH_PORT_BASE:-10930}
KEEP=""
FILE_SIZE=1G
FIO_SIZE=512M
# Every server's file starts with the same INITIAL_DATA_MIB of random data
# (written with O_DIRECT, so no server starts with it cached) and holes
# after it; so does every node of an hablk cluster set up with
# skip-initial-sync, while a real initial sync starts with it on alpha only
# and copies it.
INITIAL_DATA_MIB=256

while [[ $# -gt 0 ]]; do
    case $1 in
    --runtime) RUNTIME=${2:?}; shift 2 ;;
    --ramp) RAMP=${2:?}; shift 2 ;;
    --reps) REPS=${2:?}; shift 2 ;;
    --quick) RUNTIME=2; REPS=1; shift ;;
    --servers) SERVERS_ARG=${2:?}; shift 2 ;;
    --single) SERVERS_ARG=hablk,nbdkit,qemu-nbd; RESYNC=""; FAILOVER=""; shift ;;
    --no-resync) RESYNC=""; shift ;;
    --no-failover) FAILOVER=""; shift ;;
    --workloads) WORKLOADS_ARG=${2:?}; shift 2 ;;
    --hablk-io) HABLK_IO=${2:?}; shift 2 ;;
    --dir) PARENT_DIR=${2:?}; shift 2 ;;
    --port-base) PORT_BASE=${2:?}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
done
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -gt 0 ]] || die "--runtime must be a positive integer"
[[ $RAMP =~ ^[0-9]+$ ]] || die "--ramp must be an integer"
[[ $REPS =~ ^[0-9]+$ && $REPS -gt 0 ]] || die "--reps must be a positive integer"
IFS=, read -ra SERVERS <<<"$SERVERS_ARG"
IFS=, read -ra WORKLOADS <<<"$WORKLOADS_ARG"

PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

# ---------------------------------------------------------------- workloads

declare -A WORKLOAD_ARGS=(
    [randwrite]="--rw=randwrite --bs=4k --iodepth=32"
    [randread]="--rw=randread --bs=4k --iodepth=32"
    [seqwrite]="--rw=write --bs=1M --iodepth=8"
    [qd1write]="--rw=randwrite --bs=4k --iodepth=1"
)
for workload in "${WORKLOADS[@]}"; do
    [[ -n ${WORKLOAD_ARGS[$workload]:-} ]] || die "unknown workload: $workload"
done

# ------------------------------------------------------------------ servers

declare -A SERVER_TITLE=(
    [hablk]="hablk (1 node)"
    [hablk2]="hablk, 2 data nodes, protocol C; skip-initial-sync path"
    [hablk2-sync]="hablk, 2 data nodes, protocol C; after a real initial sync (primary --force)"
    [hablk3]="hablk, 2 data nodes + witness, protocol C; skip-initial-sync path"
    [hablk3-failover]="hablk, 2 data nodes + witness; initial sync, kill -9 failover, resync; on the new Primary"
    [nbdkit]="nbdkit file"
    [qemu-nbd]="qemu-nbd"
    [qsd-quorum]="qemu-storage-daemon quorum (2)"
    [file]="fio io_uring on the file"
)
declare -A SERVER_URI=()
declare -A SERVER_PID=()
STARTED=()
NEXT_PORT=$PORT_BASE
WORK=""
HABLK_BIN=""

# new_image FILE...: a FILE_SIZE file holding the initial data.
new_image() {
    local file
    for file in "$@"; do
        truncate -s "$FILE_SIZE" "$file"
        fill_initial_data "$file"
    done
}

fill_initial_data() {
    if [[ ! -f $WORK/initial.data ]]; then
        head -c "$((INITIAL_DATA_MIB << 20))" /dev/urandom >"$WORK/initial.data"
    fi
    dd if="$WORK/initial.data" of="$1" bs=1M oflag=direct conv=notrunc status=none
}

next_port() {
    PORT=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 1))
}

# Succeeds once an NBD server answers at URI (and is still running).
nbd_ready() {
    local uri=$1 pid=$2
    kill -0 "$pid" 2>/dev/null || die "server for $uri exited; see $WORK/*.log"
    nbdinfo --size "$uri" >/dev/null 2>&1
}

# Starts a background process with its output in $WORK/NAME.log and records
# its pid under NAME.
spawn() {
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    SERVER_PID[$name]=$!
}

# Stops a process started by spawn: SIGTERM, then SIGKILL after 10 s.
reap() {
    local name=$1 pid=${SERVER_PID[$1]:-} i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "SERVER_PID[$name]"
}

hablk() { "$HABLK_BIN" -c "$WORK/hablk.toml" -n bench "$@"; }

hablk_answers() {
    kill -0 "${SERVER_PID[hablk]}" 2>/dev/null || die "hablk up exited: $(tail -n 5 "$WORK/hablk.log")"
    hablk status >/dev/null 2>&1
}

server_start_hablk() {
    local extra="" repl
    next_port
    repl=$PORT
    next_port
    [[ -n $HABLK_IO ]] && extra="io = \"$HABLK_IO\""
    new_image "$WORK/hablk.img"
    write_single_node_config "$WORK/hablk.toml" bench "$WORK/hablk.img" \
        "127.0.0.1:$PORT" "127.0.0.1:$repl" "$WORK/hablk.sock" "$extra"
    hablk create-md >/dev/null
    RUST_LOG=${RUST_LOG:-warn} spawn hablk "$HABLK_BIN" -c "$WORK/hablk.toml" -n bench up
    wait_until 30 "hablk to answer" hablk_answers
    hablk primary >/dev/null
    SERVER_URI[hablk]="nbd://127.0.0.1:$PORT/r0"
    wait_until 30 "hablk's NBD export" nbd_ready "${SERVER_URI[hablk]}" "${SERVER_PID[hablk]}"
}

server_stop_hablk() {
    [[ -n ${SERVER_PID[hablk]:-} ]] || return 0
    hablk down >/dev/null 2>&1 || hablk down --force >/dev/null 2>&1 || true
    reap hablk
}

# ------------------------------------------------- replicated hablk clusters

# hablk_cluster NAME NODES...: a config with data nodes (alpha, beta) and,
# if named, a witness, all on 127.0.0.1 with ports of their own.
declare -A CLUSTER_NODES=()

hablk_node() {
    local cluster=$1 node=$2
    shift 2
    "$HABLK_BIN" -c "$WORK/$cluster.toml" -n "$node" "$@"
}

write_cluster_config() {
    local cluster=$1 id=0 node extra=""
    shift
    [[ -n $HABLK_IO ]] && extra="io = \"$HABLK_IO\""
    {
        printf '[resource]\nname = "r0"\nping-timeout = "1s"\n%s\n%s\n' "$extra" "${CLUSTER_EXTRA:-}"
        for node in "$@"; do
            next_port
            printf '\n[[node]]\nname = "%s"\nid = %s\naddress = "127.0.0.1:%s"\ncontrol = "%s"\n' \
                "$node" "$id" "$PORT" "$WORK/$cluster-$node.sock"
            if [[ $node == witness ]]; then
                printf 'meta = "%s"\n' "$WORK/$cluster-$node.meta"
            else
                next_port
                truncate -s "$FILE_SIZE" "$WORK/$cluster-$node.img"
                printf 'nbd = "127.0.0.1:%s"\ndisk = "%s"\n' "$PORT" "$WORK/$cluster-$node.img"
            fi
            id=$((id + 1))
        done
    } >"$WORK/$cluster.toml"
}

start_cluster_node() {
    local cluster=$1 node=$2
    RUST_LOG=${RUST_LOG:-info} spawn "$cluster-$node" "$HABLK_BIN" -c "$WORK/$cluster.toml" -n "$node" up
    cluster_node_answers() {
        kill -0 "${SERVER_PID[$cluster-$node]}" 2>/dev/null || die "$cluster $node exited: $(tail -n 5 "$WORK/$cluster-$node.log")"
        hablk_node "$cluster" "$node" status >/dev/null 2>&1
    }
    wait_until 30 "$cluster $node to answer" cluster_node_answers
}

cluster_connected() {
    local cluster=$1 node peers
    peers=$(($(wc -w <<<"${CLUSTER_NODES[$cluster]}") - 1))
    for node in ${CLUSTER_NODES[$cluster]}; do
        [[ $(hablk_node "$cluster" "$node" status --json | grep -o '"connection":"Connected"' | wc -l) -ge $peers ]] || return 1
    done
}

nbd_port_of() { sed -n "/^name = \"$2\"/,/^\\[/p" "$WORK/$1.toml" | sed -n 's/^nbd = "127.0.0.1:\([0-9]*\)"/\1/p'; }

# start_cluster NAME PATH NODES...: starts the nodes and brings the cluster
# to a Primary on alpha (on beta for the failover path) by one of the paths
# a user takes:
#   skip      every data node's disk holds the initial data (identical, as
#             skip-initial-sync requires), skip-initial-sync, primary;
#   sync      only alpha's disk holds the initial data, then primary
#             --force: a real initial (hash) sync copies it, wait-sync;
#   failover  the sync path, then writes, kill -9 of alpha under them,
#             primary on beta, alpha back and resynced: the export is beta's.
start_cluster() {
    local cluster=$1 path=$2 node
    shift 2
    CLUSTER_NODES[$cluster]="$*"
    write_cluster_config "$cluster" "$@"
    if [[ $path == skip ]]; then
        for node in "$@"; do
            [[ $node == witness ]] || fill_initial_data "$WORK/$cluster-$node.img"
        done
    else
        fill_initial_data "$WORK/$cluster-alpha.img"
    fi
    for node in "$@"; do
        hablk_node "$cluster" "$node" create-md >/dev/null
        start_cluster_node "$cluster" "$node"
    done
    wait_until 30 "$cluster to connect" cluster_connected "$cluster"
    if [[ $path == skip ]]; then
        hablk_node "$cluster" alpha skip-initial-sync >/dev/null
        hablk_node "$cluster" alpha primary >/dev/null
    else
        hablk_node "$cluster" alpha primary --force >/dev/null
        hablk_node "$cluster" alpha wait-sync --timeout 600s >/dev/null
    fi
    local primary=alpha
    if [[ $path == failover ]]; then
        fail_over "$cluster"
        primary=beta
    fi
    SERVER_URI[$cluster]="nbd://127.0.0.1:$(nbd_port_of "$cluster" "$primary")/r0"
    wait_until 30 "$cluster's NBD export" nbd_ready "${SERVER_URI[$cluster]}" "${SERVER_PID[$cluster-$primary]}"
}

# fail_over CLUSTER: kill -9 alpha (the Primary) under 4 KiB random writes,
# promote beta, restart alpha and wait until it is resynced. (Small writes:
# 1 MiB writes leave large folios in the page cache that slow later 4 KiB
# writes on any server, the reference servers included, which never get
# such a prelude here.)
fail_over() {
    local cluster=$1 writer
    fio --name=before-failover --ioengine=nbd \
        "--uri=nbd://127.0.0.1:$(nbd_port_of "$cluster" alpha)/r0" --rw=randwrite --bs=4k \
        --iodepth=32 --size=512M --time_based --runtime=30 >"$WORK/$cluster-writer.log" 2>&1 &
    writer=$!
    sleep 2
    kill -KILL "${SERVER_PID[$cluster-alpha]}"
    wait "${SERVER_PID[$cluster-alpha]}" 2>/dev/null || true
    unset "SERVER_PID[$cluster-alpha]"
    wait "$writer" 2>/dev/null || true
    hablk_node "$cluster" beta primary >/dev/null
    start_cluster_node "$cluster" alpha
    hablk_node "$cluster" beta wait-sync --timeout 600s >/dev/null
}

stop_cluster() {
    local cluster=$1 node
    for node in ${CLUSTER_NODES[$cluster]:-}; do
        [[ -n ${SERVER_PID[$cluster-$node]:-} ]] || continue
        hablk_node "$cluster" "$node" down --force >/dev/null 2>&1 || true
        reap "$cluster-$node"
    done
}

server_stop_resync() { stop_cluster resync; }
server_stop_failover() { stop_cluster failover; }
server_start_hablk2() { start_cluster hablk2 skip alpha beta; }
server_stop_hablk2_sync() { stop_cluster hablk2-sync; }
server_start_hablk2_sync() { start_cluster hablk2-sync sync alpha beta; }
server_stop_hablk3_failover() { stop_cluster hablk3-failover; }
server_start_hablk3_failover() { start_cluster hablk3-failover failover alpha beta witness; }
server_stop_hablk2() { stop_cluster hablk2; }
server_start_hablk3() { start_cluster hablk3 skip alpha beta witness; }
server_stop_hablk3() { stop_cluster hablk3; }

server_start_nbdkit() {
    next_port
    new_image "$WORK/A.img"
    spawn nbdkit nbdkit -f -i 127.0.0.1 -p "$PORT" -e '' file "$WORK/A.img"
    SERVER_URI[nbdkit]="nbd://127.0.0.1:$PORT/"
    wait_until 30 "nbdkit" nbd_ready "${SERVER_URI[nbdkit]}" "${SERVER_PID[nbdkit]}"
}

server_stop_nbdkit() { reap nbdkit; }

server_start_qemu_nbd() {
    next_port
    new_image "$WORK/B.img"
    spawn qemu-nbd qemu-nbd -t -f raw --aio=io_uring -b 127.0.0.1 -p "$PORT" -x '' "$WORK/B.img"
    SERVER_URI[qemu-nbd]="nbd://127.0.0.1:$PORT/"
    wait_until 30 "qemu-nbd" nbd_ready "${SERVER_URI[qemu-nbd]}" "${SERVER_PID[qemu-nbd]}"
}

server_stop_qemu_nbd() { reap qemu-nbd; }

# A local file and an nbdkit replica under a quorum of 2: both acknowledge
# every write, the nearest off-the-shelf equivalent of protocol C.
server_start_qsd_quorum() {
    local replica_port
    next_port
    replica_port=$PORT
    next_port
    new_image "$WORK/R.img" "$WORK/C.img"
    spawn qsd-replica nbdkit -f -i 127.0.0.1 -p "$replica_port" -e '' file "$WORK/R.img"
    wait_until 30 "the quorum's nbdkit replica" nbd_ready \
        "nbd://127.0.0.1:$replica_port/" "${SERVER_PID[qsd-replica]}"
    spawn qsd-quorum qemu-storage-daemon \
        --blockdev "{\"driver\":\"file\",\"node-name\":\"lf\",\"filename\":\"$WORK/C.img\",\"aio\":\"io_uring\"}" \
        --blockdev '{"driver":"raw","node-name":"local","file":"lf"}' \
        --blockdev "{\"driver\":\"nbd\",\"node-name\":\"rn\",\"server\":{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"$replica_port\"}}" \
        --blockdev '{"driver":"raw","node-name":"remote","file":"rn"}' \
        --blockdev '{"driver":"quorum","node-name":"q","vote-threshold":2,"children":["local","remote"]}' \
        --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$PORT" \
        --export type=nbd,id=e0,node-name=q,name=,writable=on
    SERVER_URI[qsd-quorum]="nbd://127.0.0.1:$PORT/"
    wait_until 30 "qemu-storage-daemon" nbd_ready "${SERVER_URI[qsd-quorum]}" "${SERVER_PID[qsd-quorum]}"
}

server_stop_qsd_quorum() {
    reap qsd-quorum
    reap qsd-replica
}

# The ceiling: fio's own io_uring engine on a plain file, no NBD.
server_start_file() { new_image "$WORK/F.img"; }
server_stop_file() { :; }
fio_target_file() { printf '%s\n' --ioengine=io_uring "--filename=$WORK/F.img"; }

fn_name() { printf '%s' "${1//-/_}"; }

start_server() {
    local name=$1 fn
    fn=server_start_$(fn_name "$name")
    declare -F "$fn" >/dev/null || die "unknown server: $name"
    "$fn"
    STARTED+=("$name")
}

stop_all() {
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        "server_stop_$(fn_name "${STARTED[i]}")" || true
    done
    STARTED=()
}

# Prints the fio options that select a server's target, one per line.
fio_target() {
    local name=$1 fn
    fn=fio_target_$(fn_name "$name")
    if declare -F "$fn" >/dev/null; then
        "$fn"
    else
        printf '%s\n' --ioengine=nbd "--uri=${SERVER_URI[$name]}"
    fi
}

# ------------------------------------------------------------------- runner

# Prints "IOPS BW_BYTES P50_NS" from fio's JSON output (the nbd engine may
# print other lines before the JSON).
parse_fio() {
    "$PY" - "$1" <<'PY'
import json, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
start = text.find("{")
if start < 0:
    sys.exit("no JSON in fio output")
data, _ = json.JSONDecoder().raw_decode(text[start:])
job = data["jobs"][0]
if job.get("error"):
    sys.exit(f"fio job error {job['error']}")
side = "read" if job["job options"]["rw"].endswith("read") else "write"
stats = job[side]
p50 = stats.get("lat_ns", {}).get("percentile", {}).get("50.000000", 0)
print(f"{stats['iops']:.1f} {stats['bw_bytes']} {p50}")
PY
}

# run_fio SERVER WORKLOAD REP: one fio run, appended to the results.
run_fio() {
    local server=$1 workload=$2 rep=$3 out target=() args=() result iops bw p50
    out="$WORK/fio-$server-$workload-$rep.txt"
    mapfile -t target < <(fio_target "$server")
    read -ra args <<<"${WORKLOAD_ARGS[$workload]}"
    sync -f "$WORK"
    if ! fio --name="$workload" "${target[@]}" "${args[@]}" \
        --size="$FIO_SIZE" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --lat_percentiles=1 --output-format=json >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        die "fio failed: $server $workload (rep $rep)"
    fi
    result=$(parse_fio "$out") || die "cannot parse $out"
    printf '%s\t%s\t%s\t%s\n' "$server" "$workload" "$rep" "${result// /$'\t'}" >>"$WORK/results.tsv"
    read -r iops bw p50 <<<"$result"
    printf '  rep %s/%s  %-9s %-11s %10.0f IOPS %9.1f MiB/s  p50 %7.1f us\n' \
        "$rep" "$REPS" "$workload" "$server" "$iops" "$(awk "BEGIN{print $bw/1048576}")" \
        "$(awk "BEGIN{print $p50/1000}")"
}

# ------------------------------------------------------- resync and failover

# Resync: beta leaves cleanly, alpha takes 512 MiB of random writes, beta
# returns; time from beta's return to wait-sync, and bytes sent vs written.
measure_resync() {
    local cluster=resync started elapsed oos sent written
    # Two nodes keep writing with one gone only without quorum (DRBD's
    # two-node setup).
    CLUSTER_EXTRA='quorum = "off"' start_cluster "$cluster" skip alpha beta
    STARTED+=("$cluster")
    hablk_node "$cluster" beta down >/dev/null
    reap "$cluster-beta"
    fio --name=dirty --ioengine=nbd "--uri=${SERVER_URI[$cluster]}" --rw=write --bs=1M --iodepth=8 \
        --size=512M --output-format=json >"$WORK/fio-resync.txt" 2>&1 || die "fio (resync) failed"
    written=$(parse_fio_written "$WORK/fio-resync.txt")
    oos=$(hablk_node "$cluster" alpha status --json | sed -n 's/.*"out_of_sync_bytes":\([0-9]*\).*/\1/p')
    # Earlier runs' dirty pages would otherwise be written back during the
    # resync and be counted against it.
    sync
    started=$(date +%s%N)
    start_cluster_node "$cluster" beta
    # beta comes up Consistent and is UpToDate only once resynced.
    hablk_node "$cluster" beta wait-sync --timeout 600s >/dev/null
    elapsed=$(( $(date +%s%N) - started ))
    sent=$(sed -n 's/.*resync done (source).*data_bytes_sent=\([0-9]*\).*/\1/p' "$WORK/$cluster-alpha.log" | tail -n 1)
    "$PY" - "$written" "$oos" "${sent:-0}" "$elapsed" "$WORK/$cluster-alpha.log" <<'PY'
import re, sys
from datetime import datetime
written, oos, sent, elapsed_ns = (int(x) for x in sys.argv[1:5])
seconds = elapsed_ns / 1e9
# The streaming itself, from the source's log: its last "streaming" line to
# its "resync done (source)" line.
stamps = {}
for line in open(sys.argv[5], encoding="utf-8", errors="replace"):
    for key, text in (("start", "resync: streaming"), ("end", "resync done (source)")):
        if text in line:
            stamps[key] = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*Z", r"\1+00:00", line.split()[0]))
print(f"  written while beta was away:  {written / 2**20:9.1f} MiB")
print(f"  out of sync (bitmap):         {oos / 2**20:9.1f} MiB")
print(f"  resync data sent:             {sent / 2**20:9.1f} MiB  ({sent / written if written else 0:.3f} x written)")
print(f"  beta up -> in sync:           {seconds:9.2f} s  ({oos / seconds / 2**30 if seconds else 0:.2f} GiB/s of dirty data, reconnect included)")
if "start" in stamps and "end" in stamps:
    streaming = (stamps["end"] - stamps["start"]).total_seconds()
    if streaming > 0:
        print(f"  streaming the resync:         {streaming:9.2f} s  ({sent / streaming / 2**30:.2f} GiB/s)")
PY
    stop_cluster "$cluster"
}

parse_fio_written() {
    "$PY" - "$1" <<'PY'
import json, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
data, _ = json.JSONDecoder().raw_decode(text[text.find("{"):])
print(data["jobs"][0]["write"]["io_bytes"])
PY
}

# Failover: a clean handover (the promotion alone), then kill -9 of the
# Primary under writes and `primary` on the other node at once, timed to
# the first successful write there.
measure_failover() {
    local cluster=failover t0 t1 t2 t3 beta_uri
    start_cluster "$cluster" skip alpha beta witness
    STARTED+=("$cluster")
    beta_uri="nbd://127.0.0.1:$(nbd_port_of "$cluster" beta)/r0"
    hablk_node "$cluster" alpha secondary >/dev/null
    t0=$(date +%s%N)
    hablk_node "$cluster" beta primary >/dev/null
    t1=$(date +%s%N)
    hablk_node "$cluster" beta secondary >/dev/null
    hablk_node "$cluster" alpha primary >/dev/null
    "$REPO_ROOT/target/release/hablk-durability" write --uri "${SERVER_URI[$cluster]}" \
        --journal "$WORK/failover.journal" --blocks 4096 --depth 32 >"$WORK/failover-writer.log" 2>&1 &
    local writer=$!
    sleep 2
    t2=$(date +%s%N)
    kill -KILL "${SERVER_PID[$cluster-alpha]}"
    wait "${SERVER_PID[$cluster-alpha]}" 2>/dev/null || true
    unset "SERVER_PID[$cluster-alpha]"
    hablk_node "$cluster" beta primary >/dev/null
    until qemu-io -f raw -c "write -P 0x7f 512M 4k" "$beta_uri" >/dev/null 2>&1; do sleep 0.01; done
    t3=$(date +%s%N)
    wait "$writer" || true
    "$REPO_ROOT/target/release/hablk-durability" verify --uri "$beta_uri" --journal "$WORK/failover.journal" \
        >"$WORK/failover-verify.log" 2>&1 || die "durability check failed: $(cat "$WORK/failover-verify.log")"
    printf '  clean handover (primary on the other node):   %6.1f ms\n' "$(awk "BEGIN{print ($t1-$t0)/1e6}")"
    printf '  kill -9 of the Primary -> first write on beta: %6.1f ms (ping timeout 1 s: includes the lease wait)\n' \
        "$(awk "BEGIN{print ($t3-$t2)/1e6}")"
    printf '  %s\n' "$(tail -n 1 "$WORK/failover-verify.log")"
    stop_cluster "$cluster"
}

# --------------------------------------------------------------- reporting

print_table() {
    "$PY" - "$WORK/results.tsv" "$REPS" "$RUNTIME" "$RAMP" "${SERVERS[*]}" "${WORKLOADS[*]}" <<'PY'
import statistics, sys
path, reps, runtime, ramp = sys.argv[1:5]
servers, workloads = sys.argv[5].split(), sys.argv[6].split()
runs = {}
for line in open(path):
    if not line.strip():
        continue
    server, workload, _rep, iops, bw, p50 = line.split("\t")
    runs.setdefault((server, workload), []).append((float(iops), float(bw), float(p50)))

def med(server, workload, index):
    values = [r[index] for r in runs.get((server, workload), [])]
    return statistics.median(values) if values else None

# (label, workload, value index, scale, higher is better)
rows = []
for w in workloads:
    if w == "randwrite":
        rows.append(("4 KiB randwrite QD32, IOPS", w, 0, 1, True))
    elif w == "randread":
        rows.append(("4 KiB randread QD32, IOPS", w, 0, 1, True))
    elif w == "seqwrite":
        rows.append(("1 MiB seq write QD8, MiB/s", w, 1, 1 / 1048576, True))
    elif w == "qd1write":
        rows.append(("4 KiB randwrite QD1, IOPS", w, 0, 1, True))
        rows.append(("4 KiB randwrite QD1, p50 us (lower is better)", w, 2, 1 / 1000, False))

subjects = [s for s in servers if s.startswith("hablk")]
peers = [s for s in servers if not s.startswith("hablk")]
pairs = [(s, p) for s in subjects for p in peers]

def fmt(value):
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"

def print_rows(table):
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(widths[i]) for i, c in enumerate(row) if i]
        print("  ".join(cells))
        if n == 0:
            print("  ".join("-" * w for w in widths))

values = {(s, w, index): med(s, w, index) for s in servers for _, w, index, _, _ in rows}
table = [["workload (median)"] + servers]
for label, w, index, scale, higher in rows:
    table.append([label] + [
        fmt(None if values[(s, w, index)] is None else values[(s, w, index)] * scale)
        for s in servers
    ])
print(f"\nMedians of {reps} run(s) per cell, {runtime} s each after {ramp} s ramp; "
      "fio nbd engine, --size=512M, 1 GiB files.\n")
print_rows(table)

if pairs:
    short = {"4 KiB randwrite QD32, IOPS": "randwrite", "4 KiB randread QD32, IOPS": "randread",
             "1 MiB seq write QD8, MiB/s": "seqwrite", "4 KiB randwrite QD1, IOPS": "QD1 IOPS",
             "4 KiB randwrite QD1, p50 us (lower is better)": "QD1 p50"}
    table = [["hablk / peer"] + [short.get(label, label) for label, *_ in rows]]
    for s, p in pairs:
        line = [f"{s} / {p}"]
        for label, w, index, scale, higher in rows:
            a, b = values[(s, w, index)], values[(p, w, index)]
            line.append("-" if a is None or b is None or b == 0 else f"{a / b:.2f}")
        table.append(line)
    print("\nRatios hablk / peer: above 1 is better for hablk, except QD1 p50 "
          "(a latency: below 1 is better).\n")
    print_rows(table)
PY
}

# ------------------------------------------------------------------- main

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    stop_all
    if [[ -n $WORK ]]; then
        if [[ -n $KEEP ]]; then
            printf 'work dir kept: %s\n' "$WORK" >&2
        elif [[ $rc -ne 0 ]]; then
            # Keep the logs and fio output for a look, not the disk images.
            rm -f "$WORK"/*.img
            printf 'logs kept in %s\n' "$WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "checking packages"
ensure_packages fio libnbd-bin nbdkit qemu-utils
for server in "${SERVERS[@]}"; do
    if [[ $server == qsd-quorum ]]; then
        ensure_packages qemu-system-common
    fi
done

step "building hablk (release)"
HABLK_BIN=$(build_release)
(cd "$REPO_ROOT" && cargo build --release --quiet --bin hablk-durability) >&2
"$HABLK_BIN" --version

mkdir -p "$PARENT_DIR"
WORK=$(mktemp -d "$PARENT_DIR/hablk-bench.XXXXXX")
: >"$WORK/results.tsv"

step "starting servers in $WORK ($(stat -f -c %T "$WORK"))"
for server in "${SERVERS[@]}"; do
    start_server "$server"
    printf '  %-11s %s\n' "$server" "${SERVER_URI[$server]:-(no NBD: fio on the file)}"
done

runs=$((REPS * ${#WORKLOADS[@]} * ${#SERVERS[@]}))
step "running $runs fio runs of ${RUNTIME}s (+${RAMP}s ramp), interleaved"
for ((rep = 1; rep <= REPS; rep++)); do
    for workload in "${WORKLOADS[@]}"; do
        # Rotate the server order each repetition so that none always runs
        # first (or right after another's writeback).
        n=${#SERVERS[@]}
        for ((i = 0; i < n; i++)); do
            run_fio "${SERVERS[$(((i + rep - 1) % n))]}" "$workload" "$rep"
        done
    done
done

step "results ($((SECONDS / 60)) min $((SECONDS % 60)) s in all)"
printf 'host: %s, %s cores, kernel %s; hablk %s (%s), io = %s\n' \
    "$(hostname)" "$(nproc)" "$(uname -r)" \
    "$("$HABLK_BIN" --version | awk '{print $2}')" \
    "$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "${HABLK_IO:-default}"
for server in "${SERVERS[@]}"; do
    printf '  %-11s = %s\n' "$server" "${SERVER_TITLE[$server]:-$server}"
done
print_table

if [[ -n $RESYNC ]]; then
    step "resync: 512 MiB written while the Secondary was down, then it returns"
    measure_resync
fi
if [[ -n $FAILOVER ]]; then
    step "failover (2 data nodes + witness)"
    measure_failover
fi
