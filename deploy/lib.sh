# shellcheck shell=bash
# Shared by install.sh, upgrade.sh and rollback.sh (sourced, not run): messages, argument
# checks, the lock on the prefix, the service command ($QS_SERVICE_CTL) and the readiness check.

SERVICE=quantservice
# shellcheck disable=SC2034 # used by the scripts that source this file
DEFAULT_PREFIX=/opt/quantservice
DEFAULT_USER=quantsvc
# What the checks run as the service user get on PATH (systemd gives services a clean one).
SERVICE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf '%s\n' "$*"; }
step() { printf '==> %s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
# die MESSAGE [EXIT_CODE]
die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    exit "${2:-1}"
}
# Prints OUTPUT indented, for the output of a command quoted in a message.
indent() { sed 's/^/    /'; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it manages the service user, owners and the service)"
}

# check_prefix DIR: an absolute path of plain characters, not / (it is substituted into the
# unit and the scripts refuse to guess about odd paths). Prints it without a trailing slash.
check_prefix() {
    local p="${1%/}"
    [[ "$p" =~ ^/[A-Za-z0-9._/-]+$ ]] ||
        die "--prefix must be an absolute path of letters, digits and . _ - / (got '$1')"
    [[ "$p" != *"/../"* && "$p" != *"/.." ]] || die "--prefix must not contain '..' (got '$1')"
    printf '%s\n' "$p"
}

check_user_name() {
    [[ "$1" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
        die "--user must be a valid user name ([a-z_][a-z0-9_-]*, at most 32 characters), got '$1'"
}

# check_secs VALUE NAME: a positive whole number of seconds.
check_secs() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "$2 must be a whole number of seconds, got '$1'"
}

# lock_prefix: one install/upgrade/rollback of PREFIX at a time (fd 9 holds the lock until exit;
# it is closed for every command that might outlive this script).
lock_prefix() {
    exec 9<"$PREFIX"
    flock -n 9 || die "another install, upgrade or rollback of $PREFIX is running"
}

# ctl ACTION: start|stop|restart|is-active the service through ${QS_SERVICE_CTL:-systemctl}
# (split on spaces, so "supervisorctl -c FILE"-style wrappers work).
ctl() {
    local cmd
    read -ra cmd <<<"${QS_SERVICE_CTL:-systemctl}"
    "${cmd[@]}" "$1" "$SERVICE" 9<&-
}

# reset_start_limit: under systemd, forgets the failed starts of the version being replaced, so
# that StartLimitBurst= does not refuse the start of the restored one.
reset_start_limit() {
    if [ -z "${QS_SERVICE_CTL:-}" ]; then
        systemctl reset-failed "$SERVICE" 9<&- 2>/dev/null || true
    fi
}

# Owner of the installed binary: the service user when --user is not given.
installed_user() {
    stat -c %U "$PREFIX/bin/quantservice" 2>/dev/null || printf '%s\n' "$DEFAULT_USER"
}

# load_env_file: the service's secrets file (QS_ENV_FILE, default /etc/quantservice/env, the
# unit's EnvironmentFile) into ENV_ARGS as KEY=VALUE, for the checks run as the service user.
ENV_ARGS=()
load_env_file() {
    local f="${QS_ENV_FILE:-/etc/quantservice/env}" line key val
    [ -e "$f" ] || return 0
    [ -r "$f" ] || die "cannot read $f (the service's environment file)"
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in '' | '#'* | ';'*) continue ;; esac
        key="${line%%=*}"
        val="${line#*=}"
        key="${key%"${key##*[![:space:]]}"}"
        [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        if [[ "$val" =~ ^\"(.*)\"$ || "$val" =~ ^\'(.*)\'$ ]]; then
            val="${BASH_REMATCH[1]}"
        fi
        ENV_ARGS+=("$key=$val")
    done <"$f"
}

# as_user COMMAND...: runs COMMAND as the service user in PREFIX with the environment the
# service gets (a clean one, QS_CONFIG_PATH and the environment file), like systemd would.
as_user() {
    (
        cd "$PREFIX" &&
            runuser -u "$SVC_USER" -- env -i PATH="$SERVICE_PATH" LANG=C.UTF-8 \
                QS_CONFIG_PATH="$PREFIX/config/app.yaml" ${ENV_ARGS[@]+"${ENV_ARGS[@]}"} "$@" 9<&-
    )
}

# version_of BINARY: its --version line (as the service user), or a note that it has none.
version_of() {
    as_user "$1" --version 2>/dev/null | head -n 1 || true
}

# wait_ready SECS: waits up to SECS for the installed binary's service to be ready; returns 0
# when it is, else 1 with REASON set. Readiness is `quantservice ready` (the ops endpoint's
# /readyz). When that cannot tell — the endpoint is disabled (exit 3), or the binary predates the
# command (exit 2, a usage error) — the service must stay active for a settle period
# (QS_SETTLE_SECS, default 15, at most SECS) instead.
REASON=""
wait_ready() {
    local secs="$1" out rc left chunk inactive=0 deadline=$((SECONDS + $1))
    # `ready` in chunks of at most 2 s, so that a service that died (is-active false twice in a
    # row) is reported at once rather than after the whole timeout.
    while :; do
        left=$((deadline - SECONDS))
        [ "$left" -ge 1 ] || left=1
        chunk=$((left < 2 ? left : 2))
        out="$(as_user "$PREFIX/bin/quantservice" ready --timeout "${chunk}s" \
            --config "$PREFIX/config/app.yaml" 2>&1)" && rc=0 || rc=$?
        case "$rc" in
            0)
                say "ready"
                return 0
                ;;
            2 | 3) break ;;
        esac
        if ctl is-active >/dev/null 2>&1; then
            inactive=0
        else
            inactive=$((inactive + 1))
        fi
        if [ "$inactive" -ge 2 ] || [ "$SECONDS" -ge "$deadline" ]; then
            # `ready` says why: "error: not ready within 2s; last answer from …".
            REASON="$(printf '%s' "$out" | tail -n 5 | sed 's/^error: //; s/^not ready within [^;]*; //')"
            if [ "$inactive" -ge 2 ]; then
                REASON="not ready: the service is not running; ${REASON:-no answer}"
            else
                REASON="not ready within ${secs}s; ${REASON:-no answer}"
                ctl is-active >/dev/null 2>&1 || REASON="$REASON (the service is not running)"
            fi
            return 1
        fi
    done
    local settle="${QS_SETTLE_SECS:-15}" i
    [ "$settle" -le "$secs" ] || settle="$secs"
    if [ "$rc" -eq 3 ]; then
        say "the ops endpoint is disabled (app.http.listen: \"\"): checking that the service stays active for ${settle}s instead"
    else
        say "this binary has no 'ready' command: checking that the service stays active for ${settle}s instead"
    fi
    for ((i = 0; i <= settle; i++)); do
        if ! ctl is-active >/dev/null 2>&1; then
            REASON="the service stopped running within ${i}s of its start"
            return 1
        fi
        [ "$i" -eq "$settle" ] || sleep 1
    done
    say "active for ${settle}s"
    return 0
}

# replace_atomically SRC DEST: copies SRC next to DEST (mode, owner and times kept) and renames
# it over DEST, so DEST is always either the old or the new file.
replace_atomically() {
    local tmp
    tmp="$(dirname "$2")/.$(basename "$2").tmp.$$"
    cp -p "$1" "$tmp"
    mv -f "$tmp" "$2"
}

# restore_backup: puts bin/quantservice.bak and config/app.yaml.bak (if any) back in place;
# the .bak files stay.
restore_backup() {
    replace_atomically "$PREFIX/bin/quantservice.bak" "$PREFIX/bin/quantservice"
    say "restored $PREFIX/bin/quantservice from quantservice.bak"
    if [ -f "$PREFIX/config/app.yaml.bak" ]; then
        replace_atomically "$PREFIX/config/app.yaml.bak" "$PREFIX/config/app.yaml"
        say "restored $PREFIX/config/app.yaml from app.yaml.bak"
    fi
}

# show_service_output: the service's last output, to show why a start failed: the journal
# since this script started when the service manager is systemd, else the file
# $QS_SERVICE_LOG (default PREFIX/logs/supervisor-stderr.log, the Supervisor program's stderr).
START_EPOCH="$(date +%s)"
show_service_output() {
    local f="${QS_SERVICE_LOG:-}"
    if [ -z "$f" ] && [ -z "${QS_SERVICE_CTL:-}" ] && command -v journalctl >/dev/null 2>&1; then
        say "its last output (journalctl -u $SERVICE):"
        journalctl -u "$SERVICE" --since "@$START_EPOCH" -n 30 --no-pager -q 2>/dev/null | indent || true
        return 0
    fi
    [ -n "$f" ] || f="$PREFIX/logs/supervisor-stderr.log"
    if [ -f "$f" ]; then
        say "its last output ($f):"
        tail -n 30 "$f" | indent
    fi
}
