#!/usr/bin/env bash
# A real Slurm cluster on one machine for tests and demos: slurmctld + slurmd + slurmdbd (accounting,
# which `sacct` and nemo-run's status polling need) on a private MariaDB, all under one directory.
#
#   bash tools/slurm_cluster.sh start DIR [--nodes N] [--netns]
#                                           # installs the Debian packages if missing; prints `export SLURM_CONF=...`
#   bash tools/slurm_cluster.sh stop DIR    # scontrol shutdown, the recorded PIDs, then the namespaces
#
# One node (the default) is `localhost`. With --nodes N (N >= 2) there are N nodes n1..nN, one slurmd each
# (Debian's slurmd supports several per machine), each in its own UTS and mount namespace: its own hostname and
# a private /etc/hosts naming every node, which every job step on it inherits. With --netns each node also has
# its own network namespace and address 10.217.0.I on a bridge whose end in this namespace is 10.217.0.254 (the
# controller), with no default route: node-to-node traffic stays on the bridge, nothing can leave, and a
# MASTER_ADDR or server URL naming a node resolves to that node's own address, as on a cluster. Without
# --netns the nodes share 127.0.0.1 (distinct slurmd ports). The filesystem is the machine's own (shared).
#
# Ports: SLURMCTLD_PORT (6817), SLURMD_PORT (6818; node I of several without --netns: 6818 + 10 + I),
# SLURMDBD_PORT (6819), MYSQL_PORT (3407). Authentication is off (auth/none): a cluster for one machine's tests.
set -euo pipefail
usage="usage: slurm_cluster.sh start DIR [--nodes N] [--netns] | stop DIR"
action=${1:?$usage}
dir=$(mkdir -p "${2:?$usage}" && cd "$2" && pwd)
shift 2
nodes=1
netns=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=${2:?--nodes needs a count}; shift 2 ;;
    --netns) netns=1; shift ;;
    *) echo "slurm_cluster: unknown argument '$1' ($usage)" >&2; exit 2 ;;
  esac
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] && [ "$nodes" -le 16 ] || { echo "slurm_cluster: --nodes $nodes: expected 1 to 16" >&2; exit 2; }
[ "$netns" = 0 ] || [ "$nodes" -ge 2 ] || { echo "slurm_cluster: --netns needs --nodes 2 or more" >&2; exit 2; }
subnet=10.217.0  # only on this cluster's bridge and namespaces
tag=$(printf %s "$dir" | md5sum | cut -c1-6)  # names this cluster's namespaces and links (interface names <= 15)
ctld_port=${SLURMCTLD_PORT:-6817}
slurmd_port=${SLURMD_PORT:-6818}
dbd_port=${SLURMDBD_PORT:-6819}
mysql_port=${MYSQL_PORT:-3407}  # not 3306: a system MariaDB may already listen there
export SLURM_CONF="$dir/slurm.conf"

stop() {
  if [ -f "$SLURM_CONF" ]; then scontrol shutdown >/dev/null 2>&1 || true; fi
  for pidfile in "$dir"/slurmd*.pid "$dir"/slurmctld.pid "$dir"/slurmdbd.pid "$dir"/mariadb.pid; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue  # gone, or removed by the daemon as `scontrol shutdown` ends it
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; kill -TERM "$pid" 2>/dev/null || true; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  # job steps left on a node (a test that failed half-way) end with its namespace's processes
  if [ -f "$dir/netns" ]; then
    while read -r ns; do
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    done < "$dir/netns"
    ip link del "sbr$tag" 2>/dev/null || true
    ip route del blackhole "$subnet.0/24" 2>/dev/null || true
    rm -f "$dir/netns"
  fi
  echo "slurm_cluster: stopped ($dir)" >&2
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "slurm_cluster: $what did not come up in ${seconds}s; logs in $dir" >&2
  exit 1
}

node_names() {
  if [ "$nodes" = 1 ]; then echo localhost; else seq -f 'n%g' 1 "$nodes"; fi
}

node_addr() {  # node_addr I
  if [ "$netns" = 1 ]; then echo "$subnet.$1"; else echo 127.0.0.1; fi
}

node_lines() {  # node_lines CPUS MEMORY: every node has the machine's CPUs (they share them) and a share of its memory
  if [ "$nodes" = 1 ]; then
    echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$1 RealMemory=$2 State=UNKNOWN"
    return
  fi
  for i in $(seq "$nodes"); do
    port=$slurmd_port
    [ "$netns" = 1 ] || port=$((slurmd_port + 10 + i))
    echo "NodeName=n$i NodeAddr=$(node_addr "$i") Port=$port CPUs=$1 RealMemory=$(($2 / nodes)) State=UNKNOWN"
  done
}

make_network() {  # a bridge here, a namespace with a veth on it per node; a blackhole under the bridge's route,
  # so that nothing for $subnet ever takes the default route, even while links change
  ip route add blackhole "$subnet.0/24" metric 4000
  ip link add "sbr$tag" type bridge
  ip addr add "$subnet.254/24" dev "sbr$tag"
  ip link set "sbr$tag" up
  for i in $(seq "$nodes"); do
    ns="soup$tag-n$i"
    ip netns add "$ns"
    echo "$ns" >>"$dir/netns"
    ip link add "sv$tag$i" type veth peer name eth0 netns "$ns"
    ip link set "sv$tag$i" master "sbr$tag" up
    ip -n "$ns" addr add "$subnet.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

start_node() {  # start_node NAME: slurmd in its own UTS + mount namespace (and network namespace with --netns)
  local name=$1 enter=()
  [ "$netns" = 0 ] || enter=(nsenter "--net=/run/netns/soup$tag-$name")
  "${enter[@]}" unshare --uts --mount --propagation private \
    bash -c "mount --bind '$dir/hosts' /etc/hosts && hostname '$name' && exec slurmd -N '$name'"
}

start() {
  # the nodes' namespaces need `ip` (iproute2) and `unshare`/`nsenter` (util-linux)
  if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null \
      || ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; then
    echo "slurm_cluster: installing slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2 util-linux (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2 util-linux >/dev/null
  fi
  mkdir -p "$dir"/{state,spool,log,mysql,run}
  if [ "$nodes" -gt 1 ]; then  # every node's /etc/hosts
    { echo "127.0.0.1 localhost"; for i in $(seq "$nodes"); do echo "$(node_addr "$i") n$i"; done; } >"$dir/hosts"
  fi
  user=$(id -un)
  hw=$(slurmd -C | head -n 1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  memory=$(( $(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw") * 9 / 10 ))

  # accounting database: MariaDB on 127.0.0.1 with its data under $dir
  if [ ! -d "$dir/mysql/mysql" ]; then
    mariadb-install-db --user="$user" --datadir="$dir/mysql" --auth-root-authentication-method=normal >"$dir/log/mariadb-install.log" 2>&1
  fi
  mariadbd --user="$user" --datadir="$dir/mysql" --bind-address=127.0.0.1 --port="$mysql_port" \
    --socket="$dir/run/mysql.sock" --pid-file="$dir/mariadb.pid" --log-error="$dir/log/mariadb.log" &
  wait_for 60 MariaDB mariadb --socket="$dir/run/mysql.sock" -u root -e "select 1"
  mariadb --socket="$dir/run/mysql.sock" -u root -e \
    "create database if not exists slurm_acct_db; create user if not exists 'slurm'@'127.0.0.1' identified by 'slurm';
     grant all on slurm_acct_db.* to 'slurm'@'127.0.0.1'; flush privileges;"

  cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/none
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=$user
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$mysql_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$dir/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
EOF
  chmod 600 "$dir/slurmdbd.conf"  # slurmdbd refuses a config others can read

  ctld_addr=127.0.0.1
  [ "$netns" = 0 ] || { make_network; ctld_addr=$subnet.254; }
  cat >"$SLURM_CONF" <<EOF
ClusterName=soup
SlurmctldHost=localhost($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=300
$(node_lines "$cpus" "$memory")
PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP
EOF
  slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 60 slurmdbd bash -c "kill -0 \$(cat '$dir/slurmdbd.pid')"
  # cluster, account and user in the accounting database (nemo-run's SlurmExecutor needs an account)
  wait_for 60 "slurmdbd (accounting)" sacctmgr -i add cluster soup
  sacctmgr -i add account soup Cluster=soup >/dev/null 2>&1 || true
  sacctmgr -i add user "$user" Account=soup Cluster=soup >/dev/null 2>&1 || true
  slurmctld
  wait_for 60 slurmctld scontrol ping
  if [ "$nodes" = 1 ]; then
    slurmd -N localhost
  else
    node_names | while read -r name; do start_node "$name"; done
  fi
  wait_for 60 "slurmd (every node idle)" bash -c "[ \$(sinfo -h -N -t idle -o %N | sort -u | wc -l) = $nodes ]"
  echo "slurm_cluster: up ($dir): partition debug, $nodes node(s) ($(node_names | paste -sd' ')), $cpus CPUs and $((memory / nodes)) MB each$([ "$netns" = 0 ] || echo ", network namespaces on $subnet.0/24")" >&2
  echo "export SLURM_CONF=$SLURM_CONF"
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
