#!/usr/bin/env bash
# `sudo make install-systemd`: the producer as a systemd service (README "Bare metal (systemd)").
# Idempotent: run it again to upgrade. It installs
#   PREFIX (/opt/xdpwatch)                  a venv with xdpwatch and the locked packages
#   /etc/sysusers.d/xdpwatch.conf           the system user xdpwatch (created by systemd-sysusers)
#   /etc/systemd/system/xdpwatch-producer.service   replaced on every run (customize with drop-ins)
#   /etc/xdpwatch/producer.env              0640 root, never overwritten
#   /etc/xdpwatch/kafka.properties          0600 xdpwatch, never overwritten
# and runs `systemctl daemon-reload` when systemd is running. It never starts or enables the
# service: edit the configuration first. DESTDIR installs under another root (tests, images);
# the venv's scripts then name DESTDIR/PREFIX, so run them only there.
set -euo pipefail
cd "$(dirname "$0")/.."
# Whatever root's umask, the venv must be readable by user xdpwatch.
umask 022

log() { printf '[install-systemd] %s\n' "$*" >&2; }
die() { printf 'install-systemd: error: %s\n' "$*" >&2; exit 1; }

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/xdpwatch}
[[ $PREFIX == /* ]] || die "PREFIX must be an absolute path, not $PREFIX"
[[ -z $DESTDIR || $DESTDIR == /* ]] || die "DESTDIR must be an absolute path, not $DESTDIR"
[[ $(id -u) == 0 ]] || die "run as root: sudo make install-systemd"
command -v systemd-sysusers >/dev/null || die "systemd-sysusers not found: this installs a systemd service"
# What the producer needs at run time from Debian (not PyPI): bcc, and headers of the running kernel.
/usr/bin/python3 -c 'import bcc' 2>/dev/null \
  || die "bcc's Python module is missing: apt-get install python3-bpfcc libbpfcc libbpf1 python3-venv"
[[ -e /lib/modules/$(uname -r)/build ]] \
  || die "no kernel headers for $(uname -r) (/lib/modules/$(uname -r)/build): apt-get install linux-headers-$(uname -r)"

venv=$DESTDIR$PREFIX
etc=$DESTDIR/etc
unit=deploy/systemd/xdpwatch-producer.service

# 1. The venv, from Debian's python (bcc lives there), with exactly the packages of
# requirements-image.lock (sha256 checked, wheels only, as in the Docker image), then
# xdpwatch itself. Each step runs again only when what it installs changed.
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  log "creating the venv $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
deps_stamp=$venv/.deps-$(cat requirements-image.lock | sha256sum | cut -c1-16)
if [[ ! -e $deps_stamp ]]; then
  log "installing the locked Python packages (requirements-image.lock, hashes checked)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --only-binary :all: \
    -r requirements-image.lock
  rm -f "$venv"/.deps-*; touch "$deps_stamp"
fi
src_hash=$(find pyproject.toml README.md xdpwatch producer consumers kafka schemas bpf -type f \
             \( -name '*.py' -o -name '*.json' -o -name '*.c' -o -name '*.h' -o -name '*.toml' -o -name '*.md' \) \
             -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
src_stamp=$venv/.xdpwatch-$src_hash
if [[ ! -e $src_stamp ]]; then
  log "installing xdpwatch $(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
    --force-reinstall .
  install -m 0644 README.md "$venv/README.md"   # the unit's Documentation=
  rm -f "$venv"/.xdpwatch-*; touch "$src_stamp"
else
  log "xdpwatch in $venv is up to date"
fi
"$venv/bin/xdpwatch" --version >/dev/null

# 2. The system user (systemd-sysusers creates it only when missing).
install -d -m 0755 "$etc/sysusers.d"
install -m 0644 deploy/systemd/xdpwatch.sysusers "$etc/sysusers.d/xdpwatch.conf"
systemd-sysusers ${DESTDIR:+--root="$DESTDIR"} "$etc/sysusers.d/xdpwatch.conf"
uid=$(awk -F: '$1 == "xdpwatch" {print $3}' "$etc/passwd")
gid=$(awk -F: '$1 == "xdpwatch" {print $4}' "$etc/passwd")
[[ -n $uid && -n $gid ]] || die "user xdpwatch missing from $etc/passwd after systemd-sysusers"

# 3. The unit: ours, replaced on every run (its ExecStart follows PREFIX).
install -d -m 0755 "$etc/systemd/system"
sed "s|/opt/xdpwatch/|$PREFIX/|g" "$unit" > "$etc/systemd/system/.xdpwatch-producer.service.new"
chmod 0644 "$etc/systemd/system/.xdpwatch-producer.service.new"
mv -f "$etc/systemd/system/.xdpwatch-producer.service.new" "$etc/systemd/system/xdpwatch-producer.service"

# 4. The configuration: the operator's once it exists, never overwritten.
install -d -m 0755 -o 0 -g 0 "$etc/xdpwatch"
install_once() {  # SOURCE DEST MODE OWNER GROUP
  if [[ -e $2 || -L $2 ]]; then
    log "kept $2 (yours)"
  else
    install -m "$3" -o "$4" -g "$5" "$1" "$2"
    log "installed $2 (mode $3): edit it"
  fi
}
install_once deploy/systemd/producer.env "$etc/xdpwatch/producer.env" 0640 0 0
install_once deploy/systemd/kafka.properties "$etc/xdpwatch/kafka.properties" 0600 "$uid" "$gid"

# 5. Tell systemd, if it runs (not in a container build, not for DESTDIR).
if [[ -z $DESTDIR && -d /run/systemd/system ]]; then
  systemctl daemon-reload
  log "systemd reloaded. Next: edit /etc/xdpwatch/producer.env (and kafka.properties), then"
  log "  systemctl enable --now xdpwatch-producer && journalctl -u xdpwatch-producer -f"
else
  log "systemd is not running here (or DESTDIR is set): no daemon-reload"
fi
