#!/usr/bin/env bash
# Manual rollback: stops QuantService, puts back the binary and config upgrade.sh backed up
# (bin/quantservice.bak, config/app.yaml.bak), starts it and checks that it is ready. Run as root.
set -euo pipefail
PROG=rollback.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/lib.sh
. "$HERE/lib.sh"

usage() {
    cat <<EOF
Usage: deploy/rollback.sh [--prefix DIR] [--user NAME] [--timeout SECS]

  --prefix DIR    the installation (default $DEFAULT_PREFIX)
  --user NAME     the service user (default: the owner of DIR/bin/quantservice)
  --timeout SECS  how long the restored version gets to become ready (default 60)

Steps: 1/4 stop the service, 2/4 restore bin/quantservice.bak (and config/app.yaml.bak if
present), 3/4 start it, 4/4 wait until it is ready. The .bak files stay.
Exit codes: 0 rolled back and ready; 1 failed (nothing to roll back to, or not ready).
EOF
}

PREFIX="$DEFAULT_PREFIX"
SVC_USER=""
TIMEOUT=60
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --user) SVC_USER="${2:?--user needs a name}"; shift 2 ;;
        --user=*) SVC_USER="${1#*=}"; shift ;;
        --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
        --timeout=*) TIMEOUT="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
PREFIX="$(check_prefix "$PREFIX")"
check_secs "$TIMEOUT" --timeout
need_root
[ -f "$PREFIX/bin/quantservice.bak" ] ||
    die "nothing to roll back to: $PREFIX/bin/quantservice.bak does not exist (deploy/upgrade.sh makes it)"
[ -n "$SVC_USER" ] || SVC_USER="$(installed_user)"
check_user_name "$SVC_USER"
id "$SVC_USER" >/dev/null 2>&1 || die "user $SVC_USER does not exist"
lock_prefix
load_env_file

CURRENT="$(version_of "$PREFIX/bin/quantservice")"
BACKUP="$(version_of "$PREFIX/bin/quantservice.bak")"
step "Rolling back $PREFIX: ${CURRENT:-?} -> ${BACKUP:-?}"
[ -f "$PREFIX/config/app.yaml.bak" ] ||
    warn "no $PREFIX/config/app.yaml.bak: the current config/app.yaml stays"

step "1/4 Stopping $SERVICE"
ctl stop || warn "'${QS_SERVICE_CTL:-systemctl} stop $SERVICE' failed (it may not be running); going on"
step "2/4 Restoring the backup"
restore_backup
reset_start_limit
step "3/4 Starting $SERVICE"
ctl start || die "'${QS_SERVICE_CTL:-systemctl} start $SERVICE' failed after restoring the backup"
step "4/4 Waiting up to ${TIMEOUT}s for $SERVICE to be ready"
wait_ready "$TIMEOUT" || {
    show_service_output
    die "rolled back to ${BACKUP:-the backup}, but it is not ready: $REASON"
}
step "Rolled back: ${BACKUP:-the backup} is running (ready)"
