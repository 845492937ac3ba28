"""The control plane alone: durations, commands against their schema, --block-on."""

from __future__ import annotations

import pytest

from xdpwatch import schemas
from xdpwatch.consumers.control import BlockOnAlert, command, parse_duration
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


def test_block_on_alert_blocks_the_source_of_chosen_rules_only():
    sender = FakeSender()
    block = BlockOnAlert(sender, {"ssh_bruteforce"}, ttl_s=900)
    alert = {"event": {"id": "al-1"}, "rule": {"name": "ssh_bruteforce"}, "source": {"ip": "198.51.100.9"},
             "message": "12 new SSH connections from 198.51.100.9 within 60 s"}
    block(alert)
    block({**alert, "rule": {"name": "ssh_scan"}})
    block({**alert, "rule": {"name": "traffic_spike"}, "source": {}})
    assert len(sender.sent) == block.sent == 1
    cmd = sender.sent[0]["command"]
    assert (cmd["action"], cmd["prefix"], cmd["ttl_s"], cmd["alert_id"], cmd["issued_by"]) == (
        "block", "198.51.100.9", 900, "al-1", "alert:ssh_bruteforce")
