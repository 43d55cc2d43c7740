# shellcheck shell=bash
# Shared helpers for scripts/test.sh, scripts/demo.sh and scripts/bench.sh.
# Source it; it defines functions only (plus REPO_ROOT and PATH additions).

# The repository root, whatever the caller's working directory.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

# Tools like losetup, mkfs.ext4 and nft live in sbin, which a non-login
# root shell may not have on PATH.
case ":$PATH:" in
*:/usr/sbin:*) ;;
*) PATH="$PATH:/usr/sbin:/sbin" ;;
esac
export PATH

# The Debian packages the tests, the demo and the benchmark use, each with
# a command (or check) that tells whether it is installed.
HABLK_PACKAGES=(
    "libnbd-bin:nbdfuse"
    "libnbd-bin:nbdinfo"
    "libnbd-bin:nbdcopy"
    "python3-libnbd:@python-nbd"
    "fio:fio"
    "nbdkit:nbdkit"
    "nbd-server:nbd-server"
    "qemu-utils:qemu-img"
    "qemu-utils:qemu-io"
    "qemu-utils:qemu-nbd"
    "nftables:nft"
    "fuse3:fusermount3"
    "e2fsprogs:mkfs.ext4"
    "e2fsprogs:fsck.ext4"
    "iproute2:ip"
    "util-linux:losetup"
    "util-linux:unshare"
    "pacemaker:pacemakerd"
    "pacemaker-cli-utils:crm_mon"
    "corosync:corosync"
    "crmsh:crm"
    "resource-agents:ocf-tester"
    "libxml2-utils:xmllint"
    "kmod:modprobe"
)

# Installed only when named: qemu-storage-daemon (the benchmark's replicated
# peer) comes with qemu-system-common on Debian 12.
HABLK_EXTRA_PACKAGES=(
    "qemu-system-common:qemu-storage-daemon"
)

log() { printf '%s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Prints a step header.
step() { printf '\n==> %s\n' "$*"; }

# Runs a command as root (directly, or through sudo when not root).
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

_package_present() {
    local check=$1
    case $check in
    @python-nbd)
        # libnbd's Python bindings belong to the system Python, which a
        # python3 earlier on PATH may not be.
        [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1
        ;;
    *) command -v "$check" >/dev/null 2>&1 ;;
    esac
}

# Installs the missing ones among the project's Debian packages (all of
# HABLK_PACKAGES by default, or those named). Quick and silent when
# everything is there.
ensure_packages() {
    local wanted=("$@") missing=() entries=() entry package check
    if [[ ${#wanted[@]} -eq 0 ]]; then
        entries=("${HABLK_PACKAGES[@]}")
    else
        for entry in "${HABLK_PACKAGES[@]}" "${HABLK_EXTRA_PACKAGES[@]}"; do
            _in_list "${entry%%:*}" "${wanted[@]}" && entries+=("$entry")
        done
    fi
    for entry in "${entries[@]}"; do
        package=${entry%%:*}
        check=${entry#*:}
        if ! _package_present "$check" && ! _in_list "$package" "${missing[@]}"; then
            missing+=("$package")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages (${missing[*]}) and no apt-get to install them"
    log "installing: ${missing[*]}"
    # Another apt (unattended upgrades, a second script) may hold the
    # lock: wait for it rather than fail at once.
    local wait_lock=(-o DPkg::Lock::Timeout=600)
    if [[ -z ${_HABLK_APT_UPDATED:-} ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get "${wait_lock[@]}" update -qq >/dev/null
        _HABLK_APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${wait_lock[@]}" install -y -qq \
        -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
    for entry in "${entries[@]}"; do
        package=${entry%%:*}
        check=${entry#*:}
        if ! _package_present "$check"; then
            die "package $package installed but $check is still missing"
        fi
    done
}

_in_list() {
    local needle=$1 item
    shift
    for item in "$@"; do
        [[ $item == "$needle" ]] && return 0
    done
    return 1
}

# Builds the release binary and prints its path.
build_release() {
    (cd "$REPO_ROOT" && cargo build --release --quiet --bin hablk) >&2
    local target_dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
    [[ $target_dir == /* ]] || target_dir="$REPO_ROOT/$target_dir"
    printf '%s\n' "$target_dir/release/hablk"
}

# wait_until SECONDS DESCRIPTION COMMAND...: retries COMMAND every 0.1 s
# until it succeeds; fails after SECONDS. COMMAND redirects its own output.
wait_until() {
    local seconds=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + seconds))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

# Writes a one-node hablk config: write_single_node_config FILE NAME DISK
# NBD_ADDR REPL_ADDR CONTROL [EXTRA_RESOURCE_LINES].
write_single_node_config() {
    local file=$1 node=$2 disk=$3 nbd=$4 address=$5 control=$6 extra=${7:-}
    {
        printf '[resource]\nname = "r0"\n'
        [[ -n $extra ]] && printf '%s\n' "$extra"
        cat <<TOML

[[node]]
name = "$node"
id = 0
address = "$address"
nbd = "$nbd"
disk = "$disk"
control = "$control"
TOML
    } >"$file"
}
