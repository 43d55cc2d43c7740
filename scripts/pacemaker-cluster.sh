#!/usr/bin/env bash
# A real Pacemaker + Corosync cluster on one machine, one node per set of
# Linux namespaces (network, mount, UTS, IPC, PID), with hablk's OCF agent
# and binary visible inside every node. Nothing of it touches the host's
# network, /etc, /run or /usr/lib/ocf: each node gets its own tmpfs on /run
# and /dev/shm, its own /var/lib/pacemaker, /var/lib/corosync, /var/log and
# /etc/corosync (bind mounts of directories under DIR), and the agent and
# binary are overlaid inside the node's mount namespace only.
#
#   pacemaker-cluster.sh up DIR NODE...      start the nodes, wait until all are online
#   pacemaker-cluster.sh exec DIR NODE CMD... run CMD inside NODE
#   pacemaker-cluster.sh kill DIR NODE       kill -9 the whole node (Pacemaker, Corosync, hablk)
#   pacemaker-cluster.sh start DIR NODE      start a killed node again
#   pacemaker-cluster.sh isolate DIR NODE    drop all traffic between NODE and the others
#   pacemaker-cluster.sh heal DIR NODE       undo isolate
#   pacemaker-cluster.sh ip DIR NODE         the node's address
#   pacemaker-cluster.sh down DIR            kill every node, remove namespaces, loop devices and DIR
#
# Environment: HABLK_BIN (the hablk binary, default: target/release/hablk),
# CLUSTER_TOKEN_MS (Corosync token timeout, default 1000).
#
# The nodes talk over a bridge in a hub namespace, on 10.213.0.0/24. A
# cluster's namespaces are named after DIR, so several clusters can run side
# by side.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

usage() {
    sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "pacemaker-cluster: $*" >&2
    exit 1
}

# Short, unique-per-DIR prefix for namespace names.
prefix_for() {
    echo "hpc$(echo -n "$1" | cksum | cut -c1-6)"
}

load() {
    dir=$(cd "$1" 2>/dev/null && pwd) || die "no cluster in $1"
    [ -f "$dir/cluster.env" ] || die "no cluster in $dir"
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
}

index_of() {
    local i=1 n
    for n in $NODES; do
        [ "$n" = "$1" ] && { echo "$i"; return; }
        i=$((i + 1))
    done
    die "no node $1 (nodes: $NODES)"
}

ip_of() { echo "10.213.0.$(index_of "$1")"; }

init_pid() {
    local pid
    pid=$(cat "$dir/$1/init.pid" 2>/dev/null) || return 1
    [ -d "/proc/$pid" ] || return 1
    echo "$pid"
}

in_node() {
    local node=$1 pid
    shift
    pid=$(init_pid "$node") || die "node $node is not running"
    nsenter -t "$pid" -m -u -i -n -p -- "$@"
}

write_corosync_conf() {
    local node_entries="" i=1 n
    for n in $NODES; do
        node_entries+="    node {
        ring0_addr: 10.213.0.$i
        name: $n
        nodeid: $i
    }
"
        i=$((i + 1))
    done
    cat >"$dir/corosync.conf" <<EOF
totem {
    version: 2
    cluster_name: hablk-test
    transport: knet
    token: ${CLUSTER_TOKEN_MS:-1000}
    crypto_cipher: none
    crypto_hash: none
}
nodelist {
$node_entries}
quorum {
    provider: corosync_votequorum
}
logging {
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_stderr: no
    to_syslog: no
    timestamp: hires
}
EOF
}

# The CIB every node starts from: no fencing (the test cluster has none) and a
# short DC election wait, so a fresh cluster is online in seconds.
write_cib() {
    cat >"$1" <<'EOF'
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="cib-bootstrap-options-stonith-enabled" name="stonith-enabled" value="false"/>
        <nvpair id="cib-bootstrap-options-dc-deadtime" name="dc-deadtime" value="2s"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>
EOF
}

prepare_node() {
    local node=$1 n=$dir/$1
    mkdir -p "$n/etc-corosync" "$n/var-lib-corosync" "$n/var-log/pacemaker" \
        "$n/var-log/corosync" "$n/var-log/hablk" "$n/var-log/crmsh" "$n/ocf-upper" "$n/ocf-work" \
        "$n/var-lib-pacemaker"/{cib,pengine,blackbox,cores}
    cp "$dir/corosync.conf" "$n/etc-corosync/corosync.conf"
    write_cib "$n/var-lib-pacemaker/cib/cib.xml"
    chown -R hacluster:haclient "$n/var-lib-pacemaker" "$n/var-log/pacemaker"
    chmod 0600 "$n/var-lib-pacemaker/cib/cib.xml"
}

create_network() {
    local i=1 n
    ip netns add "${PREFIX}hub"
    ip -n "${PREFIX}hub" link add br0 type bridge
    ip -n "${PREFIX}hub" link set br0 up
    for n in $NODES; do
        ip netns add "${PREFIX}$i"
        ip -n "${PREFIX}hub" link add "v$i" type veth peer name eth0 netns "${PREFIX}$i"
        ip -n "${PREFIX}hub" link set "v$i" master br0 up
        ip -n "${PREFIX}$i" addr add "10.213.0.$i/24" dev eth0
        ip -n "${PREFIX}$i" link set eth0 up
        ip -n "${PREFIX}$i" link set lo up
        i=$((i + 1))
    done
}

start_node() {
    local node=$1 i
    i=$(index_of "$node")
    rm -f "$dir/$node/init.pid"
    ip netns exec "${PREFIX}$i" unshare --mount --uts --ipc --pid --fork --mount-proc \
        "$here/pacemaker-cluster.sh" init "$dir" "$node" \
        >>"$dir/$node/init.log" 2>&1 </dev/null &
    local unshare_pid=$! pid=""
    for _ in $(seq 100); do
        pid=$(cat "/proc/$unshare_pid/task/$unshare_pid/children" 2>/dev/null | awk '{print $1}')
        [ -n "$pid" ] && break
        sleep 0.05
    done
    [ -n "$pid" ] || die "node $node did not start (see $dir/$node/init.log)"
    echo "$pid" >"$dir/$node/init.pid"
}

# Runs as PID 1 of a node's namespaces: builds the node's private view of the
# file system, starts Corosync and Pacemaker, and reaps orphans.
node_init() {
    local node=$1 n=$dir/$1
    hostname "$node"
    mount -t tmpfs -o mode=0755 tmpfs /run
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    mount --bind "$n/etc-corosync" /etc/corosync
    mount --bind "$n/var-lib-corosync" /var/lib/corosync
    mount --bind "$n/var-lib-pacemaker" /var/lib/pacemaker
    mount --bind "$n/var-log" /var/log
    # The agent's stable device links live in /dev/hablk, private to the node.
    mount -t tmpfs -o mode=0755 tmpfs /dev/hablk
    # The agent, installed as the README says, but only inside this node.
    mount -t overlay overlay \
        -o "lowerdir=$dir/ocf-install:/usr/lib/ocf/resource.d,upperdir=$n/ocf-upper,workdir=$n/ocf-work" \
        /usr/lib/ocf/resource.d
    mount --bind "$dir/bin" /usr/local/sbin
    mkdir -p /run/crm /run/pacemaker
    chown hacluster:haclient /run/crm /run/pacemaker
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    corosync -f &
    for _ in $(seq 200); do
        corosync-cmapctl -g totem.cluster_name >/dev/null 2>&1 && break
        sleep 0.05
    done
    pacemakerd &
    # As PID 1, reap whatever is orphaned inside the node.
    while true; do
        wait || true
        sleep 1
    done
}

wait_online() {
    local first=${NODES%% *} want online
    want=$(echo "$NODES" | wc -w)
    for _ in $(seq 1200); do
        online=$(in_node "$first" crm_mon -1 --output-as=xml 2>/dev/null |
            grep -c '<node name=.* online="true"' || true)
        [ "$online" = "$want" ] && return 0
        sleep 0.1
    done
    die "the cluster did not come online within 120 s (see $dir/*/var-log/pacemaker)"
}

# Loop devices the agent attached inside a node: the kernel's, not the
# node's, so they outlive a killed node unless detached here.
forget_loops() {
    local node=$1 pid
    pid=$(init_pid "$node") || return 0
    # One per line: the agent's state files end without a newline.
    nsenter -t "$pid" -m -- sh -c 'for f in /run/hablk/ocf/*/loop; do [ -f "$f" ] && cat "$f" && echo; done' \
        >>"$dir/loops" || true
}

detach_loops() {
    local loop
    [ -f "$dir/loops" ] || return 0
    for loop in $(sort -u "$dir/loops"); do
        losetup -d "$loop" 2>/dev/null || true
    done
    : >"$dir/loops"
}

kill_node() {
    local pid
    forget_loops "$1"
    pid=$(init_pid "$1") || return 0
    kill -9 "$pid"
    while [ -d "/proc/$pid" ]; do sleep 0.05; done
}

partition_rules() {
    local node=$1 others="" n
    for n in $NODES; do
        [ "$n" = "$node" ] || others+="${others:+, }$(ip_of "$n")"
    done
    cat <<EOF
table inet hablk_isolate {
    chain input { type filter hook input priority 0; ip saddr { $others } drop; }
    chain output { type filter hook output priority 0; ip daddr { $others } drop; }
}
EOF
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case "$cmd" in
up)
    [ $# -ge 2 ] || usage
    mkdir -p "$1"
    dir=$(cd "$1" && pwd)
    shift
    [ -f "$dir/cluster.env" ] && die "$dir already holds a cluster"
    command -v pacemakerd >/dev/null && command -v corosync >/dev/null ||
        die "pacemaker and corosync are not installed"
    NODES="$*"
    PREFIX=$(prefix_for "$dir")
    printf 'NODES="%s"\nPREFIX="%s"\n' "$NODES" "$PREFIX" >"$dir/cluster.env"
    hablk_bin=${HABLK_BIN:-$root/target/release/hablk}
    [ -x "$hablk_bin" ] || die "no hablk binary at $hablk_bin (cargo build --release)"
    mkdir -p "$dir/bin" "$dir/ocf-install/hablk"
    ln -sf "$(readlink -f "$hablk_bin")" "$dir/bin/hablk"
    install -m 0755 "$root/tools/ocf/hablk" "$dir/ocf-install/hablk/hablk"
    mkdir -p /dev/hablk
    write_corosync_conf
    for node in $NODES; do prepare_node "$node"; done
    create_network
    for node in $NODES; do start_node "$node"; done
    wait_online
    ;;
init)
    dir=$1
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
    node_init "$2"
    ;;
exec)
    load "$1"
    node=$2
    shift 2
    in_node "$node" "$@"
    ;;
kill)
    load "$1"
    kill_node "$2"
    ;;
start)
    load "$1"
    init_pid "$2" >/dev/null && die "node $2 is running"
    start_node "$2"
    ;;
isolate)
    load "$1"
    partition_rules "$2" | ip netns exec "${PREFIX}$(index_of "$2")" nft -f -
    ;;
heal)
    load "$1"
    ip netns exec "${PREFIX}$(index_of "$2")" nft delete table inet hablk_isolate
    ;;
ip)
    load "$1"
    ip_of "$2"
    ;;
down)
    [ -f "$1/cluster.env" ] || exit 0
    load "$1"
    for node in $NODES; do kill_node "$node"; done
    detach_loops
    i=1
    for node in $NODES; do
        ip netns delete "${PREFIX}$i" 2>/dev/null || true
        i=$((i + 1))
    done
    ip netns delete "${PREFIX}hub" 2>/dev/null || true
    rm -rf "$dir"
    # The mount point of every node's private /dev/hablk, shared by the
    # clusters running beside this one.
    ip netns list | grep -q '^hpc' || rmdir /dev/hablk 2>/dev/null || true
    ;;
*)
    usage
    ;;
esac
