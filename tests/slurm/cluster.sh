#!/usr/bin/env bash
# A single-node SLURM cluster on localhost for the tests: munged, MariaDB + slurmdbd (accounting,
# so sacct answers), slurmctld and `slurmd -N localhost` with 4 fake GPUs (gres on character
# devices /dev/fakegpu0-3).
#
#   tests/slurm/cluster.sh start    install what is missing (apt), start what is not running
#   tests/slurm/cluster.sh stop     stop the daemons through their PID files
#   tests/slurm/cluster.sh status   exit 0 when every daemon runs and the node answers, else 3
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` for a shell
#
# State, configs, logs and PID files live under $FGVLM_SLURM_DIR (default /tmp/fgvlm-slurm);
# /etc/slurm/slurm.conf becomes a link to its slurm.conf, because SLURM's clients inside a job
# (srun, scontrol) do not see SLURM_CONF: the Snakemake jobstep executor drops SLURM_* variables.
# Where the cluster cannot start at all (not root, no apt-get, no Debian mirror, no mknod, a
# foreign /etc/slurm/slurm.conf) it exits with 77 and a line starting "fgvlm-slurm: cannot start".
# No systemd here: daemons are started by hand; nothing is ever killed by name.
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${FGVLM_SLURM_DIR:-/tmp/fgvlm-slurm}"
CTLD_PORT="${FGVLM_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${FGVLM_SLURM_SLURMD_PORT:-6818}"
DBD_PORT="${FGVLM_SLURM_DBD_PORT:-6819}"
DB_PORT="${FGVLM_SLURM_DB_PORT:-3307}"
CANNOT_START=77
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
BINARIES=(slurmctld slurmd slurmdbd munged mariadbd mariadb-install-db sbatch sacct sacctmgr)
# start order; stop runs it backwards. name:process name (checked against /proc/PID/comm)
DAEMONS=(munged:munged mariadb:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld slurmd:slurmd)
CONF="$STATE/etc/slurm.conf"
export SLURM_CONF="$CONF"

say() { echo "fgvlm-slurm: $*"; }
cannot_start() {
    echo "fgvlm-slurm: cannot start: $*" >&2
    exit "$CANNOT_START"
}
die() {
    echo "fgvlm-slurm: error: $*" >&2
    exit 1
}

pid_file() {
    case "$1" in
    munged) echo "$STATE/munge/munged.pid" ;;
    mariadb) echo "$STATE/mysql/mariadbd.pid" ;;
    *) echo "$STATE/run/$1.pid" ;;
    esac
}

# The PID of a daemon when its PID file names a live process of the expected program, else "".
live_pid() {
    local name="${1%%:*}" comm="${1##*:}" file pid
    file="$(pid_file "$name")"
    [[ -s "$file" ]] || return 0
    pid="$(tr -dc 0-9 <"$file")"
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 0
    [[ "$(cat "/proc/$pid/comm")" == "$comm" ]] && echo "$pid"
    return 0
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }

all_running() {
    local d
    for d in "${DAEMONS[@]}"; do
        [[ -n "$(live_pid "$d")" ]] || return 1
    done
    [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing) ]]
}

# Wait up to $1 seconds for the command "$@" (after the first argument) to succeed.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    while ((SECONDS < deadline)); do
        if declare -F "$1" >/dev/null; then
            "$@" >/dev/null 2>&1 && return 0
        else
            timeout 10 "$@" >/dev/null 2>&1 && return 0 # a client may block on a dead daemon
        fi
        sleep 0.2
    done
    return 1
}

apt_install() { # apt-get install, with `apt-get update` first when the lists are stale
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${PACKAGES[@]}" >"$STATE/log/apt.log" 2>&1 && return 0
    apt-get update -q >>"$STATE/log/apt.log" 2>&1 || return 2
    apt-get install -y -q "${PACKAGES[@]}" >>"$STATE/log/apt.log" 2>&1 || return 3
}

install_missing() {
    local missing=() b code=0 policy=/usr/sbin/policy-rc.d made_policy=""
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ "$(id -u)" -eq 0 ]] || cannot_start "${missing[*]} missing and not root (apt-get needs root)"
    command -v apt-get >/dev/null 2>&1 || cannot_start "${missing[*]} missing and no apt-get"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    if [[ ! -e "$policy" ]]; then # keep the packages from starting system-wide daemons
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    apt_install || code=$?
    [[ -n "$made_policy" ]] && rm -f "$policy"
    case "$code" in
    0) ;;
    2) cannot_start "apt-get update failed (no Debian mirror?): $STATE/log/apt.log" ;;
    *) cannot_start "apt-get install ${PACKAGES[*]} failed: $STATE/log/apt.log" ;;
    esac
}

render() { # template -> file, with @NAME@ placeholders filled in
    sed -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        "$1" >"$2"
}

write_configs() {
    CPUS="$(nproc)"
    MEM_MB="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)"
    if [[ ! -s "$STATE/etc/db.pass" ]]; then
        (umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/etc/db.pass")
    fi
    DB_PASS="$(cat "$STATE/etc/db.pass")"
    render "$HERE/slurm.conf.in" "$CONF"
    render "$HERE/gres.conf.in" "$STATE/etc/gres.conf"
    (umask 077 && render "$HERE/slurmdbd.conf.in" "$STATE/etc/slurmdbd.conf")
    chmod 600 "$STATE/etc/slurmdbd.conf"
}

link_client_config() {
    local sys=/etc/slurm/slurm.conf target
    mkdir -p /etc/slurm
    if [[ -e "$sys" || -L "$sys" ]]; then
        # ours: a link to some state dir's etc/slurm.conf that is gone or says it is ours
        target="$(readlink "$sys" || true)"
        if [[ "$target" != */etc/slurm.conf ]] ||
            { [[ -e "$target" ]] && ! grep -q "^# The fgvlm test cluster" "$target"; }; then
            cannot_start "$sys exists and is not a link made by this script (a real cluster's?)"
        fi
    fi
    ln -sfn "$CONF" "$sys"
}

fake_gpus() {
    local i
    for i in 0 1 2 3; do
        [[ -c "/dev/fakegpu$i" ]] && continue
        rm -f "/dev/fakegpu$i"
        mknod -m 666 "/dev/fakegpu$i" c 195 "$i" 2>/dev/null ||
            cannot_start "mknod /dev/fakegpu$i failed (no CAP_MKNOD?)"
    done
}

start_munged() {
    [[ -n "$(live_pid munged:munged)" ]] && return 0
    local m="$STATE/munge"
    if [[ ! -s "$m/munge.key" ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$m/munge.key")
    fi
    chown -R munge:munge "$m"
    chmod 755 "$m" # munged: clients need to reach the socket
    chmod 400 "$m/munge.key"
    rm -f "$m/munge.socket" "$m/munge.socket.lock"
    runuser -u munge -- munged --socket="$m/munge.socket" --pid-file="$m/munged.pid" \
        --log-file="$m/munged.log" --seed-file="$m/munged.seed" --key-file="$m/munge.key" ||
        die "munged did not start: $m/munged.log"
    wait_for 10 test -S "$m/munge.socket" || die "munged made no socket: $m/munged.log"
}

# shellcheck disable=SC2120 # arguments arrive through wait_for
db() { mariadb --no-defaults -S "$STATE/mysql/mariadbd.sock" -u root "$@"; }

start_mariadb() {
    [[ -n "$(live_pid mariadb:mariadbd)" ]] && return 0
    local data="$STATE/mysql/data"
    chown mysql:mysql "$STATE/mysql"
    if [[ ! -d "$data/mysql" ]]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$data" --skip-test-db \
            --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed: $STATE/log/mariadb-install.log"
    fi
    setsid mariadbd --no-defaults --user=mysql --datadir="$data" \
        --socket="$STATE/mysql/mariadbd.sock" --pid-file="$STATE/mysql/mariadbd.pid" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=64M \
        </dev/null >>"$STATE/log/mariadb.log" 2>&1 &
    wait_for 60 db -e "SELECT 1" || die "MariaDB did not answer: $STATE/log/mariadb.log"
    # shellcheck disable=SC2119
    db <<SQL || die "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

start_slurmdbd() {
    [[ -n "$(live_pid slurmdbd:slurmdbd)" ]] && return 0
    slurmdbd || die "slurmdbd did not start: $STATE/log/slurmdbd.log"
    wait_for 30 sacctmgr -n show cluster || die "slurmdbd did not answer: $STATE/log/slurmdbd.log"
    # the cluster must exist in the database before slurmctld registers (an error when it does)
    sacctmgr -n show cluster format=cluster | grep -qw fgvlm ||
        sacctmgr -i add cluster fgvlm >/dev/null || die "sacctmgr add cluster fgvlm failed"
}

start_slurm() {
    if [[ -z "$(live_pid slurmctld:slurmctld)" ]]; then
        slurmctld || die "slurmctld did not start: $STATE/log/slurmctld.log"
        wait_for 30 scontrol ping || die "slurmctld did not answer: $STATE/log/slurmctld.log"
    fi
    if [[ -z "$(live_pid slurmd:slurmd)" ]]; then
        slurmd -N localhost || die "slurmd did not start: $STATE/log/slurmd.log"
    fi
    if ! wait_for 30 all_running; then
        # a node left down by an unclean stop comes back explicitly
        scontrol update nodename=localhost state=resume >/dev/null 2>&1
        wait_for 15 all_running || die "node localhost is '$(node_state)': $STATE/log/slurmd.log"
    fi
}

start() {
    if all_running; then
        say "running (state in $STATE)"
        return 0
    fi
    [[ "$(id -u)" -eq 0 ]] || cannot_start "not root (daemons, /dev/fakegpu* and apt need root)"
    mkdir -p "$STATE"/{etc,log,run,spool/ctld,spool/d,munge,mysql}
    chmod 755 "$STATE"
    local t0=$SECONDS
    install_missing
    link_client_config
    fake_gpus
    write_configs
    start_munged
    start_mariadb
    start_slurmdbd
    start_slurm
    say "started in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N %T cpus=%c mem=%m gres=%G')"
}

stop_one() {
    local d="$1" pid i
    pid="$(live_pid "$d")"
    [[ -z "$pid" ]] && return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 100; i++)); do
        [[ -e "/proc/$pid" ]] || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    say "${d%%:*} (pid $pid) did not stop in 10 s: killed"
}

stop() {
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_one "${DAEMONS[$i]}"
    done
    if [[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" == "$CONF" ]]; then
        rm -f /etc/slurm/slurm.conf
    fi
    say "stopped (state kept in $STATE)"
}

status() {
    local d pid code=0
    for d in "${DAEMONS[@]}"; do
        pid="$(live_pid "$d")"
        if [[ -n "$pid" ]]; then
            echo "${d%%:*}: running (pid $pid)"
        else
            echo "${d%%:*}: stopped"
            code=3
        fi
    done
    if [[ -n "$(live_pid slurmctld:slurmctld)" ]]; then # sinfo blocks without a controller
        echo "node localhost: $(node_state || true)"
        all_running || code=3
    fi
    return "$code"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 {start|stop|status|env}" >&2
    exit 2
    ;;
esac
