#!/usr/bin/env bash
# systemctl-style front for Supervisor (宝塔's Supervisor manager), so deploy/upgrade.sh and
# deploy/rollback.sh can drive a Supervisor program:
#
#   QS_SERVICE_CTL=/path/to/deploy/supervisor/ctl.sh deploy/upgrade.sh NEW_TARBALL
#
# Usage: ctl.sh start|stop|restart|is-active PROGRAM
# QS_SUPERVISORCTL is the supervisorctl command (default "supervisorctl"; split on spaces,
# e.g. "supervisorctl -c /etc/supervisor/supervisord.conf").
# is-active prints active (exit 0) when `supervisorctl status PROGRAM` shows RUNNING, else the
# state (exit 3), like systemctl.
set -euo pipefail

[ $# -eq 2 ] || {
    echo "usage: $0 start|stop|restart|is-active PROGRAM" >&2
    exit 2
}
action="$1"
program="$2"
read -ra sctl <<<"${QS_SUPERVISORCTL:-supervisorctl}"

# run ACTION: supervisorctl ACTION PROGRAM, with its output; 0 on success. Older supervisorctl
# versions exit 0 even on errors, so their output is read as well.
run() {
    local out rc
    out="$("${sctl[@]}" "$1" "$program" 2>&1)" && rc=0 || rc=$?
    printf '%s\n' "$out"
    case "$out" in
        *"already started"* | *"not running"*) return 0 ;;
        *ERROR* | *FATAL* | *"no such"*) return 1 ;;
    esac
    return "$rc"
}

case "$action" in
    start | stop | restart) run "$action" ;;
    is-active)
        out="$("${sctl[@]}" status "$program" 2>&1 || true)"
        # "quantservice   RUNNING   pid 123, uptime 0:01:02"
        state="$(printf '%s\n' "$out" | awk -v p="$program" '$1 == p { print $2 }')"
        if [ "$state" = RUNNING ]; then
            echo active
            exit 0
        fi
        echo "${state:-unknown}" | tr '[:upper:]' '[:lower:]'
        exit 3
        ;;
    *)
        echo "$0: unknown action '$action' (start|stop|restart|is-active)" >&2
        exit 2
        ;;
esac
