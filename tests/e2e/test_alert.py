"""`xdpwatch alert` as a subprocess against the real broker: exact alerts, poison
messages dead-lettered with their bytes, offsets committed (no repeat on restart)."""

from __future__ import annotations

import base64
import subprocess

import orjson
import pytest
from confluent_kafka import Producer

from xdpwatch import schemas
from xdpwatch.producer.events import Clock, EventShaper
from xdpwatch.producer.flows import FlowReport
from xdpwatch.producer.records import FlowKey, FlowValue

from .procs import XDPWATCH

pytestmark = pytest.mark.e2e

S = 10**9


class FixedClock(Clock):
    def resync(self):
        self._offset = 1_800_000_000 * S


def flow_starts(src: str, n: int, spacing_s: float) -> list[tuple[bytes, dict]]:
    shaper = EventShaper("eth0", FixedClock(), hostname="gw1")
    out = []
    for i in range(n):
        k = FlowKey(family=4, proto=6, client_port=40000 + i, server_port=22)
        k.client_addr[:4] = list(map(int, src.split(".")))
        k.server_addr[:4] = [192, 0, 2, 1]
        t = int(i * spacing_s * S)
        v = FlowValue(first_ns=t, last_ns=t, packets=1, bytes=74, tcp_flags=2, directions=1)
        doc = shaper.flow(FlowReport("flow_start", None, k, v))
        out.append((schemas.key_of("ssh-flows", doc), doc))
    return out


def alert_cmd(broker, dead_letter, *extra):
    return [XDPWATCH, "alert", "--bootstrap-servers", broker.bootstrap, "--from-beginning", "--output", "stdout",
            "--dead-letter", str(dead_letter), "--exit-when-idle", "4", "--group-id", "it-alert",
            "-X", "session.timeout.ms=6000", *extra]


def test_alerts_dead_letters_and_committed_offsets(broker_factory, tmp_path):
    broker = broker_factory()
    p = Producer({"bootstrap.servers": broker.bootstrap})
    attacker = flow_starts("203.0.113.9", 12, 1.0)   # 12 in 11 s: one brute-force alert
    slow = flow_starts("198.51.100.3", 8, 20.0)      # 8 over 140 s: none
    for key, doc in attacker + slow:
        p.produce("xdpwatch.ssh-flows", orjson.dumps(doc), key)
    good = attacker[0][1]
    poison = [b"\xff not json", orjson.dumps({"event": {"action": "flow_start"}}),
              b"[" * 5000 + b"]" * 5000,                                          # nesting beyond the limit
              orjson.dumps({**good, "pad": "x" * 300_000}),                        # huge
              orjson.dumps({**good, "source": {"ip": "203.0.113.9", "port": "22"}}),  # wrong type
              None]                                                                # tombstone
    for raw in poison:
        p.produce("xdpwatch.ssh-flows", raw, b"x")
    assert p.flush(10) == 0

    dl = tmp_path / "dead.jsonl"
    r = subprocess.run(alert_cmd(broker, dl), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    alerts = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [a["rule"]["name"] for a in alerts] == ["ssh_bruteforce"]
    a = alerts[0]
    assert schemas.errors("alerts", a) == []
    assert a["source"]["ip"] == "203.0.113.9" and a["xdpwatch"]["evidence"]["count"] == 10
    assert a["xdpwatch"]["evidence"]["first_event_id"] == attacker[0][1]["event"]["id"]
    assert a["xdpwatch"]["evidence"]["last_event_id"] == attacker[9][1]["event"]["id"]
    assert "20 events handled, 1 alerts, 6 dead-lettered" in r.stderr

    dead = [orjson.loads(line) for line in dl.read_text().splitlines()]
    assert [d["reason"].split(":")[0] for d in dead] == ["not-json", "schema", "not-json", "too-large",
                                                         "schema", "empty"]
    assert [d["value"] and base64.b64decode(d["value"]) for d in dead] == poison
    assert all(d["topic"] == "xdpwatch.ssh-flows" for d in dead)

    # Same group again: everything was committed, nothing is raised or dead-lettered twice.
    r2 = subprocess.run(alert_cmd(broker, dl), capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and r2.stdout == "", r2.stderr
    assert len(dl.read_text().splitlines()) == 6


def test_bad_rules_file_is_one_line(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[ssh_bruteforce]\nthreshhold = 3\n")
    r = subprocess.run([XDPWATCH, "alert", "--bootstrap-servers", "127.0.0.1:1", "--rules", str(rules)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"xdpwatch: error: {rules}: [ssh_bruteforce] has no setting 'threshhold' "
                                "(known: enabled, threshold, window, cooldown)")
