#!/usr/bin/env bash
# Start a real Slurm 22.05 cluster on this machine for the launch tests: munge, MariaDB + slurmdbd
# (so sacct works), slurmctld, and three nodes:
# - this host (partitions debug and short), with two fake GPUs (empty device files) so that
#   `--gres=gpu:v100:N` requests can be scheduled;
# - node1 and node2 (partition two), each slurmd in a network and UTS namespace of its own, with its own
#   hostname and address on a bridge (10.77.0.0/24), so that a job of two nodes runs one task on each and
#   its ranks meet over the network, as on a real cluster. They share this machine's file system, munge
#   and controller.
#
# Needs root and Debian's packages (installed here when missing). Idempotent: when the cluster
# already answers with the current configuration, it returns at once; daemons that died are
# started again, and a changed configuration is applied.
#
#   bash tests/slurm/up.sh          # then: sinfo, sbatch, sacct ...
set -euo pipefail

CLUSTER=hpclora
HOST=$(hostname -s)
STATE=/var/lib/hpclora-slurm
SLURM_CONF=/etc/slurm/slurm.conf
OURS="# Written by hpclora's tests/slurm/up.sh"
# Bump the version when the configuration below changes, so that a running cluster picks it up.
MARKER="$OURS (configuration 8): a throwaway test cluster of three nodes on one machine."

log() { echo "slurm-up: $*"; }

# The two namespaced nodes: name and address on the bridge (the controller is at $BRIDGE_ADDR).
BRIDGE=hpclora0
BRIDGE_ADDR=10.77.0.1
NS_NODES=("node1 10.77.0.11" "node2 10.77.0.12")

node_up() {  # node_up NAME: the controller sees the node ready for jobs
    sinfo -h -n "$1" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'
}

cluster_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    scontrol ping 2>/dev/null | grep -q UP || return 1
    node_up "$HOST" && node_up node1 && node_up node2 || return 1
    sacct -n -X -S now-1minutes >/dev/null 2>&1
}

if cluster_ready && grep -qF "$MARKER" "$SLURM_CONF"; then
    log "already up ($(sinfo -h -o '%P %D %t %G' | head -1))"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "slurm-up: needs root to install and start Slurm" >&2
    exit 1
fi
if [ -s "$SLURM_CONF" ] && ! grep -qF "$OURS" "$SLURM_CONF"; then
    echo "slurm-up: $SLURM_CONF exists and was not written by this script; not touching a real cluster's configuration" >&2
    exit 1
fi

# -- packages ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null \
        || ! command -v ip >/dev/null; then
    log "installing slurm-wlm, slurmdbd, munge, mariadb-server, iproute2"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server iproute2 >/dev/null
fi

mkdir -p "$STATE" /var/log/slurm /var/spool/slurmctld /run/munge /run/mysqld /etc/slurm
for node in "$HOST" node1 node2; do mkdir -p "/var/spool/slurmd/$node"; done
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld

# -- configuration (rewritten every time so that a changed script takes effect) -----------------
touch "$STATE/gpu0" "$STATE/gpu1"
cat > /etc/slurm/gres.conf <<EOF
AutoDetect=off
Name=gpu Type=v100 File=$STATE/gpu0
Name=gpu Type=v100 File=$STATE/gpu1
EOF

cat > "$SLURM_CONF.new" <<EOF
$MARKER
ClusterName=$CLUSTER
# The bridge's address: the one the namespaced nodes reach this host at (the host's name is 127.0.0.1 to them).
SlurmctldHost=$HOST($BRIDGE_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s): short for tests.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName=$HOST CPUs=$(nproc) RealMemory=16000 Gres=gpu:v100:2 State=UNKNOWN
NodeName=node1 NodeAddr=10.77.0.11 CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
NodeName=node2 NodeAddr=10.77.0.12 CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
# Jobs share the machine's cores (four to a core) instead of queueing behind each other: the test jobs mostly wait
# (on signals, on a stop, on their setup), and the suite's workers start them side by side.
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
# A second partition with a time limit, as clusters have (a short queue): doctor's tests check against it.
PartitionName=short Nodes=$HOST MaxTime=00:30:00 State=UP
# Jobs of several nodes, side by side too.
PartitionName=two Nodes=node1,node2 MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
if ! cmp -s "$SLURM_CONF.new" "$SLURM_CONF"; then
    mv "$SLURM_CONF.new" "$SLURM_CONF"
    pkill -x slurmctld || true  # some settings (cred_expire) take effect only at a restart
    pkill -x slurmd || true  # every node's
    for _ in $(seq 20); do pgrep -x slurmd >/dev/null || break; sleep 0.5; done
else
    rm "$SLURM_CONF.new"
fi

cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
chmod 600 /etc/slurm/slurmdbd.conf

running() { pgrep -x "$1" >/dev/null; }

needs_start() {  # needs_start NAME CHECK...: true when the daemon must be (re)started
    local name=$1
    shift
    if running "$name" && timeout 10 "$@" >/dev/null 2>&1; then return 1; fi
    pkill -x "$name" || true  # one that is stopping or does not answer is replaced
    for _ in $(seq 20); do running "$name" || break; sleep 0.5; done
    return 0
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$((seconds * 2))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "slurm-up: $what did not come up in ${seconds}s" >&2
    for f in /var/log/slurm/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done
    return 1
}

# -- munge ------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if needs_start munged sh -c 'munge -n | unmunge'; then runuser -u munge -- /usr/sbin/munged; fi
wait_for 10 munge sh -c 'munge -n | unmunge'

# -- MariaDB and slurmdbd (accounting) ---------------------------------------------------------
if ! running mariadbd; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    (cd / && setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        >/var/log/slurm/mariadb.log 2>&1 &)
fi
wait_for 30 mariadb mariadb -e 'select 1'
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

if needs_start slurmdbd sacctmgr -n list cluster; then slurmdbd; fi
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

# -- the namespaced nodes' network -------------------------------------------------------------
# Names every node resolves (/etc/hosts is shared): a job's ranks find their head node by its name.
for entry in "${NS_NODES[@]}"; do
    read -r name addr <<<"$entry"
    grep -qE "^$addr[[:space:]]+$name( |\$)" /etc/hosts || echo "$addr $name  $OURS" >>/etc/hosts
done
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
fi
ip link set "$BRIDGE" up
for entry in "${NS_NODES[@]}"; do
    read -r name addr <<<"$entry"
    ip netns list | grep -qw "^$name" || ip netns add "$name"
    if ! ip netns exec "$name" ip -4 addr show 2>/dev/null | grep -q "inet $addr/"; then
        ip link del "veth-$name" 2>/dev/null || true
        ip link add "veth-$name" type veth peer name eth0 netns "$name"
        ip link set "veth-$name" master "$BRIDGE" up
        ip netns exec "$name" ip addr add "$addr/24" dev eth0
        ip netns exec "$name" ip link set eth0 up
        ip netns exec "$name" ip link set lo up
        ip netns exec "$name" ip route add default via "$BRIDGE_ADDR"
    fi
done

# -- controller and nodes ----------------------------------------------------------------------
slurmd_alive() {  # slurmd_alive NODE
    local pid
    pid=$(cat "/run/slurmd-$1.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null
}

if needs_start slurmctld scontrol reconfigure; then slurmctld; fi
wait_for 30 slurmctld sh -c 'scontrol ping | grep -q UP'
slurmd_alive "$HOST" || slurmd
for entry in "${NS_NODES[@]}"; do
    read -r name _ <<<"$entry"
    # Its own hostname (slurmd finds its node by it) and network; the daemon stays in both.
    # nsenter, not `ip netns exec`, which mounts a /sys of its own, without the cgroup file system slurmd reads.
    slurmd_alive "$name" || nsenter --net="/run/netns/$name" unshare --uts sh -c "hostname $name && exec slurmd"
done
for node in "$HOST" node1 node2; do
    wait_for 30 "node $node" node_up "$node"
done
wait_for 30 accounting sacct -n -X -S now-1minutes

log "up ($(sinfo -h -o '%P %D %t %G' | head -1))"
