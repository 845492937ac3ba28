"""`make demo` in a short mode, twice in a row, as a newcomer would run it: the brute-force
alert is raised, the archive holds the events, every protocol was counted, and nothing is
left behind (namespaces, interfaces, processes; the XDP program goes with its interface
and its process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from .env import sh

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
XDPWATCH = str(Path(sys.executable).with_name("xdpwatch"))


def test_make_demo_twice(tmp_path):
    out = tmp_path / "demo"
    for run in (1, 2):
        r = subprocess.run(["make", "-C", str(ROOT), "demo", "DURATION=20", f"DEMO_DIR={out}"],
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, f"run {run}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "cleaned up: no namespace, interface, XDP program or process left behind" in r.stdout
    print("\n" + r.stdout[r.stdout.index("== xdpwatch demo summary =="):])

    s = json.loads((out / "summary.json").read_text())
    assert s["left_behind"] == [] and s["exit_codes"]["produce"] == 0
    assert s["exit_codes"]["alert"] == 0 and s["exit_codes"]["archive"] == 0
    brute = [a for a in s["alerts"] if a["rule"] == "ssh_bruteforce"]
    assert len(brute) == 1 and brute[0]["source"] == "198.18.0.2"
    spike = [a for a in s["alerts"] if a["rule"] == "traffic_spike" and a["interface"] == "xwc0"]
    assert len(spike) == 1 and int(spike[0]["message"].split()[0]) > 10_000  # the UDP flood, at the client's port
    # one producer, two interfaces, each with its own records: what the client sends and what the server answers
    assert set(s["packets_by_interface"]) == {"xwc0", "xws0"} and min(s["packets_by_interface"].values()) > 0
    assert sum(s["packets_by_interface"].values()) == s["packets"]["total"]
    for cls in ("tcp", "udp", "icmp", "ssh"):
        assert s["packets"][cls] > 0, cls
    assert s["kernel_drops"] == 0
    d = s["producer_delivery"]
    assert d["produced"] == d["delivered"] > 0 and d["failed"] == 0

    # The archive (second run only: the first one's was removed) holds every message the
    # demo read back from Kafka: flows, counts and the alerts.
    r = subprocess.run([XDPWATCH, "replay", "--dir", str(out / "archive")], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    docs = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert len(docs) == s["messages_total"]
    starts = [d for d in docs if d.get("event", {}).get("action") == "flow_start"]
    assert len(starts) == s["ssh_flows"]["started"] >= 15
    assert sum(d["packets"]["total"] for d in docs if "packets" in d) == s["packets"]["total"]
    assert sorted(d["rule"]["name"] for d in docs if d["event"]["kind"] == "alert") == \
        sorted(a["rule"] for a in s["alerts"])

    # Nothing left behind, checked independently of the demo's own report.
    assert not [ns for ns in sh("ip", "netns", "list").stdout.split() if ns.startswith("xw0-")]
    for dev in ("xwc0", "xws0", "xwbr0"):
        assert not Path(f"/sys/class/net/{dev}").exists(), dev
    assert sh("pgrep", "-f", f"xdpwatch .*{out}", check=False).stdout == ""
    assert sh("pgrep", "-f", "iface xwc0 ", check=False).stdout == ""
