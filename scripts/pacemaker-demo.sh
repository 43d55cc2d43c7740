#!/usr/bin/env bash
# hablk under Pacemaker: a real Pacemaker + Corosync cluster of three nodes
# on this machine (alpha and beta hold data, witness only votes), each node
# in its own namespaces (scripts/pacemaker-cluster.sh). hablk runs as a
# promotable clone (ocf:hablk:hablk) with an ext4 Filesystem and a Dummy
# application on the Promoted node. Then the Promoted node is killed
# outright (Pacemaker, Corosync and hablk at once): the demo times how long
# until the filesystem is mounted on the other data node, checks every
# file there, restarts the killed node and waits until it is back in sync
# as Unpromoted.
#
# Without the kernel nbd module the agent attaches the export through
# nbdfuse and a loop device; with it, through nbd-client. Either way the
# Filesystem resource names /dev/hablk/r0.
#
# Needs root (namespaces, loop devices, mount); takes about 25 s after the
# build. KEEP=1 leaves the cluster running at the end (take it down with
# scripts/pacemaker-cluster.sh down DIR).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

CLUSTER="$REPO_ROOT/scripts/pacemaker-cluster.sh"
NODES=(alpha beta witness)
DATA_NODES=(alpha beta)

D=""
UP_PIDS=()
LOOPS=()

cluster() { "$CLUSTER" "$@"; }
# on NODE CMD...: runs CMD inside NODE's namespaces.
on() {
    local node=$1
    shift
    "$CLUSTER" exec "$D" "$node" "$@"
}
hablk_on() {
    local node=$1
    shift
    on "$node" hablk -c "$D/r0.toml" "$@"
}
node_log() { printf '%s/%s/var-log/hablk/r0-%s.log' "$D" "$1" "$1"; }

# cluster_resources NODE: "ID ROLE NODE" for every running resource
# instance, as NODE's Pacemaker sees the cluster.
cluster_resources() {
    on "$1" crm_mon -1 --output-as=xml 2>/dev/null | awk '
        function attr(name) {
            if (!match($0, name "=\"[^\"]*\"")) return ""
            return substr($0, RSTART + length(name) + 2, RLENGTH - length(name) - 3)
        }
        /<resource / { id = attr("id"); role = attr("role"); open = ($0 !~ /\/>[[:space:]]*$/); next }
        /<\/resource>/ { open = 0; next }
        /<node name=/ && open { print id, role, attr("name") }
    '
}

# has_resource ASKED_NODE "ID ROLE NODE"
has_resource() { cluster_resources "$1" | grep -qxF "$2"; }

promoted_node() { cluster_resources "$1" | awk '$1 == "vol" && $2 == "Promoted" { print $3 }'; }

mounted_on() { on "$1" findmnt -n "$D/mnt" >/dev/null 2>&1; }

answers() { hablk_on "$1" status >/dev/null 2>&1; }

all_connected() {
    local node
    for node in "${NODES[@]}"; do
        [[ $(hablk_on "$node" status --json 2>/dev/null | grep -o '"connection":"Connected"' | wc -l) -eq 2 ]] ||
            return 1
    done
}

# promotion_score NODE: the score the agent set for NODE (empty if none).
promotion_score() { on "$SURVIVOR" crm_attribute --promotion=vol --node "$1" --query --quiet 2>/dev/null; }

# back_in_sync NODE: NODE is Unpromoted in Pacemaker with the score of an
# UpToDate Secondary and, in hablk, a Secondary with an UpToDate disk,
# connected to both peers, no resync running.
back_in_sync() {
    local node=$1 json top
    has_resource "$SURVIVOR" "vol Unpromoted $node" || return 1
    [[ $(promotion_score "$node") == 1000 ]] || return 1
    json=$(hablk_on "$node" status --json 2>/dev/null) || return 1
    top=${json%%\"peers\"*}
    [[ $top == *'"role":"Secondary"'* && $top == *'"disk":"UpToDate"'* ]] || return 1
    [[ $(grep -o '"connection":"Connected"' <<<"$json" | wc -l) -eq 2 ]] || return 1
    [[ $json != *'"replication":"Sync'* ]]
}

# The loop devices the agent attached on a Promoted node (nbdfuse mode), as
# DEVICE:DISKSEQ. `pacemaker-cluster.sh down` detaches them; cleanup makes
# sure none is left. The kernel's disk sequence number changes with every
# attachment, so it tells ours from a later one of the same device.
remember_loop() {
    local dev seq
    dev=$(on "$1" readlink /dev/hablk/r0 2>/dev/null) || return 0
    [[ $dev == /dev/loop* ]] || return 0
    seq=$(cat "/sys/block/${dev#/dev/}/diskseq" 2>/dev/null) || return 0
    LOOPS+=("$dev:$seq")
}
# loop_released DEVICE:DISKSEQ: detaches that attachment if it is still
# there (a file system of a killed node may hold it a moment longer).
loop_released() {
    local dev=${1%:*} seq=${1##*:} sys
    sys=/sys/block/${dev#/dev/}
    [[ -e $sys/loop && $(cat "$sys/diskseq" 2>/dev/null) == "$seq" ]] || return 0
    losetup -d "$dev" 2>/dev/null
    return 1
}
release_leftover_loops() {
    local entry
    for entry in "${LOOPS[@]}"; do
        wait_until 10 "${entry%:*} to be detached" loop_released "$entry" || true
    done
}

ms_since() { printf '%s' $((($(date +%s%N) - $1) / 1000000)); }

cleanup() {
    local rc=$? node asked=""
    trap - EXIT INT TERM
    set +e
    if [[ $rc -ne 0 && -n $D && -f $D/cluster.env ]]; then
        printf '\n*** demo FAILED (exit %s); cleaning up\n' "$rc" >&2
        for node in "${NODES[@]}"; do
            if on "$node" true 2>/dev/null; then
                asked=$node
                break
            fi
        done
        if [[ -n $asked ]]; then
            printf -- '--- crm_mon on %s:\n' "$asked" >&2
            on "$asked" crm_mon -1 --show-detail >&2 2>&1
        fi
        for node in "${NODES[@]}"; do
            [[ -f $(node_log "$node") ]] || continue
            printf -- '--- last lines of %s'"'"'s hablk log:\n' "$node" >&2
            tail -n 12 "$(node_log "$node")" >&2
        done
    fi
    if [[ -n $D ]]; then
        if [[ -n ${KEEP:-} && -f $D/cluster.env ]]; then
            printf 'the cluster is still running; take it down with: %s down %s\n' "$CLUSTER" "$D"
        else
            cluster down "$D" >/dev/null 2>&1
            release_leftover_loops
            rm -rf "$D"
        fi
    fi
    for pid in "${UP_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $EUID -eq 0 ]] || die "the demo needs root (namespaces, loop devices, mount)"

step "1. checking packages"
# kmod brings modprobe, which the Filesystem agent calls.
ensure_packages pacemaker pacemaker-cli-utils corosync crmsh resource-agents kmod \
    libnbd-bin fuse3 e2fsprogs util-linux iproute2

step "2. building hablk (release)"
cargo build --release --quiet --bins
target_dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
[[ $target_dir == /* ]] || target_dir="$REPO_ROOT/$target_dir"
export HABLK_BIN="$target_dir/release/hablk"
"$HABLK_BIN" --version
demo_start=$SECONDS

step "3. a Pacemaker + Corosync cluster: alpha, beta and witness, each in its own namespaces"
D=$(mktemp -d -t hablk-pacemaker.XXXXXX)
start=$(date +%s%N)
cluster up "$D" "${NODES[@]}"
printf 'all 3 nodes online after %s ms (no fencing: stonith-enabled=false, a test cluster)\n' "$(ms_since "$start")"

step "4. the hablk config (the same file on every node) and create-md on every node"
{
    printf '[resource]\nname = "r0"\nping-timeout = "1s"\n'
    id=0
    for node in "${DATA_NODES[@]}"; do
        printf '\n[[node]]\nname = "%s"\nid = %s\naddress = "%s:7789"\nnbd = "127.0.0.1:10809"\ndisk = "%s"\n' \
            "$node" "$id" "$(cluster ip "$D" "$node")" "$D/$node/disk.img"
        id=$((id + 1))
    done
    printf '\n[[node]]\nname = "witness"\nid = 2\naddress = "%s:7789"\nmeta = "%s"\n' \
        "$(cluster ip "$D" witness)" "$D/witness/witness.meta"
} >"$D/r0.toml"
sed 's/^/    /' "$D/r0.toml"
truncate -s 128M "$D/alpha/disk.img" "$D/beta/disk.img"
# alpha holds data already: the initial sync has something to copy.
head -c 32M /dev/urandom | dd of="$D/alpha/disk.img" conv=notrunc status=none
for node in "${NODES[@]}"; do
    printf '%s: ' "$node"
    hablk_on "$node" create-md
done

step "5. the initial sync, by hand, before Pacemaker manages the resource"
printf 'hablk up on every node; alpha'"'"'s data is the truth: primary --force there, then wait-sync\n'
# up_answers PID NODE: the daemon started in the background answers.
up_answers() {
    kill -0 "$1" 2>/dev/null || die "hablk up on $2 exited: $(tail -n 5 "$(node_log "$2")")"
    answers "$2"
}
for node in "${NODES[@]}"; do
    on "$node" hablk -c "$D/r0.toml" up >>"$(node_log "$node")" 2>&1 &
    UP_PIDS+=($!)
    wait_until 30 "$node to answer" up_answers "$!" "$node"
done
wait_until 30 "every node to connect to the others" all_connected
hablk_on alpha primary --force
hablk_on alpha wait-sync --timeout 60s
hablk_on alpha status
printf 'then secondary on alpha and down everywhere: Pacemaker starts the daemons from now on\n'
hablk_on alpha secondary
for node in "${NODES[@]}"; do hablk_on "$node" down; done
for pid in "${UP_PIDS[@]}"; do wait "$pid" || true; done
UP_PIDS=()
a=$(head -c 32M "$D/alpha/disk.img" | sha256sum | cut -c1-16)
b=$(head -c 32M "$D/beta/disk.img" | sha256sum | cut -c1-16)
printf 'first 32 MiB: alpha %s, beta %s\n' "$a" "$b"
[[ $a == "$b" ]] || die "beta's data differs from alpha's after the initial sync"

step "6. the promotable clone over all three nodes (crm configure)"
cat >"$D/vol.crm" <<EOF
primitive vol ocf:hablk:hablk params config=$D/r0.toml \\
    op monitor interval=5s role=Promoted op monitor interval=6s role=Unpromoted
clone vol-clone vol meta promotable=true promoted-max=1 clone-max=3 notify=true
EOF
sed 's/^/    /' "$D/vol.crm"
printf '(crm warns "Blind faith: not fencing unseen nodes": this test cluster runs without fencing)\n'
start=$(date +%s%N)
on alpha crm configure load update "$D/vol.crm"

step "7. Pacemaker starts hablk everywhere and promotes a data node; mkfs.ext4 there"
promoted() { [[ -n $(promoted_node alpha) ]]; }
wait_until 60 "a node to be Promoted" promoted
PRIMARY=$(promoted_node alpha)
printf '%s is Promoted after %s ms\n' "$PRIMARY" "$(ms_since "$start")"
has_block_device() { on "$PRIMARY" test -b /dev/hablk/r0; }
wait_until 20 "/dev/hablk/r0 on $PRIMARY" has_block_device
printf '/dev/hablk/r0 on %s -> %s\n' "$PRIMARY" "$(on "$PRIMARY" readlink /dev/hablk/r0)"
remember_loop "$PRIMARY"
on "$PRIMARY" mkfs.ext4 -q -F -L hablk-pcmk /dev/hablk/r0

step "8. a Filesystem and an application, colocated with and ordered after the Promoted role"
mkdir -p "$D/mnt"
cat >"$D/fs.crm" <<EOF
primitive fs ocf:heartbeat:Filesystem params device=/dev/hablk/r0 directory=$D/mnt fstype=ext4 \\
    op monitor interval=10s
primitive app ocf:heartbeat:Dummy op monitor interval=10s
colocation fs-with-vol inf: fs vol-clone:Promoted
order vol-before-fs Mandatory: vol-clone:promote fs:start
colocation app-with-fs inf: app fs
order fs-before-app Mandatory: fs app
EOF
sed 's/^/    /' "$D/fs.crm"
on alpha crm configure load update "$D/fs.crm"
fs_up() {
    has_resource alpha "app Started $PRIMARY" && mounted_on "$PRIMARY"
}
wait_until 60 "fs and app to start on $PRIMARY" fs_up
on "$PRIMARY" findmnt "$D/mnt"

step "9. files written on $PRIMARY, checksummed, sync -f"
# shellcheck disable=SC2016 # expanded by the shell inside the node
on "$PRIMARY" sh -c '
    set -e
    cd "$1"
    mkdir -p data
    i=1
    while [ "$i" -le 40 ]; do
        head -c $((i * 37 * 1024 + i)) /dev/urandom >"data/f$i"
        i=$((i + 1))
    done
    head -c 8M /dev/urandom >data/big.bin
    find data -type f | sort | xargs sha256sum >"$2"
    for f in data/*; do sync -f "$f"; done
' sh "$D/mnt" "$D/sums"
printf '%s files written and synced\n' "$(wc -l <"$D/sums")"

step "10. the cluster as Pacemaker sees it"
on "$PRIMARY" crm_mon -1

SURVIVOR=alpha
[[ $PRIMARY == alpha ]] && SURVIVOR=beta
step "11. kill $PRIMARY outright (Pacemaker, Corosync, hablk and the mount, all at once)"
start=$(date +%s%N)
cluster kill "$D" "$PRIMARY"
failed_over() {
    has_resource "$SURVIVOR" "fs Started $SURVIVOR" && mounted_on "$SURVIVOR"
}
wait_until 60 "the filesystem to be mounted on $SURVIVOR" failed_over
FAILOVER_MS=$(ms_since "$start")
printf 'the filesystem is mounted on %s %s ms after the kill\n' "$SURVIVOR" "$FAILOVER_MS"
remember_loop "$SURVIVOR"
hablk_on "$SURVIVOR" status

step "12. every file on $SURVIVOR, checked against its checksum"
# shellcheck disable=SC2016
on "$SURVIVOR" sh -c 'cd "$1" && sha256sum --quiet -c "$2"' sh "$D/mnt" "$D/sums"
printf 'all %s checksums match on %s\n' "$(wc -l <"$D/sums")" "$SURVIVOR"

step "13. $PRIMARY comes back: Pacemaker starts hablk there, it resyncs and stays Unpromoted"
printf '(done when it is Connected and UpToDate, and has the promotion score 1000 again)\n'
cluster start "$D" "$PRIMARY"
start=$(date +%s%N)
wait_until 90 "$PRIMARY to be Unpromoted, Connected and UpToDate" back_in_sync "$PRIMARY"
printf '%s is back in sync %s ms after its restart\n' "$PRIMARY" "$(ms_since "$start")"
hablk_on "$PRIMARY" status

step "14. the cluster at the end, with the promotion scores (master-vol)"
on "$SURVIVOR" crm_mon -1 --show-node-attributes

step "demo finished in $((SECONDS - demo_start)) s: failover in ${FAILOVER_MS} ms with every file intact, and the old Primary resynced"
