#!/usr/bin/env bash
# A stand-in for systemctl in tests/deploy.rs (QS_SERVICE_CTL): runs QS_FAKE_PREFIX/bin/quantservice
# in the background as the owner of QS_FAKE_PREFIX, like the unit does (working directory the
# prefix, QS_CONFIG_PATH and QS_ENV_FILE's variables set, as EnvironmentFile= does), with its pid in QS_FAKE_STATE/quantservice.pid and its output
# appended to QS_FAKE_STATE/console.log. Every start is logged in QS_FAKE_STATE/starts.log.
#
# Usage: fake-ctl.sh start|stop|restart|is-active quantservice
set -euo pipefail
: "${QS_FAKE_PREFIX:?QS_FAKE_PREFIX must name the installation}"
: "${QS_FAKE_STATE:?QS_FAKE_STATE must name a directory for the pid file and the log}"
[ "${2:-}" = quantservice ] || { echo "fake-ctl: unknown service '${2:-}'" >&2; exit 5; }
pidfile="$QS_FAKE_STATE/quantservice.pid"
PROG=fake-ctl
# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../deploy/lib.sh"

# alive PID: the process exists and is not a zombie (an orphan's parent may not reap it).
alive() {
    local state
    state="$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true)"
    [ -n "$state" ] && [ "$state" != Z ]
}

running_pid() {
    local pid
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [ -n "$pid" ] && alive "$pid" && printf '%s\n' "$pid"
}

start() {
    if pid="$(running_pid)"; then
        echo "fake-ctl: already running (pid $pid)"
        return 0
    fi
    local user
    load_env_file
    user="$(stat -c %U "$QS_FAKE_PREFIX/bin/quantservice")"
    cd "$QS_FAKE_PREFIX"
    # setpriv execs (no intermediate process): $! is the daemon's pid.
    setpriv --reuid="$user" --regid="$user" --init-groups --reset-env \
        env QS_CONFIG_PATH="$QS_FAKE_PREFIX/config/app.yaml" ${ENV_ARGS[@]+"${ENV_ARGS[@]}"} \
        "$QS_FAKE_PREFIX/bin/quantservice" \
        </dev/null >>"$QS_FAKE_STATE/console.log" 2>&1 &
    echo "$!" >"$pidfile"
    echo "$!" >>"$QS_FAKE_STATE/starts.log"
    echo "fake-ctl: started pid $!"
}

stop() {
    local pid i
    if ! pid="$(running_pid)"; then
        rm -f "$pidfile"
        echo "fake-ctl: not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    # The daemon's own deadline is well under 60 s; then it is killed, like systemd would.
    for ((i = 0; i < 600; i++)); do
        alive "$pid" || { rm -f "$pidfile"; echo "fake-ctl: stopped pid $pid"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    echo "fake-ctl: pid $pid did not stop within 60 s: killed" >&2
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart) stop && start ;;
    is-active)
        if pid="$(running_pid)"; then echo active; else echo inactive; exit 3; fi
        ;;
    *) echo "fake-ctl: unknown action '${1:-}'" >&2; exit 2 ;;
esac
