#!/usr/bin/env bash
# slurm/cluster.sh - a throwaway, real one-node Slurm cluster for tests and CI.
#
# Why: the behaviour we care about under Slurm (requeue, Restarts, signals sent
# before a time limit, scancel semantics) is exactly what a mock of
# sbatch/scontrol would get wrong, so tests start a real slurmctld + slurmd
# (plus a private munged) on this machine instead.
#
# Usage:
#   bash slurm/cluster.sh start  STATE_DIR  # start; last stdout line: export SLURM_CONF=...
#   bash slurm/cluster.sh status STATE_DIR  # daemons alive? + sinfo (exit 3 if not all up)
#   bash slurm/cluster.sh stop   STATE_DIR  # cancel jobs, stop daemons (idempotent)
#
# Callers need only SLURM_CONF for sbatch/squeue/scontrol/scancel/srun:
#   eval "$(bash slurm/cluster.sh start DIR)"   or   source DIR/env
# (start writes nothing else to stdout; progress and errors go to stderr).
#
# Isolation: everything (slurm.conf, munge key and socket, state save dir,
# slurmd spool, logs, PID files) lives under STATE_DIR, nothing in /etc is
# touched, and the two TCP ports are picked free at start (never the default
# 6817/6818), so clusters in different STATE_DIRs, or a system cluster, do not
# collide. `stop` only kills processes it can tie to STATE_DIR: the PID files,
# plus processes carrying CLUSTER_SH_STATE_DIR=STATE_DIR in their environment
# (set on the daemons, inherited by slurmstepd) and their descendants - never
# anything found by name, since another cluster may be running.
#
# Every `start` is a fresh cluster: controller state and spool are wiped, so
# job IDs restart at 1 (logs are appended to). Settings are read at start only
# (a `start` of a cluster that is already up changes nothing):
#   CLUSTER_SH_CRED_EXPIRE=120       requeued jobs' BeginTime delay (below)
#   CLUSTER_SH_PREEMPT_MODE=cancel   cancel|requeue: PreemptMode for preemption
#   CLUSTER_SH_GRACE_TIME=20         the debug partition's GraceTime (seconds)
#   CLUSTER_SH_PREEMPT_USER_SIGNAL=0 1: SlurmctldParameters=preempt_send_user_signal
#   CLUSTER_SH_SCHED_INTERVAL=       main scheduler period (Slurm's default: 60)
#
# Partitions: `debug` (Default=YES, PriorityTier=1) is where jobs go without -p,
# exactly as before; `urgent` (PriorityTier=2, same node) exists to preempt it
# (PreemptType=preempt/partition_prio). Nothing is preempted unless an urgent
# job needs CPUs that debug jobs hold (CR_CPU), e.g. whole-node jobs:
#   sbatch --exclusive job.sh                       # the victim, in debug
#   sbatch -p urgent --exclusive --wrap 'sleep 5'   # preempts it at once
# What Slurm 22.05 then does to the victim, measured (KillWait=10):
#  - at once: PreemptTime is set (`scontrol show job`); JobState stays RUNNING
#    and Reason None (never "Preempted", not later either). SIGCONT+SIGTERM go
#    to the tasks of its srun steps only, NOT to the batch shell nor to srun; a
#    task that does not trap TERM dies (srun exits 143) while the batch shell
#    runs on. With CLUSTER_SH_PREEMPT_USER_SIGNAL=1 a job's --signal replaces
#    that SIGTERM: B:USR1@N reaches only the batch shell, USR1@N only the step
#    tasks (without it, --signal is not sent at preemption at all).
#  - then the kill, "JOB N CANCELLED AT ... DUE TO PREEMPTION". Not exactly at
#    GraceTime's end: at the first main-scheduler pass for the urgent job that
#    is past GraceTime and >= KillWait+MessageTimeout (20 s) after its previous
#    preemption attempt, or at slurmctld's time-limit check (every 30 s) past
#    GraceTime. Measured with GraceTime 20 (and 5): 20-22 s after the urgent
#    job's submission with CLUSTER_SH_SCHED_INTERVAL=1, 20-50 s with Slurm's
#    default 60 s interval unless a pass is triggered (`scontrol update
#    jobid=URGENT_JOB nice=0` once the 20 s are over); GraceTime 30: 33-41 s.
#    Then: JobState COMPLETING, Reason None, every process, batch shell and srun
#    included, gets SIGCONT+SIGTERM (srun: "Job step aborted", "forcing job
#    termination"), SIGKILL after KillWait. In requeue mode Slurm has requeued
#    the job by then (Restarts+1; a `scontrol requeue` from the script fails:
#    "Job is pending execution"); in cancel mode a `scontrol requeue` from the
#    TERM trap succeeds (Restarts+1 at once), else the job ends PREEMPTED
#    (ExitCode 0:9 if it outlived KillWait). Requeued: PENDING, Reason
#    BeginTime (see CRED_EXPIRE), after the COMPLETING phase.
set -euo pipefail

die() {  # die [RC] MESSAGE: one line to stderr, non-zero exit
  local rc=1
  if [[ $1 =~ ^[0-9]+$ ]]; then rc=$1; shift; fi
  echo "cluster.sh: error: $*" >&2
  exit "$rc"
}
say() { echo "cluster.sh: $*" >&2; }

usage() {
  echo "usage: bash ${0##*/} start|stop|status STATE_DIR" >&2
  exit 2
}

# Stray SLURM_* variables (e.g. when CI itself runs inside a Slurm job) would
# point our clients at another cluster or job; only SLURM_CONF is set below.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^SLURM_' || true)

(($# == 2)) || usage
CMD=$1
STATE_ARG=$2
case $CMD in start | stop | status) ;; *) usage ;; esac

MARKER_VAR=CLUSTER_SH_STATE_DIR
# A requeued job may not start again before cred_expire+1 seconds have passed
# (BeginTime is pushed out that far). 120 is Slurm's default; tests that want
# requeued jobs to restart on their own sooner can lower it (minimum 5).
CRED_EXPIRE=${CLUSTER_SH_CRED_EXPIRE:-120}
# Preemption (see the header): what happens to a debug job that an urgent job
# needs the CPUs of (cancel or requeue), the debug partition's GraceTime, and
# whether a preempted job that asked for a --signal gets that signal instead of
# the SIGTERM at the start of GraceTime. An empty SCHED_INTERVAL keeps Slurm's
# 60 s main loop, so ordinary jobs are scheduled exactly as before; 1 makes the
# end of a preemption punctual (see the header).
PREEMPT_MODE=${CLUSTER_SH_PREEMPT_MODE:-cancel}
GRACE_TIME=${CLUSTER_SH_GRACE_TIME:-20}
PREEMPT_USER_SIGNAL=${CLUSTER_SH_PREEMPT_USER_SIGNAL:-0}
SCHED_INTERVAL=${CLUSTER_SH_SCHED_INTERVAL:-}
KILL_WAIT=10       # slurm.conf KillWait: TERM -> KILL grace for cancelled jobs
IDLE_TIMEOUT=60    # seconds to wait for the node to become idle

# ---------------------------------------------------------------- processes --
# A daemon reparented to an init that reaps lazily (or not at all, in some
# containers) lingers as a zombie, and `kill -0` succeeds on zombies; so read
# the state from /proc instead.  $2 (optional) is the expected command name,
# which guards against a stale PID file naming a recycled PID.
pid_alive() {
  local pid=$1 want=${2:-} stat comm rest
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
  rest=${stat##*) }
  [[ ${rest%% *} != Z && ${rest%% *} != X ]] || return 1
  if [[ -n $want ]]; then
    comm=${stat#*(}
    comm=${comm%)*}
    [[ $comm == "$want" ]] || return 1
  fi
}

pidfile_pid() {  # pidfile_pid FILE NAME: print the PID if that daemon is alive
  local pid
  [[ -s $1 ]] || return 1
  pid=$(tr -dc 0-9 <"$1")
  pid_alive "$pid" "$2" && echo "$pid"
}

# Terminate PIDs: TERM, wait up to $1 seconds, then KILL what is left.
terminate() {
  local grace=$1 pid i left
  shift
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    left=0
    for pid; do pid_alive "$pid" && left=1 && break; done
    ((left)) || return 0
    sleep 0.1
  done
  for pid; do pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
  sleep 0.2
  return 0
}

# PIDs of processes whose environment carries our marker (the daemons and the
# slurmstepd processes slurmd forks), excluding this shell.
# $1 (optional): only those with this command name.
marked_pids() {
  local f pid
  while IFS= read -r f; do
    pid=${f#/proc/}
    pid=${pid%/environ}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    pid_alive "$pid" "${1:-}" && echo "$pid"
  done < <(grep -lzxF "$MARKER_VAR=$STATE" /proc/[0-9]*/environ 2>/dev/null)
  return 0
}

# All descendants of the given PIDs (job processes under slurmstepd), from
# /proc so that no procps is needed (slim CI images lack ps).
descendants() {
  local f stat rest pid ppid
  local -A kids=()
  for f in /proc/[0-9]*/stat; do
    { read -r stat <"$f"; } 2>/dev/null || continue
    pid=${stat%% *}
    rest=${stat##*) }
    read -r _ ppid _ <<<"$rest"
    kids[$ppid]+=" $pid"
  done
  local -a queue=("$@")
  while ((${#queue[@]})); do
    pid=${queue[0]}
    queue=("${queue[@]:1}")
    for ppid in ${kids[$pid]:-}; do
      echo "$ppid"
      queue+=("$ppid")
    done
  done
}

# ------------------------------------------------------------------- layout --
set_paths() {
  STATE=$1
  CONF=$STATE/slurm.conf
  ENV_FILE=$STATE/env
  MUNGE_DIR=$STATE/munge
  MUNGE_KEY=$MUNGE_DIR/munge.key
  MUNGE_PID=$STATE/run/munged.pid
  CTLD_PID=$STATE/run/slurmctld.pid
  SLURMD_PID=$STATE/run/slurmd.pid
  LOG_DIR=$STATE/log
  SHORTLINK_FILE=$STATE/run/shortlink
}

# ---------------------------------------------------------------- install --
ensure_installed() {
  local missing=() b
  for b in munged slurmctld slurmd sbatch; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing+=("$b")
  done
  ((${#missing[@]})) || return 0
  ((EUID == 0)) || die 77 "missing ${missing[*]} and not root, cannot apt-get install slurm-wlm munge"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install slurm-wlm munge"
  say "installing slurm-wlm munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >&2 ||
    die "apt-get install slurm-wlm munge failed"
}

# ------------------------------------------------------------------- ports --
port_bound() {  # any TCP socket (v4 or v6, any state) on this local port?
  local hex
  printf -v hex ':%04X' "$1"
  awk -v h="$hex" 'FNR > 1 && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Two adjacent free ports below the ephemeral range (32768+), so an outgoing
# connection cannot grab them between the check and the bind.
pick_ports() {
  local i p
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 12000))
    ((p == 6817 || p == 6818)) && continue
    port_bound "$p" || port_bound $((p + 1)) || { echo "$p $((p + 1))"; return 0; }
  done
  return 1
}

# -------------------------------------------------------------------- start --
log_tails() {
  local f
  for f in "$LOG_DIR"/munged.log "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log; do
    [[ -f $f ]] || continue
    echo "----- tail of $f -----" >&2
    tail -n 25 "$f" >&2
  done
}

fail_start() {
  log_tails
  do_stop >/dev/null 2>&1 || true
  die "start failed: $*"
}

write_env() {
  printf 'export SLURM_CONF=%q\n' "$CONF" >"$ENV_FILE"
}

do_start() {
  if ! [[ $CRED_EXPIRE =~ ^[0-9]+$ ]] || ((CRED_EXPIRE < 5)); then
    die "CLUSTER_SH_CRED_EXPIRE must be an integer >= 5, got '$CRED_EXPIRE'"
  fi
  local preempt_mode sched_params=batch_sched_delay=0 ctld_params=""
  case ${PREEMPT_MODE,,} in
    cancel) preempt_mode=CANCEL ;;
    requeue) preempt_mode=REQUEUE ;;
    *) die "CLUSTER_SH_PREEMPT_MODE must be cancel or requeue, got '$PREEMPT_MODE'" ;;
  esac
  [[ $GRACE_TIME =~ ^[0-9]+$ ]] || die "CLUSTER_SH_GRACE_TIME must be an integer >= 0, got '$GRACE_TIME'"
  case $PREEMPT_USER_SIGNAL in
    0) ;;
    1) ctld_params="SlurmctldParameters=preempt_send_user_signal" ;;  # 22.05: not PreemptParameters
    *) die "CLUSTER_SH_PREEMPT_USER_SIGNAL must be 0 or 1, got '$PREEMPT_USER_SIGNAL'" ;;
  esac
  if [[ -n $SCHED_INTERVAL ]]; then
    [[ $SCHED_INTERVAL =~ ^[1-9][0-9]*$ ]] || die "CLUSTER_SH_SCHED_INTERVAL must be an integer >= 1, got '$SCHED_INTERVAL'"
    sched_params+=,sched_interval=$SCHED_INTERVAL
  fi
  ensure_installed
  export PATH=$PATH:/usr/sbin:/sbin

  local m c d
  m=$(pidfile_pid "$MUNGE_PID" munged || true)
  c=$(pidfile_pid "$CTLD_PID" slurmctld || true)
  d=$(pidfile_pid "$SLURMD_PID" slurmd || true)
  if [[ -n $m && -n $c && -n $d ]]; then
    say "already running in $STATE"
    write_env
    cat "$ENV_FILE"
    return 0
  fi
  [[ -z $m$c$d ]] || die "cluster in $STATE is partly running (munged=${m:-no} slurmctld=${c:-no} slurmd=${d:-no}); run stop first"
  # Leftover slurmstepd/jobs of a crashed previous run would confuse the new slurmd.
  do_stop >/dev/null 2>&1 || true

  # munged insists that every directory above its socket is world-executable
  # and refuses otherwise; STATE_DIR may sit in a 0700 dir (pytest's
  # tmp_path base, /root), so it is started with --force, which turns that
  # check into a warning. Only root (or the owner) can reach the socket then,
  # which is all a test cluster needs.
  mkdir -p "$STATE/run" "$MUNGE_DIR" "$LOG_DIR"
  chmod 755 "$STATE" "$MUNGE_DIR"
  rm -rf "$STATE/statesave" "$STATE/spool"
  mkdir -p "$STATE/statesave" "$STATE/spool"
  rm -f "$STATE"/run/*.pid

  # Unix socket paths are limited to 107 bytes, and slurmstepd puts sockets
  # named <node>_<jobid>.<stepid> in the spool dir; a deep STATE_DIR (long
  # pytest test names) would break those, so daemons then see STATE_DIR
  # through a short symlink in /tmp (removed by stop).
  local base=$STATE
  if ((${#STATE} > 50)); then
    base=$(mktemp -u /tmp/slurmcl.XXXXXX)
    ln -s "$STATE" "$base"
    echo "$base" >"$SHORTLINK_FILE"
  fi

  # munge: a per-cluster key and socket, so no /etc/munge and no system munged.
  if [[ ! -s $MUNGE_KEY ]]; then
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$MUNGE_KEY" || die "mungekey failed"
    else
      (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY")
    fi
  fi
  chmod 400 "$MUNGE_KEY"
  local sock=$base/munge/munge.socket
  env "$MARKER_VAR=$STATE" munged --force \
    --key-file="$MUNGE_KEY" --socket="$sock" --pid-file="$MUNGE_PID" \
    --log-file="$LOG_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" ||
    fail_start "munged did not start"

  # Node description as slurmd itself sees it, so the node is never drained
  # for "low CPUs/RealMemory". NodeAddr pins 127.0.0.1, so the hostname need
  # not resolve.
  local nodeline node
  nodeline=$(slurmd -C 2>/dev/null | head -n 1)
  [[ $nodeline == NodeName=* ]] || fail_start "slurmd -C gave no node description"
  node=${nodeline%% *}
  node=${node#NodeName=}

  # Hold a machine-wide lock from picking the ports until the daemons have
  # bound them, so concurrent starts cannot pick the same pair.
  local lock=${TMPDIR:-/tmp}/slurm-cluster-sh.ports.lock
  if command -v flock >/dev/null && { (umask 000 && : >>"$lock") 2>/dev/null; } && exec 9<"$lock"; then
    flock -w 120 9 || fail_start "timed out waiting for $lock"
  fi
  local ports ctld_port slurmd_port
  ports=$(pick_ports) || fail_start "no free pair of TCP ports found in 20000-32000"
  read -r ctld_port slurmd_port <<<"$ports"

  cat >"$CONF" <<EOF
# Written by slurm/cluster.sh for a throwaway one-node test cluster; see there.
ClusterName=test$ctld_port
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=$CRED_EXPIRE
StateSaveLocation=$base/statesave
SlurmdSpoolDir=$base/spool
SlurmctldPidFile=$base/run/slurmctld.pid
SlurmdPidFile=$base/run/slurmd.pid
SlurmctldLogFile=$base/log/slurmctld.log
SlurmdLogFile=$base/log/slurmd.log
# No cgroups anywhere (containers/CI rarely allow them), no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# The default MailProg (/bin/mail) is usually absent and logs an error.
MailProg=/bin/true
# Share the node between jobs/steps CPU by CPU (CR_Core would hand out whole
# cores, i.e. 2 CPUs per job on hyperthreaded CI runners).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Start batch jobs right after submission instead of up to 3 s later.
SchedulerParameters=$sched_params
ReturnToService=2
JobRequeue=1
KillWait=$KILL_WAIT
# Keep finished jobs in 'scontrol show job' for 10 min so tests can inspect
# JobState/Restarts/ExitCode.
MinJobAge=600
# Preemption by partition: a job in 'urgent' (higher PriorityTier) that needs
# CPUs held by 'debug' jobs preempts them; debug jobs never preempt each other.
PreemptType=preempt/partition_prio
PreemptMode=$preempt_mode
$ctld_params
$nodeline NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACE_TIME
PartitionName=urgent Nodes=$node MaxTime=INFINITE State=UP PriorityTier=2
EOF
  export SLURM_CONF=$CONF

  env "$MARKER_VAR=$STATE" slurmctld -f "$CONF" 9<&- || fail_start "slurmctld exited with $?"
  env "$MARKER_VAR=$STATE" slurmd -f "$CONF" 9<&- || fail_start "slurmd exited with $?"

  local i st=""
  for ((i = 0; i < IDLE_TIMEOUT * 10; i++)); do
    st=$(timeout 5 sinfo -h -N -n "$node" -p debug -o %T 2>/dev/null || true)
    [[ $st == idle ]] && break
    if ((i > 20)); then  # pid files appear a moment after the daemons fork
      pidfile_pid "$CTLD_PID" slurmctld >/dev/null || fail_start "slurmctld died"
      pidfile_pid "$SLURMD_PID" slurmd >/dev/null || fail_start "slurmd died"
    fi
    sleep 0.1
  done
  [[ $st == idle ]] || fail_start "node $node not idle after ${IDLE_TIMEOUT}s (state: ${st:-unknown})"
  exec 9<&-  # release the port lock

  write_env
  say "cluster up in $STATE (node $node, slurmctld port $ctld_port, slurmd port $slurmd_port;" \
    "partitions debug (default) and urgent, PreemptMode=$preempt_mode, GraceTime=$GRACE_TIME)"
  cat "$ENV_FILE"
}

# --------------------------------------------------------------------- stop --
do_stop() {
  local c d m ids
  export PATH=$PATH:/usr/sbin:/sbin
  c=$(pidfile_pid "$CTLD_PID" slurmctld || true)
  d=$(pidfile_pid "$SLURMD_PID" slurmd || true)

  # Cancel jobs through Slurm first, so their processes get the usual
  # TERM -> KILL and slurmstepd exits on its own.
  if [[ -n $c && -f $CONF ]]; then
    export SLURM_CONF=$CONF
    ids=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $ids ]]; then
      # shellcheck disable=SC2086  # word splitting of the job id list is intended
      timeout 10 scancel $ids 2>/dev/null || true
      local deadline=$((SECONDS + 3))
      while ((SECONDS < deadline)) && [[ -n $(marked_pids slurmstepd) ]]; do
        sleep 0.1
      done
    fi
  fi

  # Whatever slurmstepd (and its job processes) is still around: slurmd does
  # not take them down with it under proctrack/linuxproc.
  local -a steps=() procs=()
  mapfile -t steps < <(marked_pids slurmstepd)
  if ((${#steps[@]})); then
    mapfile -t procs < <(descendants "${steps[@]}")
    terminate 2 "${procs[@]}" "${steps[@]}"
  fi

  d=$(pidfile_pid "$SLURMD_PID" slurmd || true)
  [[ -n $d ]] && terminate 10 "$d"
  c=$(pidfile_pid "$CTLD_PID" slurmctld || true)
  [[ -n $c ]] && terminate 10 "$c"
  m=$(pidfile_pid "$MUNGE_PID" munged || true)
  [[ -n $m ]] && terminate 10 "$m"

  # Last sweep: anything else started for this STATE_DIR (slurmscriptd, a
  # daemon whose PID file got lost).
  mapfile -t procs < <(marked_pids)
  ((${#procs[@]})) && terminate 5 "${procs[@]}"

  if [[ -s $SHORTLINK_FILE ]]; then
    local link
    link=$(<"$SHORTLINK_FILE")
    [[ -L $link && $(readlink "$link") == "$STATE" ]] && rm -f "$link"
    rm -f "$SHORTLINK_FILE"
  fi
  rm -f "$CTLD_PID" "$SLURMD_PID" "$MUNGE_PID"
  say "stopped cluster in $STATE"
}

# ------------------------------------------------------------------- status --
do_status() {
  local rc=0 name file pid
  for name in munged slurmctld slurmd; do
    case $name in
      munged) file=$MUNGE_PID ;; slurmctld) file=$CTLD_PID ;; slurmd) file=$SLURMD_PID ;;
    esac
    if pid=$(pidfile_pid "$file" "$name"); then
      echo "$name: running (pid $pid)"
    else
      echo "$name: not running"
      rc=3
    fi
  done
  if pidfile_pid "$CTLD_PID" slurmctld >/dev/null && [[ -f $CONF ]]; then
    SLURM_CONF=$CONF timeout 10 sinfo || rc=3
  fi
  return "$rc"
}

# --------------------------------------------------------------------- main --
case $CMD in
  start)
    mkdir -p "$STATE_ARG" || die "cannot create $STATE_ARG"
    set_paths "$(cd "$STATE_ARG" && pwd -P)"
    do_start
    ;;
  stop)
    if [[ ! -d $STATE_ARG ]]; then
      say "nothing to stop: $STATE_ARG does not exist"
      exit 0
    fi
    set_paths "$(cd "$STATE_ARG" && pwd -P)"
    do_stop
    ;;
  status)
    [[ -d $STATE_ARG ]] || { echo "no cluster: $STATE_ARG does not exist"; exit 3; }
    set_paths "$(cd "$STATE_ARG" && pwd -P)"
    do_status
    ;;
esac
