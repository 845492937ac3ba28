#!/usr/bin/env bash
# Regenerate the hash locks that `make setup` and the Dockerfile install from:
#   requirements.lock        everything `make setup` puts in .venv: xdpwatch's dependencies
#                            with the test and bench extras, and the build backend (setuptools)
#   requirements-image.lock  the same pins, less the extras: what the image needs
# Each package is pinned to one version with the sha256 of every file PyPI serves for it,
# resolved for Debian's /usr/bin/python3 (3.11), the interpreter the venv is built from.
# Pins already in requirements.lock are kept while they still fit pyproject.toml;
# UPGRADE=1 moves everything to the newest versions. Review the diff before committing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[lock] %s\n' "$*" >&2; }

PIP_TOOLS=pip-tools==7.6.2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A throwaway venv without the system's site packages: resolve from PyPI alone.
/usr/bin/python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "$PIP_TOOLS"
compile() {
  CUSTOM_COMPILE_COMMAND="make lock" "$tmp/venv/bin/pip-compile" -q --generate-hashes --allow-unsafe --all-build-deps --strip-extras \
    --no-emit-index-url --no-emit-find-links \
    ${UPGRADE:+--upgrade} "$@" pyproject.toml
}
log "resolving requirements.lock (with extras test, bench)"
compile --extra test --extra bench -o requirements.lock
log "resolving requirements-image.lock (the same pins, no extras)"
cp requirements.lock "$tmp/image.lock"  # pip-compile keeps the pins it finds in its output file
compile -o "$tmp/image.lock"
cp "$tmp/image.lock" requirements-image.lock
log "done: $(grep -c '^[a-z]' requirements.lock) and $(grep -c '^[a-z]' requirements-image.lock) packages"
