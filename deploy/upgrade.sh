#!/usr/bin/env bash
# Upgrades an installed QuantService to a new binary (or release tarball) with a config check
# before anything is stopped, backups, an atomic swap, a readiness check and an automatic
# rollback when the new version does not become ready. Run as root.
set -euo pipefail
PROG=upgrade.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/lib.sh
. "$HERE/lib.sh"

usage() {
    cat <<EOF
Usage: deploy/upgrade.sh [--prefix DIR] [--user NAME] [--timeout SECS] NEW_BINARY_OR_TARBALL

  --prefix DIR    the installation (default $DEFAULT_PREFIX)
  --user NAME     the service user (default: the owner of DIR/bin/quantservice)
  --timeout SECS  how long the new version gets to become ready (default 60)
  NEW_...         a quantservice binary, a release tarball (quantservice-*.tar.gz; checked
                  against the .sha256 file beside it when there is one) or its unpacked directory

Before anything is stopped, the new binary checks DIR/config/app.yaml as the service user
(--check-config, with /etc/quantservice/env or \$QS_ENV_FILE). Then:
  1/5 back up bin/quantservice and config/app.yaml as .bak
  2/5 stop the service          3/5 swap the binary (atomic rename)
  4/5 start the service         5/5 wait until it is ready ('quantservice ready')
If it does not become ready, the .bak binary and config are restored and started again.
The service is driven by \${QS_SERVICE_CTL:-systemctl} start|stop|is-active quantservice; on a
failure its last output is shown (the journal under systemd, else the file \$QS_SERVICE_LOG,
default DIR/logs/supervisor-stderr.log).

Exit codes: 0 upgraded and ready; 1 nothing changed (bad arguments, the new binary refused the
config, or the service could not be stopped); 2 the new version failed and the old one was
restored and is running; 3 the new version failed and so did the rollback.
EOF
}

PREFIX="$DEFAULT_PREFIX"
SVC_USER=""
TIMEOUT=60
NEW=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --user) SVC_USER="${2:?--user needs a name}"; shift 2 ;;
        --user=*) SVC_USER="${1#*=}"; shift ;;
        --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
        --timeout=*) TIMEOUT="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option '$1'" ;;
        *)
            [ -z "$NEW" ] || die "one NEW_BINARY_OR_TARBALL only (got '$NEW' and '$1')"
            NEW="$1"
            shift
            ;;
    esac
done
[ -n "$NEW" ] || { usage >&2; die "which binary or tarball? (NEW_BINARY_OR_TARBALL is missing)"; }
PREFIX="$(check_prefix "$PREFIX")"
check_secs "$TIMEOUT" --timeout
need_root
[ -f "$PREFIX/bin/quantservice" ] ||
    die "no installation in $PREFIX ($PREFIX/bin/quantservice is missing): run deploy/install.sh first"
[ -f "$PREFIX/config/app.yaml" ] || die "$PREFIX/config/app.yaml is missing"
[ -n "$SVC_USER" ] || SVC_USER="$(installed_user)"
check_user_name "$SVC_USER"
id "$SVC_USER" >/dev/null 2>&1 || die "user $SVC_USER does not exist"
lock_prefix
load_env_file

STAGED="$PREFIX/bin/.quantservice.new"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"; rm -f "$STAGED"' EXIT

# --- the new binary --------------------------------------------------------------------------------
if [ -d "$NEW" ]; then
    SRC="$NEW/bin/quantservice"
    [ -f "$SRC" ] || die "$NEW is a directory without bin/quantservice"
elif [ -f "$NEW" ] && case "$NEW" in *.tar.gz | *.tgz) true ;; *) false ;; esac; then
    if [ -f "$NEW.sha256" ]; then
        (cd "$(dirname "$NEW")" && sha256sum --quiet -c "$(basename "$NEW").sha256") ||
            die "$NEW does not match its checksum $NEW.sha256: not upgrading"
        say "checksum OK ($NEW.sha256)"
    fi
    tar -xzf "$NEW" -C "$TMP" || die "cannot unpack $NEW"
    mapfile -t found < <(find "$TMP" -path '*/bin/quantservice' -type f)
    [ "${#found[@]}" -eq 1 ] || die "$NEW should hold exactly one */bin/quantservice, found ${#found[@]}"
    SRC="${found[0]}"
elif [ -f "$NEW" ]; then
    SRC="$NEW"
else
    die "$NEW: no such file or directory"
fi
# Staged in bin/ (the service user can run it there), renamed over the old binary in step 3.
install -o "$SVC_USER" -g "$SVC_USER" -m 750 "$SRC" "$STAGED"
OLD_VERSION="$(version_of "$PREFIX/bin/quantservice")"
NEW_VERSION="$(version_of "$STAGED")"
step "Upgrading $PREFIX: ${OLD_VERSION:-?} -> ${NEW_VERSION:-?}"

# --- the check, before anything is touched -----------------------------------------------------------
step "Checking the new binary with $PREFIX/config/app.yaml as $SVC_USER (the service keeps running)"
if out="$(as_user "$STAGED" --check-config --config "$PREFIX/config/app.yaml" 2>&1)"; then
    say "config check passed"
else
    printf '%s\n' "$out" | indent >&2
    die "the new binary's config check failed (output above): nothing was changed, the service was not stopped" 1
fi

# --- 1/5 backups ---------------------------------------------------------------------------------------
step "1/5 Backing up the current version"
replace_atomically "$PREFIX/bin/quantservice" "$PREFIX/bin/quantservice.bak"
say "$PREFIX/bin/quantservice.bak (${OLD_VERSION:-?})"
replace_atomically "$PREFIX/config/app.yaml" "$PREFIX/config/app.yaml.bak"
say "$PREFIX/config/app.yaml.bak"

# rollback WHY: restores the .bak files, starts them and exits 2 (old version ready) or 3.
rollback() {
    step "The new version failed: $1"
    show_service_output
    step "Rolling back to ${OLD_VERSION:-the previous version}"
    ctl stop || warn "stopping the failed version failed (it may not be running)"
    restore_backup
    reset_start_limit
    if ! ctl start; then
        die "UPGRADE FAILED and the ROLLBACK FAILED: the previous version did not start ('${QS_SERVICE_CTL:-systemctl} start $SERVICE' failed). The new version failed because: $1" 3
    fi
    step "Waiting up to ${TIMEOUT}s for the previous version to be ready"
    if ! wait_ready "$TIMEOUT"; then
        die "UPGRADE FAILED and the ROLLBACK FAILED: the previous version started but is not ready: $REASON. The new version failed because: $1" 3
    fi
    die "UPGRADE FAILED: ${NEW_VERSION:-the new version} did not become ready: $1. Rolled back: ${OLD_VERSION:-the previous version} is running again (ready)." 2
}

# --- 2/5 stop -------------------------------------------------------------------------------------------
step "2/5 Stopping $SERVICE"
ctl stop || die "'${QS_SERVICE_CTL:-systemctl} stop $SERVICE' failed: nothing was replaced" 1

# --- 3/5 swap -------------------------------------------------------------------------------------------
step "3/5 Replacing $PREFIX/bin/quantservice"
mv -f "$STAGED" "$PREFIX/bin/quantservice"
say "${NEW_VERSION:-new binary} in place"

# --- 4/5 start ------------------------------------------------------------------------------------------
step "4/5 Starting $SERVICE"
ctl start || rollback "'${QS_SERVICE_CTL:-systemctl} start $SERVICE' failed"

# --- 5/5 ready ------------------------------------------------------------------------------------------
step "5/5 Waiting up to ${TIMEOUT}s for $SERVICE to be ready"
wait_ready "$TIMEOUT" || rollback "$REASON"
step "Upgraded to ${NEW_VERSION:-the new version}; the previous binary and config are kept as $PREFIX/bin/quantservice.bak and $PREFIX/config/app.yaml.bak (deploy/rollback.sh restores them)"
