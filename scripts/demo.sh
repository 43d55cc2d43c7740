#!/usr/bin/env bash
# A five-minute tour of hablk on one node: build it, create a 256 MiB
# resource, run the daemon, promote it, and put an ext4 filesystem on the
# exported disk. Without the kernel nbd module the disk is reached through
# nbdfuse (NBD -> a file) and a loop device, as DESIGN.md describes; on a host
# with the module, `nbd-client 127.0.0.1 PORT /dev/nbd0 -N r0` does the same.
#
# Needs root (loop devices, mount). Environment: DEMO_PORT (NBD port, default
# 10909), DEMO_REPL_PORT (default 7909), HABLK_IO (uring | threads),
# KEEP=1 keeps the temp dir.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

PORT=${DEMO_PORT:-10909}
REPL_PORT=${DEMO_REPL_PORT:-7909}
NODE=demo
URI="nbd://127.0.0.1:$PORT/r0"

DIR=""
HABLK_BIN=""
DAEMON_PID=""
NBDFUSE_PID=""
LOOP=""
MOUNTED=""

hablk() { "$HABLK_BIN" -c "$DIR/hablk.toml" -n "$NODE" "$@"; }

# Tears down whatever is up, in reverse order; safe to call more than once.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ $rc -ne 0 ]]; then
        printf '\n*** demo FAILED (exit %s); cleaning up\n' "$rc" >&2
        if [[ -n $DIR && -f $DIR/hablk.log ]]; then
            printf -- '--- last lines of the hablk log:\n' >&2
            tail -n 20 "$DIR/hablk.log" | sed $'s/\x1b\[[0-9;]*m//g' >&2
        fi
    fi
    if [[ -n $MOUNTED ]]; then
        umount "$DIR/mnt" 2>/dev/null || umount -l "$DIR/mnt"
        MOUNTED=""
    fi
    if [[ -n $LOOP ]]; then
        losetup -d "$LOOP"
        LOOP=""
    fi
    if [[ -n $NBDFUSE_PID ]]; then
        fusermount3 -u "$DIR/fuse" 2>/dev/null || fusermount3 -uz "$DIR/fuse"
        wait "$NBDFUSE_PID" 2>/dev/null
        NBDFUSE_PID=""
    fi
    if [[ -n $DAEMON_PID ]]; then
        hablk down >/dev/null 2>&1 || hablk down --force >/dev/null 2>&1 ||
            kill -TERM "$DAEMON_PID" 2>/dev/null
        wait "$DAEMON_PID" 2>/dev/null
        DAEMON_PID=""
    fi
    if [[ -n $DIR ]]; then
        if [[ -n ${KEEP:-} ]]; then
            printf 'kept %s\n' "$DIR"
        else
            rm -rf "$DIR"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $EUID -eq 0 ]] || die "the demo needs root (loop devices and mount)"

step "1. checking packages"
ensure_packages libnbd-bin fuse3 e2fsprogs util-linux

step "2. building hablk (release)"
HABLK_BIN=$(build_release)
"$HABLK_BIN" --version

step "3. writing a one-node config and a 256 MiB sparse disk"
DIR=$(mktemp -d -t hablk-demo.XXXXXX)
mkdir -p "$DIR/fuse" "$DIR/mnt"
truncate -s 256M "$DIR/disk.img"
extra=""
if [[ -n ${HABLK_IO:-} ]]; then
    extra="io = \"$HABLK_IO\""
fi
write_single_node_config "$DIR/hablk.toml" "$NODE" "$DIR/disk.img" \
    "127.0.0.1:$PORT" "127.0.0.1:$REPL_PORT" "$DIR/$NODE.sock" "$extra"
sed 's/^/    /' "$DIR/hablk.toml"

step "4. hablk create-md"
hablk create-md

step "5. hablk up (in the background; log in $DIR/hablk.log)"
RUST_LOG=${RUST_LOG:-info} hablk up >"$DIR/hablk.log" 2>&1 &
DAEMON_PID=$!
daemon_answers() {
    kill -0 "$DAEMON_PID" 2>/dev/null || die "hablk up exited: $(tail -n 5 "$DIR/hablk.log")"
    hablk status >/dev/null 2>&1
}
wait_until 30 "the daemon to answer" daemon_answers
hablk status

step "6. hablk primary"
hablk primary
hablk status

step "7. attaching the disk: nbdfuse $URI -> $DIR/fuse/disk -> loop device"
nbdfuse -P "$DIR/nbdfuse.pid" "$DIR/fuse/disk" "$URI" &
NBDFUSE_PID=$!
nbdfuse_ready() {
    kill -0 "$NBDFUSE_PID" 2>/dev/null || die "nbdfuse exited"
    [[ -s $DIR/nbdfuse.pid && -e $DIR/fuse/disk ]]
}
wait_until 30 "nbdfuse to serve $DIR/fuse/disk" nbdfuse_ready
LOOP=$(losetup -f --show "$DIR/fuse/disk")
printf 'loop device: %s (%s bytes)\n' "$LOOP" "$(blockdev --getsize64 "$LOOP")"

step "8. mkfs.ext4 $LOOP and mount it"
mkfs.ext4 -q -F -L hablk-demo "$LOOP"
mount "$LOOP" "$DIR/mnt"
MOUNTED=1
df -h "$DIR/mnt" | sed 's/^/    /'

step "9. writing files (one 32 MiB, 200 small ones in a tree) and sync -f"
head -c 32M /dev/urandom >"$DIR/mnt/big.bin"
for i in $(seq 1 200); do
    mkdir -p "$DIR/mnt/tree/d$((i % 10))"
    head -c $((RANDOM * 4 + i)) /dev/urandom >"$DIR/mnt/tree/d$((i % 10))/f$i"
done
(cd "$DIR/mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$DIR/sums"
while IFS= read -r -d '' file; do
    sync -f "$file"
done < <(find "$DIR/mnt" -type f -print0)
printf '%s files, %s written\n' "$(wc -l <"$DIR/sums")" "$(du -sh "$DIR/mnt" | cut -f1)"

step "10. umount and fsck.ext4 -n -f"
umount "$DIR/mnt"
MOUNTED=""
fsck.ext4 -n -f "$LOOP"

step "11. remount and verify every checksum"
mount "$LOOP" "$DIR/mnt"
MOUNTED=1
(cd "$DIR/mnt" && sha256sum --quiet -c "$DIR/sums")
printf 'all %s checksums match\n' "$(wc -l <"$DIR/sums")"

step "12. hablk status (the NBD clients are nbdfuse's connections)"
hablk status

step "13. teardown: umount, losetup -d, fusermount3 -u, hablk down"
umount "$DIR/mnt"
MOUNTED=""
losetup -d "$LOOP"
LOOP=""
fusermount3 -u "$DIR/fuse"
wait "$NBDFUSE_PID" || true
NBDFUSE_PID=""
hablk down
wait "$DAEMON_PID" || die "hablk up exited with status $?"
DAEMON_PID=""

step "demo finished: ext4 on hablk, written, checked by fsck, read back intact"
