#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost, for CI and for trying launch/slurm.py on a laptop.
#
#   bash launch/local_slurm.sh up     # install slurm-wlm + munge if missing, start munged/slurmctld/slurmd
#   bash launch/local_slurm.sh down   # cancel jobs, stop the daemons it started (by pid file)
#   bash launch/local_slurm.sh env    # print `export SLURM_CONF=...` for this cluster
#
# Needs root (apt-get, daemons). State, spool, logs and slurm.conf live in $MMTRAIN_SLURM_DIR
# (default /tmp/mmtrain-slurm); clients find the config through SLURM_CONF=$MMTRAIN_SLURM_DIR/slurm.conf.
# Each cluster is private: its own munged (socket under /run/mmtrain-munge-<id>) and its own free
# slurmctld/slurmd ports, so several clusters (parallel test sessions) can run on one host.
# `up` exits non-zero with a message on stderr when anything is missing; it never skips silently.
set -euo pipefail

SR=${MMTRAIN_SLURM_DIR:-/tmp/mmtrain-slurm}
CONF=$SR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "local_slurm: error: $*" >&2; exit 1; }
log() { echo "local_slurm: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# A private munged per cluster: its files must sit in a folder the munge user owns.
MUNGE_DIR=/run/mmtrain-munge-$(printf '%s' "$SR" | cksum | cut -d' ' -f1)

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {  # a port nobody listens on, away from the ephemeral range
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 10000 ))
    if port_free "$p" && [ "$p" != "${1:-}" ]; then echo "$p"; return 0; fi
  done
  die "no free port found for slurmctld/slurmd"
}

install_pkgs() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "slurm-wlm/munge are not installed and installing them needs root (apt-get)"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and apt-get is not available"
  log "installing slurm-wlm munge (apt-get)"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

up() {
  [ "$(id -u)" -eq 0 ] || die "needs root (starts munged, slurmctld and slurmd)"
  install_pkgs
  if alive "$SR/slurmctld.pid" && alive "$SR/slurmd.pid"; then
    log "already up ($SR)"
  else
    local host cpus mem
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 2048 ))
    [ "$mem" -gt 512 ] || mem=512
    rm -rf "$SR/state" "$SR/spool"
    mkdir -p "$SR/state" "$SR/spool" "$SR/log"

    # munge: a daemon of this cluster's own (another cluster's munged may stop at any time)
    [ -f /etc/munge/munge.key ] || { command -v mungekey >/dev/null && mungekey --create >/dev/null 2>&1 \
      || /usr/sbin/create-munge-key -f >/dev/null 2>&1 || die "no /etc/munge/munge.key"; }
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    stop_pidfile "$SR/munged.pid"
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_DIR/munge.socket" --pid-file="$MUNGE_DIR/munged.pid" \
      --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" || die "munged failed to start"
    for _ in $(seq 1 40); do [ -S "$MUNGE_DIR/munge.socket" ] && break; sleep 0.1; done
    cp "$MUNGE_DIR/munged.pid" "$SR/munged.pid"
    local ctld_port slurmd_port
    ctld_port=$(free_port)
    slurmd_port=$(free_port "$ctld_port")

    cat > "$CONF" <<CONF
ClusterName=mmtrainci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$SR/state
SlurmdSpoolDir=$SR/spool
SlurmctldPidFile=$SR/slurmctld.pid
SlurmdPidFile=$SR/slurmd.pid
SlurmctldLogFile=$SR/log/slurmctld.log
SlurmdLogFile=$SR/log/slurmd.log
KillWait=5
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    /usr/sbin/slurmctld -f "$CONF" || die "slurmctld failed to start (see $SR/log/slurmctld.log)"
    /usr/sbin/slurmd -f "$CONF" || die "slurmd failed to start (see $SR/log/slurmd.log)"
  fi
  local i state=""
  for i in $(seq 1 120); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
    case "$state" in idle|mixed|allocated) log "up: node $state (SLURM_CONF=$CONF)"; return 0 ;; esac
    sleep 0.5
  done
  die "node never became idle (state '$state'); logs in $SR/log"
}

stop_pidfile() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  if alive "$SR/slurmctld.pid"; then
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 40); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
  fi
  stop_pidfile "$SR/slurmd.pid"
  stop_pidfile "$SR/slurmctld.pid"
  stop_pidfile "$SR/munged.pid"
  rm -rf "$MUNGE_DIR"
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
