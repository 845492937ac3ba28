"""The budget of `xdpwatch alert --block-on` with the real broker (validating every record
of every topic against our schemas): five sources each make a brute-force alert, the budget
allows two block commands a minute, and the rest become one block_budget_exhausted alert
(the others counted, in the metrics and the final log line)."""

from __future__ import annotations

import orjson
import pytest
from confluent_kafka import Producer

from xdpwatch import schemas
from xdpwatch.consumers.alert import alert_id

from .env import consume_all, free_port, scrape, wait_for
from .procs import XdpwatchProc
from .test_alert import connections

pytestmark = pytest.mark.e2e

RULES = """
[ssh_bruteforce]
threshold = 3
window = 60
cooldown = 600
"""
SOURCES = [f"203.0.113.{i}" for i in range(10, 15)]


def test_block_budget_turns_blocks_beyond_the_rate_into_one_alert(broker_factory, tmp_path):
    broker = broker_factory(value_schemas={f"xdpwatch.{s}": schemas.load(s) for s in schemas.names()})
    events = [doc for src in SOURCES for _, doc in connections(src, 3, 1.0)]
    assert [schemas.errors("ssh-flows", d) for d in events] == [[]] * len(events)
    p = Producer({"bootstrap.servers": broker.bootstrap})
    for doc in events:
        p.produce("xdpwatch.ssh-flows", orjson.dumps(doc), schemas.key_of("ssh-flows", doc))
    assert p.flush(10) == 0
    (tmp_path / "rules.toml").write_text(RULES)

    port = free_port()
    with XdpwatchProc("alert", "--bootstrap-servers", broker.bootstrap, "--from-beginning",
                      "--rules", str(tmp_path / "rules.toml"), "--block-on", "ssh_bruteforce", "--block-rate", "2",
                      "--dead-letter", str(tmp_path / "dl.jsonl"), "--metrics-port", str(port),
                      "--group-id", "it-budget", "-X", "session.timeout.ms=6000") as alert:
        def all_handled():
            m = scrape(port)
            return m if m.get('xdpwatch_consumer_messages_total{command="alert",outcome="handled"}') == len(events) else {}

        m = wait_for(all_handled, 60, "every event handled")
        assert (m['xdpwatch_block_commands_total{command="alert"}'],
                m['xdpwatch_blocks_refused_total{command="alert"}']) == (2, 3)
        assert alert.stop() == 0, alert.stderr
    assert f"{len(events)} events handled" in alert.stderr and "0 dead-lettered" in alert.stderr
    assert "2 block commands, 3 refused by the budget (1 block_budget_exhausted alerts)" in alert.stderr

    alerts = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.alerts", min_messages=6)]
    commands = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.control", min_messages=2)]
    assert all(schemas.errors("alerts", a) == [] for a in alerts)
    assert all(schemas.errors("control", c) == [] for c in commands)
    brute = {a["event"]["id"]: a for a in alerts if a["rule"]["name"] == "ssh_bruteforce"}
    assert sorted(a["source"]["ip"] for a in brute.values()) == SOURCES  # one alert per source
    budget = [a for a in alerts if a["rule"]["name"] == "block_budget_exhausted"]

    # Exactly two blocks, each named after the alert that caused it.
    assert len(commands) == 2
    blocked = set()
    for doc in commands:
        c = doc["command"]
        cause = brute[c["alert_id"]]
        assert (c["id"], c["action"], c["prefix"], c["issued_by"], c["ttl_s"]) == (
            f"alert-{cause['event']['id']}", "block", cause["source"]["ip"], "alert:ssh_bruteforce", 900)
        blocked.add(c["prefix"])
    assert len(blocked) == 2

    # The third source: a budget alert instead of a block; the last two only counted (cooldown).
    (b,) = budget
    cause = next(a for a in brute.values() if a["source"]["ip"] == b["source"]["ip"])
    assert b["source"]["ip"] not in blocked
    ev = b["xdpwatch"]["evidence"]
    assert (ev["first_event_id"], ev["last_event_id"], ev["count"], ev["window_s"]) == (
        cause["event"]["id"], cause["event"]["id"], 2, 60)
    assert b["event"]["id"] == alert_id("block_budget_exhausted", b["source"]["ip"], cause["event"]["id"])
    assert b["message"] == (f"block budget exhausted (rate: 2 block commands in the last 60s, limit 2): "
                            f"{b['source']['ip']} not blocked for ssh_bruteforce alert {cause['event']['id']}")
