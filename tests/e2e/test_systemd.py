"""Bare metal: `make install-systemd` into a temporary root (files, modes, owners, the user,
a working venv; a second run changes nothing and keeps the operator's configuration), then
the installed producer run as its unit runs it: its user, only the unit's three
capabilities (ambient), no_new_privs, everything read-only but its state directory, a
private /tmp and /dev. It reads its 0600 Kafka settings, attaches to a veth in namespaces
the test creates, and counts exactly into the real broker.

systemd is not PID 1 here, so the unit's process is built from the unit's own directives
(tests/systemd_unit.py): a directive it does not know fails the test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from xdpwatch.producer import libbpf
from xdpwatch.producer.loader import ifindex_of

from .. import systemd_unit
from .env import NOBODY_MAC, WireTap, documents
from .procs import XdpwatchProc

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/opt/xdpwatch"
CAPS = {"CAP_NET_ADMIN": 12, "CAP_PERFMON": 38, "CAP_BPF": 39}


def install(destdir: Path) -> subprocess.CompletedProcess:
    # Under root's strictest umask: the venv must still be readable by the service's user.
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "install-systemd", f"DESTDIR={destdir}"],
                       capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o077))
    assert r.returncode == 0, r.stderr
    return r


def user_of(destdir: Path) -> list[str]:
    rows = [line.split(":") for line in (destdir / "etc/passwd").read_text().splitlines()]
    matches = [r for r in rows if r[0] == "xdpwatch"]
    assert len(matches) == 1, matches
    return matches[0]


def mode_owner(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_mode & 0o7777, st.st_uid, st.st_gid


@pytest.fixture(scope="module")
def installed():
    """`make install-systemd DESTDIR=…` once, into a root that starts with this host's users
    (so the new user gets a uid free here too). Under /var/lib: the unit's sandbox hides
    /tmp, /home and /root."""
    destdir = Path(tempfile.mkdtemp(prefix="xw-systemd-", dir="/var/lib"))
    destdir.chmod(0o755)  # as / is
    (destdir / "etc").mkdir()
    for f in ("passwd", "group", "shadow", "gshadow"):
        shutil.copy2(f"/etc/{f}", destdir / "etc" / f)
    first = install(destdir)
    yield destdir, first
    shutil.rmtree(destdir, ignore_errors=True)


def test_install_files_modes_owners_and_idempotence(installed):
    destdir, first = installed
    name, _, uid, gid, _, home, shell = user_of(destdir)
    uid, gid = int(uid), int(gid)
    assert 0 < uid < 1000 and home == "/var/lib/xdpwatch" and shell == "/usr/sbin/nologin"  # a system user
    etc = destdir / "etc"
    unit = etc / "systemd/system/xdpwatch-producer.service"
    assert unit.read_text() == systemd_unit.UNIT.read_text()  # the default PREFIX: as in the repository
    expected = {unit: (0o644, 0, 0), etc / "xdpwatch": (0o755, 0, 0),
                etc / "xdpwatch/producer.env": (0o640, 0, 0),
                etc / "xdpwatch/kafka.properties": (0o600, uid, gid),
                etc / "sysusers.d/xdpwatch.conf": (0o644, 0, 0)}
    assert {p: mode_owner(p) for p in expected} == expected
    assert (etc / "xdpwatch/producer.env").read_text() == (ROOT / "deploy/systemd/producer.env").read_text()
    venv = destdir / PREFIX.lstrip("/")
    version = subprocess.run([venv / "bin/xdpwatch", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "xdpwatch 0.1.0"
    assert subprocess.run([venv / "bin/python", "-c", "import bcc, xdpwatch.producer.loader"], cwd="/").returncode == 0
    assert "no daemon-reload" in first.stderr  # DESTDIR: the running systemd (if any) is not this root's

    # The operator edits the configuration; a second run keeps it and changes nothing else.
    (etc / "xdpwatch/producer.env").write_text("XDPWATCH_IFACE='eth7'\n")
    (etc / "xdpwatch/kafka.properties").write_text("client.id=mine\n")
    before = {p: (mode_owner(p), p.read_bytes()) for p in expected if p.is_file()}
    passwd, group = (etc / "passwd").read_text(), (etc / "group").read_text()
    second = install(destdir)
    assert {p: (mode_owner(p), p.read_bytes()) for p in expected if p.is_file()} == before
    assert (etc / "passwd").read_text() == passwd and (etc / "group").read_text() == group
    assert "up to date" in second.stderr and second.stderr.count("(yours)") == 2
    assert "creating the venv" not in second.stderr and "installing" not in second.stderr


def test_producer_runs_as_its_unit_says(installed, testnet, broker_factory):
    destdir, _ = installed
    _, _, uid, gid, _, home, _ = user_of(destdir)
    uid, gid = int(uid), int(gid)
    net = testnet
    tap = WireTap()  # in front of the broker: hears the client.id from kafka.properties
    broker = broker_factory(advertise=tap.port)
    tap.target = broker.port
    config = destdir / "etc/xdpwatch"
    state = destdir / "var/lib/xdpwatch"
    state.mkdir(parents=True, exist_ok=True)  # what StateDirectory= does: owned by the user, 0700
    os.chown(state, uid, gid)
    state.chmod(0o700)
    (config / "kafka.properties").write_text("# the operator's settings\nclient.id=xw-systemd-unit\n")
    (config / "producer.env").write_text(
        f"XDPWATCH_IFACE='{net.iface}'\nXDPWATCH_BOOTSTRAP_SERVERS='127.0.0.1:{tap.port}'\n"
        f"XDPWATCH_INTERVAL='0.3'\nXDPWATCH_SUMMARY_FILE='{state}/summary.json'\n")
    unit = systemd_unit.service()
    argv, env = systemd_unit.sandbox(unit, uid=uid, gid=gid, home=home, state_dir=state, config_dir=config,
                                     paths={PREFIX: str(destdir / PREFIX.lstrip("/")),
                                            "/etc/xdpwatch": str(config)})
    assert argv[-4:] == ["--kafka-config", f"{config}/kafka.properties", "--spool-dir", f"{state}/spool"]
    p = XdpwatchProc.exact(argv, env)
    with p:
        p.wait_for_log("attached XDP program", timeout=90)
        # unshare, sh and setpriv each exec the next: the producer has the Popen pid.
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{p.proc.pid}/status").read_text().splitlines())
        assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4
        assert status["Groups"].strip() == ""
        wanted = sum(1 << bit for bit in CAPS.values())
        for s in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
            assert int(status[s], 16) == wanted, (s, status[s])
        assert status["NoNewPrivs"].strip() == "1"
        mounts = {f.split()[4]: f.split()[5] for f in Path(f"/proc/{p.proc.pid}/mountinfo").read_text().splitlines()}
        assert mounts["/"].startswith("ro") and mounts[str(state)].startswith("rw")  # bcc compiled with / read-only
        frames = [bytes(Ether(src=net.cli_mac, dst=NOBODY_MAC) / IP(src=net.cli_ip, dst=net.srv_ip) / UDP(dport=9999))] * 30
        net.send_frames(frames)
        time.sleep(1.0)  # at least one interval after the frames
        rc = p.stop(signal.SIGTERM)
    assert rc == 0, p.stderr
    assert libbpf.xdp_query(ifindex_of(net.iface)).prog_id == 0  # detached
    assert b"xw-systemd-unit" in tap.heard  # the settings came from the 0600 file
    docs = [d for _, d in documents(broker, "xdpwatch.packet-counts")]
    tap.close()
    assert sum(d["packets"]["udp"] for d in docs) == 30 and docs[-1]["interval"]["final"]
    # What it wrote is in its state directory, owned by its user, for it alone.
    assert mode_owner(state / "spool") == (0o700, uid, gid)
    assert mode_owner(state / "summary.json") == (0o600, uid, gid)
