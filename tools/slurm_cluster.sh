#!/usr/bin/env bash
# A real single-node Slurm cluster for tests and demos: slurmctld + slurmd + slurmdbd (accounting,
# which `sacct` and nemo-run's status polling need) on a private MariaDB, all under one directory.
#
#   bash tools/slurm_cluster.sh start DIR   # installs the Debian packages if missing; prints `export SLURM_CONF=...`
#   bash tools/slurm_cluster.sh stop DIR    # scontrol shutdown, then the recorded PIDs
#
# Ports: SLURMCTLD_PORT (6817), SLURMD_PORT (6818), SLURMDBD_PORT (6819), MYSQL_PORT (3407).
# Authentication is off (auth/none): a cluster for one machine's tests, bound to 127.0.0.1.
set -euo pipefail
action=${1:?usage: slurm_cluster.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: slurm_cluster.sh start|stop DIR}" && cd "$2" && pwd)
ctld_port=${SLURMCTLD_PORT:-6817}
slurmd_port=${SLURMD_PORT:-6818}
dbd_port=${SLURMDBD_PORT:-6819}
mysql_port=${MYSQL_PORT:-3407}  # not 3306: a system MariaDB may already listen there
export SLURM_CONF="$dir/slurm.conf"

stop() {
  if [ -f "$SLURM_CONF" ]; then scontrol shutdown >/dev/null 2>&1 || true; fi
  for name in slurmd slurmctld slurmdbd mariadb; do
    pidfile="$dir/$name.pid"
    pid=$(cat "$pidfile" 2>/dev/null) || continue  # gone, or removed by the daemon as `scontrol shutdown` ends it
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; kill -TERM "$pid" 2>/dev/null || true; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  echo "slurm_cluster: stopped ($dir)" >&2
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "slurm_cluster: $what did not come up in ${seconds}s; logs in $dir" >&2
  exit 1
}

start() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
    echo "slurm_cluster: installing slurmctld slurmd slurm-client slurmdbd mariadb-server (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd mariadb-server >/dev/null
  fi
  mkdir -p "$dir"/{state,spool,log,mysql,run}
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

  cat >"$SLURM_CONF" <<EOF
ClusterName=soup
SlurmctldHost=localhost(127.0.0.1)
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
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 60 slurmdbd bash -c "kill -0 \$(cat '$dir/slurmdbd.pid')"
  # cluster, account and user in the accounting database (nemo-run's SlurmExecutor needs an account)
  wait_for 60 "slurmdbd (accounting)" sacctmgr -i add cluster soup
  sacctmgr -i add account soup Cluster=soup >/dev/null 2>&1 || true
  sacctmgr -i add user "$user" Account=soup Cluster=soup >/dev/null 2>&1 || true
  slurmctld
  wait_for 60 slurmctld scontrol ping
  slurmd -N localhost
  wait_for 60 "slurmd (node idle)" bash -c "sinfo -h -o %t | grep -q idle"
  echo "slurm_cluster: up ($dir): partition debug, $cpus CPUs, ${memory} MB" >&2
  echo "export SLURM_CONF=$SLURM_CONF"
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
