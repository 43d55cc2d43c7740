#!/usr/bin/env bash
# The hablk tour: a three-node cluster (two data nodes and a diskless
# witness) on this machine, an ext4 filesystem on the Primary's NBD export,
# then `kill -9` of the Primary in the middle of a stream of writes, the
# promotion of the other data node, proof that every acknowledged byte is
# there, and the old Primary's return and resync.
#
# The nodes run in a private network namespace (127.0.0.1/.2/.3), so the
# demo touches nothing of the host's network. Without the kernel nbd module
# the disk is reached through nbdfuse (NBD -> a file) and a loop device;
# with the module, `nbd-client IP PORT /dev/nbd0 -N r0` does the same.
#
# Needs root (namespaces, loop devices, mount). KEEP=1 keeps the temp dir.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

# Packages and the build need the host's network; the cluster then runs
# in a private network namespace with only `lo` up.
if [[ -z ${HABLK_DEMO_NETNS:-} ]]; then
    [[ $EUID -eq 0 ]] || die "the demo needs root (namespaces, loop devices, mount)"
    step "1. checking packages"
    ensure_packages libnbd-bin fuse3 e2fsprogs util-linux iproute2

    step "2. building hablk and the durability checker (release)"
    cargo build --release --quiet --bins
    exec unshare -n env HABLK_DEMO_NETNS=1 "$0" "$@"
fi
ip link set lo up

NODES=(alpha beta witness)
declare -A IP=([alpha]=127.0.0.1 [beta]=127.0.0.2 [witness]=127.0.0.3)
declare -A PID=()
NBD_PORT=10809

DIR=""
BIN_DIR=""
NBDFUSE_PID=""
LOOP=""
MOUNTED=""
WRITER_PID=""

hablk() { local node=$1; shift; "$BIN_DIR/hablk" -c "$DIR/hablk.toml" -n "$node" "$@"; }
uri() { printf 'nbd://%s:%s/r0' "${IP[$1]}" "$NBD_PORT"; }

detach_disk() {
    if [[ -n $MOUNTED ]]; then
        umount "$DIR/mnt" 2>/dev/null || umount -l "$DIR/mnt"
        MOUNTED=""
    fi
    if [[ -n $LOOP ]]; then
        losetup -d "$LOOP" 2>/dev/null || true
        LOOP=""
    fi
    if [[ -n $NBDFUSE_PID ]]; then
        fusermount3 -u "$DIR/fuse" 2>/dev/null || fusermount3 -uz "$DIR/fuse" 2>/dev/null || true
        wait "$NBDFUSE_PID" 2>/dev/null || true
        NBDFUSE_PID=""
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ $rc -ne 0 ]]; then
        printf '\n*** demo FAILED (exit %s); cleaning up\n' "$rc" >&2
        for node in "${NODES[@]}"; do
            [[ -f $DIR/$node.log ]] || continue
            printf -- '--- last lines of %s.log:\n' "$node" >&2
            tail -n 12 "$DIR/$node.log" >&2
        done
    fi
    [[ -n $WRITER_PID ]] && kill "$WRITER_PID" 2>/dev/null
    detach_disk
    for node in "${NODES[@]}"; do
        [[ -n ${PID[$node]:-} ]] || continue
        hablk "$node" down --force >/dev/null 2>&1 || kill -TERM "${PID[$node]}" 2>/dev/null
        wait "${PID[$node]}" 2>/dev/null
    done
    if [[ -n $DIR ]]; then
        if [[ -n ${KEEP:-} ]]; then printf 'kept %s\n' "$DIR"; else rm -rf "$DIR"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_node() {
    local node=$1
    # The binary itself, not a shell function: $! must be the daemon's PID.
    RUST_LOG=${RUST_LOG:-info} "$BIN_DIR/hablk" -c "$DIR/hablk.toml" -n "$node" up >>"$DIR/$node.log" 2>&1 &
    PID[$node]=$!
    answers() {
        kill -0 "${PID[$node]}" 2>/dev/null || die "$node exited: $(tail -n 5 "$DIR/$node.log")"
        hablk "$node" status >/dev/null 2>&1
    }
    wait_until 30 "$node to answer" answers
}

all_connected() {
    for node in "${NODES[@]}"; do
        [[ $(hablk "$node" status --json | grep -o '"connection":"Connected"' | wc -l) -eq 2 ]] || return 1
    done
}

attach_disk() {
    local node=$1
    nbdfuse -P "$DIR/nbdfuse.pid" "$DIR/fuse/disk" "$(uri "$node")" &
    NBDFUSE_PID=$!
    nbdfuse_ready() {
        kill -0 "$NBDFUSE_PID" 2>/dev/null || die "nbdfuse exited"
        [[ -s $DIR/nbdfuse.pid && -e $DIR/fuse/disk ]]
    }
    wait_until 30 "nbdfuse to serve $(uri "$node")" nbdfuse_ready
    LOOP=$(losetup -f --show "$DIR/fuse/disk")
}

BIN_DIR="$REPO_ROOT/target/release"
"$BIN_DIR/hablk" --version

step "3. a three-node config: alpha and beta hold data, witness only votes"
DIR=$(mktemp -d -t hablk-demo.XXXXXX)
mkdir -p "$DIR/fuse" "$DIR/mnt"
{
    printf '[resource]\nname = "r0"\nping-timeout = "1s"\n'
    for node in alpha beta; do
        truncate -s 256M "$DIR/$node.img"
        printf '\n[[node]]\nname = "%s"\nid = %s\naddress = "%s:7789"\nnbd = "%s:%s"\ndisk = "%s"\ncontrol = "%s"\n' \
            "$node" "$([[ $node == alpha ]] && echo 0 || echo 1)" "${IP[$node]}" "${IP[$node]}" "$NBD_PORT" \
            "$DIR/$node.img" "$DIR/$node.sock"
    done
    printf '\n[[node]]\nname = "witness"\nid = 2\naddress = "%s:7789"\nmeta = "%s"\ncontrol = "%s"\n' \
        "${IP[witness]}" "$DIR/witness.meta" "$DIR/witness.sock"
} >"$DIR/hablk.toml"
sed 's/^/    /' "$DIR/hablk.toml"

step "4. create-md and up on every node"
for node in "${NODES[@]}"; do
    hablk "$node" create-md
    start_node "$node"
done
wait_until 30 "every node to connect to the others" all_connected
hablk alpha status

step "5. skip-initial-sync (new, empty disks) and primary on alpha"
hablk alpha skip-initial-sync
hablk alpha primary

step "6. ext4 on alpha's export (nbdfuse -> loop), files written and synced"
attach_disk alpha
mkfs.ext4 -q -F -L hablk-demo "$LOOP" 200M  # the last MiBs stay free for step 7
mount "$LOOP" "$DIR/mnt"
MOUNTED=1
head -c 32M /dev/urandom >"$DIR/mnt/big.bin"
for i in $(seq 1 100); do
    mkdir -p "$DIR/mnt/tree/d$((i % 10))"
    head -c $((RANDOM * 4 + i)) /dev/urandom >"$DIR/mnt/tree/d$((i % 10))/f$i"
done
(cd "$DIR/mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$DIR/sums"
while IFS= read -r -d '' file; do sync -f "$file"; done < <(find "$DIR/mnt" -type f -print0)
printf '%s files written and synced\n' "$(wc -l <"$DIR/sums")"
detach_disk

step "7. a stream of numbered writes to alpha, and kill -9 alpha in the middle of it"
"$BIN_DIR/hablk-durability" write --uri "$(uri alpha)" --journal "$DIR/journal" \
    --first-block 60000 --blocks 2048 --depth 64 --seed "$RANDOM" &
WRITER_PID=$!
sleep 2
kill -9 "${PID[alpha]}"
wait "${PID[alpha]}" 2>/dev/null || true
PID[alpha]=""
start=$(date +%s%N)
wait "$WRITER_PID" || true
WRITER_PID=""

step "8. hablk primary on beta (it waits out alpha's lease, then records a new generation)"
hablk beta primary
printf 'promoted %s ms after the kill\n' "$(( ($(date +%s%N) - start) / 1000000 ))"
hablk beta status

step "9. every acknowledged write is on beta"
"$BIN_DIR/hablk-durability" verify --uri "$(uri beta)" --journal "$DIR/journal"

step "10. the filesystem on beta: fsck.ext4 -n -f, then every checksum"
attach_disk beta
fsck.ext4 -n -f "$LOOP"
mount "$LOOP" "$DIR/mnt"
MOUNTED=1
(cd "$DIR/mnt" && sha256sum --quiet -c "$DIR/sums")
printf 'all %s checksums match on beta\n' "$(wc -l <"$DIR/sums")"
detach_disk

step "11. alpha comes back: it reconnects, sees the newer generation and resyncs"
start_node alpha
hablk alpha wait-sync --timeout 60s
hablk alpha status
size=$(hablk beta status --json | sed -n 's/.*"size_bytes":\([0-9]*\).*/\1/p')
a=$(head -c "$size" "$DIR/alpha.img" | md5sum | cut -d' ' -f1)
b=$(head -c "$size" "$DIR/beta.img" | md5sum | cut -d' ' -f1)
printf 'data areas: alpha %s, beta %s\n' "$a" "$b"
[[ $a == "$b" ]] || die "alpha and beta differ after the resync"

step "12. shutting down"
for node in beta alpha witness; do
    hablk "$node" down
    wait "${PID[$node]}" || true
    PID[$node]=""
done

step "demo finished: failover with no acknowledged write lost, and the old Primary resynced"
