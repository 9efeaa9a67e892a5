#!/usr/bin/env bash
# Vendored from the amorlip team's shared CI script start-slurm.sh (tested on Debian 12 / Slurm
# 22.05.8; docs/slurm.md "Local test cluster" summarises the findings behind its lines). Kept here
# because CI and users work from a clean clone of this repository. Call it through
# scripts/slurm-up.sh (`make slurm-up`), which sets the project's defaults. Local changes: none
# beyond this header; keep it in sync with the shared copy.
# start-slurm.sh -- install (idempotently), configure and start a REAL
# single-node SLURM cluster on loopback: node "localhost", one partition
# (default "debug"), munge auth, no cgroups, optional fake GPUs, optional
# slurmdbd+MariaDB so that `sacct` works.
#
# Tested on Debian 12 (bookworm, Slurm 22.05.8, MariaDB 10.11) as root inside a
# container without systemd.  Re-running it is safe: packages, keys and
# daemons that are already there are reused; config files are rewritten.
#
# Knobs (environment variables):
#   SLURM_LOCAL_DIR    state/spool/log/pid dir             (default /tmp/slurm-local)
#   SLURM_CLUSTER      ClusterName                          (default localcluster)
#   SLURM_PARTITION    partition name (Default=YES)         (default debug)
#   SLURM_FAKE_GPUS    number of fake gres/gpu, 0 = none    (default 2)
#   SLURM_WITH_DBD     1 = MariaDB + slurmdbd, sacct works  (default 0)
#   SLURM_DBD_ACCOUNT  account created when SLURM_WITH_DBD=1 (default test)
#   SLURM_TASK_PLUGIN  TaskPlugin                           (default task/none)
#   SLURM_WAIT_S       seconds to wait for the node to be idle (default 90)
# Stop with stop-slurm.sh (same SLURM_LOCAL_DIR).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -E "$0" "$@"; fi
  echo "start-slurm.sh: must run as root (or with sudo available)" >&2; exit 1
fi

BASE=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CLUSTER=${SLURM_CLUSTER:-localcluster}
PARTITION=${SLURM_PARTITION:-debug}
FAKE_GPUS=${SLURM_FAKE_GPUS:-2}
WITH_DBD=${SLURM_WITH_DBD:-0}
DBD_ACCOUNT=${SLURM_DBD_ACCOUNT:-test}
TASK_PLUGIN=${SLURM_TASK_PLUGIN:-task/none}
WAIT_S=${SLURM_WAIT_S:-90}
NODE=localhost
CONF_DIR=/etc/slurm
T0=$(date +%s)

log() { printf '[start-slurm +%ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() {
  echo "start-slurm.sh: ERROR: $*" >&2
  for f in "$BASE"/log/*.log "$BASE"/log/*.stderr; do
    [ -s "$f" ] && { echo "---- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  exit 1
}
# alive PID: process exists and is not a zombie
alive() {
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
  local st; st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$st" ] && [ "$st" != Z ]
}
pid_from() { [ -s "$1" ] && cat "$1" || true; }
daemon_running() {  # $1 = pid file, $2 = expected /proc/PID/comm
  local p; p=$(pid_from "$1")
  alive "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- 1. install
PKGS=(slurmctld slurmd slurm-client munge)
[ "$WITH_DBD" = 1 ] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
    || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
log "slurm $(slurmd -V | awk '{print $2}'), munge $(dpkg-query -W -f='${Version}' munge)"

mkdir -p "$BASE"/{state/ctld,state/d,run,log,cgroup-unused} "$CONF_DIR"

# pre-flight: refuse to rewrite /etc/slurm under a cluster started elsewhere
for pd in 6817:slurmctld 6818:slurmd 6819:slurmdbd; do
  port=${pd%%:*}; d=${pd#*:}
  if ! daemon_running "$BASE/run/$d.pid" "$d" && port_busy "$port"; then
    die "port $port busy but no $d from SLURM_LOCAL_DIR=$BASE is running (stop the other cluster first)"
  fi
done

# ---------------------------------------------------------------- 2. munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if daemon_running "$BASE/run/munged.pid" munged; then
  log "munged already running (started earlier by this script)"
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already running (not managed by this script)"
else
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || die "munged did not come up"
  cp /run/munge/munged.pid "$BASE/run/munged.pid"   # stop-slurm.sh stops it
fi

# ---------------------------------------------------------------- 3. config
HW=$(slurmd -C | head -n1)   # e.g. NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
hw() { sed -n "s/.* $1=\([0-9][0-9]*\).*/\1/p" <<<"$HW"; }
CPUS=$(hw CPUs); BOARDS=$(hw Boards); SPB=$(hw SocketsPerBoard)
CPS=$(hw CoresPerSocket); TPC=$(hw ThreadsPerCore); MEM=$(hw RealMemory)
[ -n "$CPUS" ] && [ -n "$MEM" ] || die "cannot parse 'slurmd -C': $HW"
REALMEM=$(( MEM * 90 / 100 ))            # a bit below the total
DEFMEM=$(( REALMEM / CPUS )); [ "$DEFMEM" -gt 1000 ] && DEFMEM=1000

if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -q '^# generated by start-slurm.sh' "$CONF_DIR/slurm.conf"; then
  cp -p "$CONF_DIR/slurm.conf" "$CONF_DIR/slurm.conf.bak.$(date +%s)"
fi

if [ "$WITH_DBD" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
GRES_NODE=""; GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  GRES_NODE=" Gres=gpu:$FAKE_GPUS"; GRES_TYPES="GresTypes=gpu"
fi

cat > "$CONF_DIR/slurm.conf" <<EOF
# generated by start-slurm.sh -- single-node loopback cluster
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups anywhere (see cgroup.conf)
ProctrackType=proctrack/linuxproc
TaskPlugin=$TASK_PLUGIN
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without DefMemPerCPU a job gets the whole node's memory -> 1 job at a time
DefMemPerCPU=$DEFMEM
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# keep finished jobs visible to 'squeue --states=all' (snakemake status checks)
MinJobAge=600
JobCompType=jobcomp/none
$ACCT_LINES
$GRES_TYPES
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SPB CoresPerSocket=$CPS ThreadsPerCore=$TPC RealMemory=$REALMEM$GRES_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# cgroup.conf: slurmd always initialises a cgroup plugin; 'autodetect' picks
# cgroup/v2 on v2-only hosts and may fail in containers.  Nothing here uses
# cgroups, so pin a plugin whose init() does not touch the host.
VER=$(slurmd -V | awk '{print $2}'); VMAJ=${VER%%.*}; VMIN=$(cut -d. -f2 <<<"$VER")
if [ "$VMAJ" -gt 24 ] || { [ "$VMAJ" -eq 24 ] && [ "$((10#$VMIN))" -ge 5 ]; }; then
  echo "CgroupPlugin=disabled" > "$CONF_DIR/cgroup.conf"        # >= 24.05 (untested)
else
  printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nCgroupMountpoint=%s\n' \
    "$BASE/cgroup-unused" > "$CONF_DIR/cgroup.conf"               # <= 23.11
fi

if [ "$FAKE_GPUS" -gt 0 ]; then
  # gres/gpu needs File=; symlinks to /dev/null are accepted as char devices
  rm -rf "$BASE/fakegpu"; mkdir -p "$BASE/fakegpu"
  for i in $(seq 0 $(( FAKE_GPUS - 1 ))); do ln -s /dev/null "$BASE/fakegpu/nvidia$i"; done
  if [ "$FAKE_GPUS" -eq 1 ]; then F="$BASE/fakegpu/nvidia0"; else F="$BASE/fakegpu/nvidia[0-$(( FAKE_GPUS - 1 ))]"; fi
  printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s\n' "$NODE" "$F" > "$CONF_DIR/gres.conf"
else
  rm -f "$CONF_DIR/gres.conf"
fi

# ---------------------------------------------------------------- 4. slurmdbd (optional)
if [ "$WITH_DBD" = 1 ]; then
  install -d -o mysql -g mysql "$BASE/mysql" /run/mysqld
  if [ ! -d "$BASE/mysql/mysql" ]; then
    log "initialising MariaDB datadir"
    mariadb-install-db --user=mysql --datadir="$BASE/mysql" --skip-test-db \
      > "$BASE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
  fi
  if ! mariadb -e 'SELECT 1' >/dev/null 2>&1; then
    log "starting mariadbd (unix socket only)"
    setsid /usr/sbin/mariadbd --user=mysql --datadir="$BASE/mysql" \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mariadbd.pid \
      --skip-networking --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
      >> "$BASE/log/mariadbd.log" 2>&1 < /dev/null &
    for _ in $(seq 1 60); do mariadb -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.5; done
    mariadb -e 'SELECT 1' >/dev/null 2>&1 || die "mariadbd did not come up"
    cp /run/mysqld/mariadbd.pid "$BASE/run/mariadbd.pid"
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > "$CONF_DIR/slurmdbd.conf" <<EOF
# generated by start-slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
  if ! daemon_running "$BASE/run/slurmdbd.pid" slurmdbd; then
    port_busy 6819 && die "port 6819 in use by a slurmdbd not started with this SLURM_LOCAL_DIR"
    log "starting slurmdbd"
    slurmdbd 2>> "$BASE/log/slurmdbd.stderr" || die "slurmdbd failed to start"
  fi
  for _ in $(seq 1 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
  sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd not answering"
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true   # exists -> rc 1
fi

# ---------------------------------------------------------------- 5. daemons
if daemon_running "$BASE/run/slurmctld.pid" slurmctld; then
  log "slurmctld already running -> scontrol reconfigure"
  scontrol reconfigure || true
else
  port_busy 6817 && die "port 6817 in use by a slurmctld not started with this SLURM_LOCAL_DIR ($BASE)"
  log "starting slurmctld"
  slurmctld 2>> "$BASE/log/slurmctld.stderr" || die "slurmctld failed to start"
fi
for _ in $(seq 1 60); do scontrol ping 2>/dev/null | grep -q 'UP' && break; sleep 0.5; done
scontrol ping | grep -q UP || die "slurmctld not answering"
sleep 0.5
daemon_running "$BASE/run/slurmctld.pid" slurmctld || die "slurmctld exited"

if daemon_running "$BASE/run/slurmd.pid" slurmd; then
  log "slurmd already running (restart it with stop-slurm.sh if node config changed)"
else
  port_busy 6818 && die "port 6818 in use by a slurmd not started with this SLURM_LOCAL_DIR ($BASE)"
  log "starting slurmd -N $NODE"
  slurmd -N "$NODE" 2>> "$BASE/log/slurmd.stderr" || die "slurmd failed to start"
fi

resumed=0
for i in $(seq 1 "$WAIT_S"); do
  st=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)
  case "$st" in
    idle|mixed|allocated|completing) break ;;
    drain*|down|inval|fail*)
      if [ $resumed -eq 0 ] && [ "$i" -gt 3 ]; then
        scontrol update nodename="$NODE" state=resume 2>/dev/null || true; resumed=1
      fi ;;
  esac
  if [ "$i" -gt 3 ] && ! daemon_running "$BASE/run/slurmd.pid" slurmd; then die "slurmd died"; fi
  sleep 1
done
case "$st" in idle|mixed|allocated|completing) ;; *) die "node '$NODE' is '$st' after ${WAIT_S}s" ;; esac

if [ "$WITH_DBD" = 1 ]; then
  sacctmgr -i add account "$DBD_ACCOUNT" Description=test Organization=test >/dev/null 2>&1 || true
  users=root; [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && users="$users,$SUDO_USER"
  sacctmgr -i add user "$users" Account="$DBD_ACCOUNT" >/dev/null 2>&1 || true
fi

log "cluster up: $(sinfo -h -o '%P %a %D %T %N %G' | tr '\n' ' ')"
if [ "$WITH_DBD" = 1 ]; then
  log "accounting: slurmdbd -> sacct works; account '$DBD_ACCOUNT'"
else
  log "accounting: none -> sacct does NOT work; use 'snakemake --slurm-status-command squeue'"
fi
