#!/usr/bin/env bash
# Installs QuantService: the service user, PREFIX/{bin,config,logs,logs/archived,data}, the
# binary, the config (only if there is none) and the systemd unit. Run as root; safe to run
# again (it never overwrites an existing config/app.yaml).
set -euo pipefail
PROG=install.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOP="$(dirname "$HERE")"
# shellcheck source=deploy/lib.sh
. "$HERE/lib.sh"

usage() {
    cat <<EOF
Usage: deploy/install.sh [--prefix DIR] [--user NAME] [--binary PATH] [--no-systemd]
       deploy/install.sh [--prefix DIR] [--user NAME] --print-unit

  --prefix DIR     install here (default $DEFAULT_PREFIX)
  --user NAME      run the service as this system user, created if absent (default $DEFAULT_USER)
  --binary PATH    the quantservice binary to install (default: bin/quantservice of the
                   unpacked release, else target/dist or target/release of a source checkout)
  --no-systemd     do not install the systemd unit (e.g. for 宝塔's Supervisor, see
                   deploy/supervisor/quantservice.ini)
  --print-unit     print the unit with DIR and NAME filled in, and exit

Creates DIR/{bin,config,logs,logs/archived,data} owned by NAME:NAME, mode 750 (app.yaml 640),
installs the binary atomically and config/app.yaml only if it does not exist yet, then installs
/etc/systemd/system/quantservice.service, reloads systemd and enables the service (it does not
start it: edit config/app.yaml first, then 'systemctl start quantservice').
EOF
}

PREFIX="$DEFAULT_PREFIX"
SVC_USER="$DEFAULT_USER"
BINARY=""
SYSTEMD=1
PRINT_UNIT=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --user) SVC_USER="${2:?--user needs a name}"; shift 2 ;;
        --user=*) SVC_USER="${1#*=}"; shift ;;
        --binary) BINARY="${2:?--binary needs a path}"; shift 2 ;;
        --binary=*) BINARY="${1#*=}"; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --print-unit) PRINT_UNIT=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
PREFIX="$(check_prefix "$PREFIX")"
check_user_name "$SVC_USER"
UNIT_SRC="$HERE/quantservice.service"

# The unit as shipped names /opt/quantservice and quantsvc; these become PREFIX and the user.
unit_text() {
    [ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing"
    sed -e "s|$DEFAULT_PREFIX|$PREFIX|g" \
        -e "s/^User=$DEFAULT_USER\$/User=$SVC_USER/" \
        -e "s/^Group=$DEFAULT_USER\$/Group=$SVC_USER/" "$UNIT_SRC"
}

if [ "$PRINT_UNIT" -eq 1 ]; then
    unit_text
    exit 0
fi

need_root

# --- what to install -------------------------------------------------------------------------
if [ -z "$BINARY" ]; then
    if [ -f "$TOP/bin/quantservice" ]; then
        BINARY="$TOP/bin/quantservice"
    else
        # A source checkout: the newer of scripts/package's build and a plain release build.
        for b in "$TOP/target/dist/quantservice" "$TOP/target/release/quantservice"; do
            if [ -f "$b" ] && { [ -z "$BINARY" ] || [ "$b" -nt "$BINARY" ]; }; then
                BINARY="$b"
            fi
        done
    fi
    [ -n "$BINARY" ] || die "no binary found: not in $TOP/bin/ (a release tarball) nor in $TOP/target/{dist,release}/ (run scripts/package or 'cargo build --release'); or pass --binary PATH"
fi
[ -f "$BINARY" ] || die "--binary $BINARY: no such file"
VERSION="$("$BINARY" --version 2>&1)" || die "$BINARY does not run on this machine: $VERSION"
CONFIG_SRC="$TOP/config/app.yaml"

step "Installing $VERSION into $PREFIX (service user $SVC_USER)"
if [ -d "$PREFIX" ] && [ -n "$(ls -A "$PREFIX")" ] &&
    [ ! -e "$PREFIX/bin/quantservice" ] && [ ! -e "$PREFIX/config/app.yaml" ]; then
    die "$PREFIX exists, is not empty and holds no QuantService installation (no bin/quantservice, no config/app.yaml); refusing to take it over: choose another --prefix"
fi

# --- the service user --------------------------------------------------------------------------
# One creation at a time on this machine (parallel installs with the same user, e.g. tests);
# useradd also fails while another tool holds /etc/passwd's lock, so that is retried.
retry_locked() {
    local i out
    for i in 1 2 3 4 5 6 7 8 9 10; do
        if out="$("$@" 2>&1)"; then return 0; fi
        case "$out" in
            *"cannot lock"* | *"try again"*) sleep 1 ;;
            *) printf '%s\n' "$out" >&2; return 1 ;;
        esac
    done
    printf '%s\n' "$out" >&2
    return 1
}
LOCKDIR=/run/lock
[ -d "$LOCKDIR" ] || LOCKDIR=/tmp
exec 8>"$LOCKDIR/quantservice-install.lock"
flock -w 120 8 || die "timed out waiting for another install.sh to create its user"
if ! getent group "$SVC_USER" >/dev/null; then
    retry_locked groupadd -r "$SVC_USER" || die "cannot create group $SVC_USER"
    say "created group $SVC_USER"
fi
if ! getent passwd "$SVC_USER" >/dev/null; then
    retry_locked useradd -r -s /bin/false -d "$PREFIX" -M -g "$SVC_USER" "$SVC_USER" ||
        die "cannot create user $SVC_USER"
    say "created system user $SVC_USER (shell /bin/false, home $PREFIX)"
else
    shell="$(getent passwd "$SVC_USER" | cut -d: -f7)"
    say "user $SVC_USER exists (shell $shell): kept as it is"
    case "$shell" in
        /bin/false | /usr/sbin/nologin | /sbin/nologin | /usr/bin/false) ;;
        *) warn "user $SVC_USER has a login shell ($shell); a service user should not ('usermod -s /bin/false $SVC_USER')" ;;
    esac
fi
exec 8>&-

# The service user must be able to reach PREFIX: every existing directory above it searchable.
d="$(dirname "$PREFIX")"
while :; do
    if [ -d "$d" ] && ! runuser -u "$SVC_USER" -- test -x "$d" 9<&- 8<&-; then
        die "$SVC_USER cannot reach $PREFIX: $d is not searchable by it (mode $(stat -c %a "$d"), owner $(stat -c %U "$d")); choose another --prefix or 'chmod o+x $d'"
    fi
    [ "$d" != / ] || break
    d="$(dirname "$d")"
done

# --- layout, binary, config ------------------------------------------------------------------------
for d in "$PREFIX" "$PREFIX/bin" "$PREFIX/config" "$PREFIX/logs" "$PREFIX/logs/archived" "$PREFIX/data"; do
    mkdir -p "$d"
    chown "$SVC_USER:$SVC_USER" "$d"
    chmod 750 "$d"
done
say "layout: $PREFIX/{bin,config,logs,logs/archived,data} (owner $SVC_USER:$SVC_USER, mode 750)"
lock_prefix

# Atomic: a copy under a temporary name in bin/, then a rename over the old binary (a running
# service keeps the file it started from).
tmp="$PREFIX/bin/.quantservice.install.$$"
install -o "$SVC_USER" -g "$SVC_USER" -m 750 "$BINARY" "$tmp"
mv -f "$tmp" "$PREFIX/bin/quantservice"
say "installed $PREFIX/bin/quantservice (from $BINARY, mode 750)"

if [ -e "$PREFIX/config/app.yaml" ]; then
    say "kept the existing $PREFIX/config/app.yaml (never overwritten; the shipped default is $CONFIG_SRC)"
else
    [ -f "$CONFIG_SRC" ] || die "$CONFIG_SRC is missing and $PREFIX/config/app.yaml does not exist"
    install -o "$SVC_USER" -g "$SVC_USER" -m 640 "$CONFIG_SRC" "$PREFIX/config/app.yaml"
    say "installed the default $PREFIX/config/app.yaml: edit it (ClickHouse address and credentials) before starting"
fi
chown "$SVC_USER:$SVC_USER" "$PREFIX/config/app.yaml"
chmod 640 "$PREFIX/config/app.yaml"

# --- the systemd unit ------------------------------------------------------------------------------
START_HINT="start it under Supervisor (deploy/supervisor/quantservice.ini)"
if [ "$SYSTEMD" -eq 0 ]; then
    say "systemd unit not installed (--no-systemd); for 宝塔's Supervisor use deploy/supervisor/quantservice.ini"
elif ! command -v systemctl >/dev/null 2>&1; then
    say "systemctl not found: systemd unit not installed; run the service under Supervisor (deploy/supervisor/quantservice.ini)"
elif [ ! -d /run/systemd/system ]; then
    say "systemd is not running on this machine: systemd unit not installed; run the service under Supervisor (deploy/supervisor/quantservice.ini)"
else
    unit="/etc/systemd/system/$SERVICE.service"
    unit_text >"$unit.tmp.$$"
    chmod 644 "$unit.tmp.$$"
    mv -f "$unit.tmp.$$" "$unit"
    say "installed $unit"
    systemctl daemon-reload
    systemctl enable "$SERVICE" 2>&1 | indent
    say "enabled $SERVICE (starts at boot)"
    START_HINT="start the service: 'systemctl start $SERVICE'"
fi

if ctl is-active >/dev/null 2>&1; then
    say "note: $SERVICE is running the binary it was started with; restart it to run this one (deploy/upgrade.sh does that with a config check and automatic rollback)"
fi
step "Done. Next: edit $PREFIX/config/app.yaml (secrets may go in /etc/quantservice/env, mode 600), check it with 'runuser -u $SVC_USER -- $PREFIX/bin/quantservice --check-config --config $PREFIX/config/app.yaml', then $START_HINT."
