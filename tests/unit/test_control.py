"""The control plane alone: durations, commands against their schema, --block-on."""

from __future__ import annotations

import re

import pytest

from xdpwatch import schemas
from xdpwatch.consumers.alert import alert_id
from xdpwatch.consumers.control import (BlockBudget, BlockOnAlert, Exhausted, blockable, budget_alert, command,
                                        parse_duration)
from xdpwatch.consumers.errors import ConsumerError
from xdpwatch.producer.enforcement import Policy, parse_prefix


@pytest.mark.parametrize("text,seconds", [("900", 900), ("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800),
                                          ("1.5h", 5400), (" 10 m ", 600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-1m", "0s", "0.2s", "m"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_commands_follow_the_schema_and_key_by_prefix():
    doc = command("block", "203.0.113.0/24", "operator:me@here", ttl_s=60, reason="r", alert_id="a1")
    assert schemas.errors("control", doc) == [] and schemas.key_of("control", doc) == b"203.0.113.0/24"
    assert command("unblock", "203.0.113.0/24", "operator:me@here")["command"].keys() == {
        "id", "action", "prefix", "issued_by"}
    with pytest.raises(ConsumerError, match="ttl_s"):
        command("block", "203.0.113.7", "operator:me@here")  # a block without a TTL


def test_policy():
    p = Policy(allow=(parse_prefix("10.20.0.0/16"),))
    assert p.refuse(parse_prefix("203.0.113.7"), 60) is None
    assert p.refuse(parse_prefix("2001:db8::/32"), 60) is None
    assert "wider" in p.refuse(parse_prefix("2001:db8::/31"), 60)
    assert "wider" in p.refuse(parse_prefix("10.0.0.0/7"), 60)
    assert "10.20.0.0/16" in p.refuse(parse_prefix("10.0.0.0/8"), 60)      # contains the allowed net
    assert "10.20.0.0/16" in p.refuse(parse_prefix("10.20.3.4"), 60)       # inside it
    assert "::1/128" in p.refuse(parse_prefix("::1"), 60)
    assert "longer" in p.refuse(parse_prefix("203.0.113.7"), 8 * 86400)
    assert parse_prefix("198.51.100.7/24") == parse_prefix("198.51.100.0/24")  # host bits cleared


class FakeSender:
    def __init__(self):
        self.sent = []

    def send(self, doc):
        self.sent.append(doc)


T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def an_alert(ip="198.51.100.9", rule="ssh_bruteforce", n=0):
    """An alert as the Detector makes it (alert.v1)."""
    aid = alert_id(rule, ip, f"ev-{ip}-{n}")
    return {"@timestamp": "2027-01-15T08:00:11.000000Z",
            "event": {"id": aid, "kind": "alert", "module": "xdpwatch", "dataset": "xdpwatch.alerts",
                      "severity": 70, "category": ["intrusion_detection", "network"]},
            "rule": {"name": rule, "description": "d"}, "message": f"12 new SSH connections from {ip} within 60s",
            "source": {"ip": ip}, "observer": {"hostname": "gw1"},
            "xdpwatch": {"evidence": {"count": 12, "window_s": 60, "first_seen": "2027-01-15T08:00:00.000000Z",
                                      "last_seen": "2027-01-15T08:00:11.000000Z", "first_event_id": f"ev-{ip}-{n}",
                                      "last_event_id": "ev-last"}}}


def blocker(rate=10, max_active=100, ttl_s=900, rules=("ssh_bruteforce",)):
    sender, raised, clock = FakeSender(), [], Clock()
    b = BlockOnAlert(sender, set(rules), ttl_s, BlockBudget(rate, max_active), raised.append, clock=clock)
    return b, sender, raised, clock


def test_block_on_alert_blocks_the_source_of_chosen_rules_only():
    block, sender, raised, _ = blocker()
    alert = an_alert()
    block(alert)
    block({**alert, "rule": {"name": "ssh_scan"}})
    block({**alert, "rule": {"name": "traffic_spike"}, "source": {}})
    assert len(sender.sent) == block.sent == 1 and raised == []
    cmd = sender.sent[0]["command"]
    assert (cmd["action"], cmd["prefix"], cmd["ttl_s"], cmd["alert_id"], cmd["issued_by"]) == (
        "block", "198.51.100.9", 900, alert["event"]["id"], "alert:ssh_bruteforce")


def test_block_commands_are_deterministic_from_the_alert():
    """The same alert handled again (after a crash) gives the same command id and time."""
    docs = []
    for _ in range(2):
        block, sender, _, _ = blocker()
        block(an_alert())
        docs.append(sender.sent[0])
    assert docs[0] == docs[1] and schemas.errors("control", docs[0]) == []
    assert docs[0]["command"]["id"] == f"alert-{an_alert()['event']['id']}"
    assert docs[0]["@timestamp"] == "2027-01-15T08:00:00.000000Z"  # the wall clock at T0: the TTL counts from it


def test_rate_budget_refuses_beyond_n_per_minute_and_recovers():
    block, sender, raised, clock = blocker(rate=2)
    for i in range(3):
        clock.t = T0 + i
        block(an_alert(f"198.51.100.{i}"))
    assert block.sent == 2 and block.refused == 1
    (b,) = raised
    assert schemas.errors("alerts", b) == []
    original = an_alert("198.51.100.2")
    assert b["rule"]["name"] == "block_budget_exhausted" and b["source"]["ip"] == "198.51.100.2"
    assert b["event"]["id"] == alert_id("block_budget_exhausted", "198.51.100.2", original["event"]["id"])
    ev = b["xdpwatch"]["evidence"]
    assert (ev["first_event_id"], ev["last_event_id"], ev["count"], ev["window_s"]) == (
        original["event"]["id"], original["event"]["id"], 2, 60)
    assert "rate" in b["message"] and "198.51.100.2 not blocked" in b["message"]
    clock.t = T0 + 60.5  # the first command left the window, the second (T0 + 1) not yet
    block(an_alert("198.51.100.3"))
    assert block.sent == 3
    block(an_alert("198.51.100.4"))
    assert block.sent == 3 and block.refused == 2


def test_active_budget_counts_blocks_within_their_ttl_and_unblocks():
    block, sender, raised, clock = blocker(max_active=2, ttl_s=600)
    block(an_alert("198.51.100.1"))
    clock.t += 100
    block(an_alert("198.51.100.2"))
    clock.t += 100
    block(an_alert("198.51.100.3"))          # two active: refused
    assert block.sent == 2 and block.refused == 1 and "active" in raised[0]["message"]
    assert raised[0]["xdpwatch"]["evidence"]["count"] == 2
    # An operator unblocks the first (as a /32, the producer's spelling): room for one.
    block.budget.record(command("unblock", "198.51.100.1/32", "operator:me@here", now=clock.t))
    block(an_alert("198.51.100.3", n=1))
    assert block.sent == 3
    block(an_alert("198.51.100.4"))
    assert block.sent == 3 and block.refused == 2
    clock.t = T0 + 100 + 600             # the second block's TTL passed
    block(an_alert("198.51.100.4", n=1))
    assert block.sent == 4


def test_operator_commands_are_never_counted_and_replace_automatic_blocks():
    budget = BlockBudget(rate=1, max_active=1)
    for i in range(50):  # `xdpwatch block` is not limited, nor does it spend the budget
        budget.record(command("block", f"203.0.113.{i}", "operator:me@here", ttl_s=3600, now=T0))
    assert budget.exhausted(T0) is None
    budget.record(command("block", "203.0.113.7", "alert:ssh_scan", ttl_s=3600, now=T0))
    assert budget.exhausted(T0 + 61) == Exhausted("active", 1, 1, 0.0)
    budget.record(command("block", "203.0.113.7", "operator:me@here", ttl_s=60, now=T0 + 62))  # now the operator's
    assert budget.exhausted(T0 + 62) is None


def test_budget_is_rebuilt_by_replaying_the_commands():
    """The budget's state is a function of the control commands: the topic's tail, replayed
    into a fresh budget, answers as the live one did."""
    block, sender, _, clock = blocker(rate=3, max_active=4, ttl_s=120)
    for i in range(12):
        clock.t = T0 + 15 * i
        block(an_alert(f"198.51.100.{i}"))
    replayed = BlockBudget(3, 4)
    for doc in sender.sent:
        replayed.record(doc)
    for t in (T0 + 165, T0 + 170, T0 + 200, T0 + 260, T0 + 400):
        assert replayed.exhausted(t) == block.budget.exhausted(t)


def test_budget_alerts_have_a_cooldown_and_count_the_refusals_in_between():
    block, sender, raised, clock = blocker(rate=1)
    block(an_alert("198.51.100.1"))
    for i in range(2, 7):               # 5 refused within the minute: one budget alert
        clock.t = T0 + i
        block(an_alert(f"198.51.100.{i}"))
    assert (block.sent, block.refused, block.budget_alerts, len(raised)) == (1, 5, 1, 1)
    assert "more blocks refused" not in raised[0]["message"]
    clock.t = T0 + 2 + 60              # the cooldown passed; the budget is spent again
    sender.sent.clear()
    block.budget.record(command("block", "198.51.100.50", "alert:ssh_scan", ttl_s=900, now=clock.t))
    block(an_alert("198.51.100.7"))
    assert len(raised) == 2 and block.refused == 6
    assert "; 4 more blocks refused since the previous budget alert" in raised[1]["message"]
    assert [schemas.errors("alerts", a) for a in raised] == [[], []]


def test_budget_alert_shape():
    a = budget_alert(an_alert(), Exhausted("active", 100, 100, 0.0), held=0)
    assert schemas.errors("alerts", a) == [] and schemas.key_of("alerts", a) == b"198.51.100.9"
    assert a["message"] == ("block budget exhausted (active: 100 automatic blocks within their TTL, limit 100): "
                            f"198.51.100.9 not blocked for ssh_bruteforce alert {an_alert()['event']['id']}")


@pytest.mark.parametrize("rule", ["ssh_bruteforce", "ssh_auth_failures", "ssh_scan"])
def test_rules_on_unforgeable_evidence_can_block(rule):
    assert blockable(rule) == rule


@pytest.mark.parametrize("rule,why", [
    ("ssh_syn_flood", "ssh_syn_flood counts SYNs, which anyone can send with a forged source address: "
                      "it can alert but never block"),
    ("traffic_spike", "no address to block"), ("kernel_drops", "no address to block"),
    ("block_budget_exhausted", "raised by --block-on itself"),
    ("ssh_brute", "'ssh_brute' is not an alert rule; rules that can block: ssh_bruteforce, ssh_auth_failures, ssh_scan"),
])
def test_other_rules_cannot_block(rule, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        blockable(rule)
