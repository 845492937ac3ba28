"""The Enforcer against an attacker who can write the control topic, on fake maps that behave
like the kernel's LPM tries (a capacity, an error when full): every command gets exactly
one decision, nothing a command says raises out of handle() or restore(), and the maps are
never half-written. The real maps: tests/kernel/test_enforcement.py; the real producer:
tests/e2e/test_hostile_control.py."""

from __future__ import annotations

import ipaddress
import time
import tracemalloc
from types import SimpleNamespace

import orjson
import pytest

from xdpwatch import schemas
from xdpwatch.producer.enforcement import MAX_FUTURE_S, Enforcer, Policy
from xdpwatch.producer.events import EventShaper
from xdpwatch.producer.hostnet import Protected

T0 = 1795600800.0  # 2026-11-25T10:00:00Z
AT0 = "2026-11-25T10:00:00.000000Z"
WEEK = 7 * 86400


class FakeLpm:
    """An LPM trie map as bcc exposes it: Key()/Leaf(), a capacity, and its error when full."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries: dict[tuple[int, bytes], object] = {}
        self.fail_on: set[tuple[int, bytes]] = set()  # keys whose write fails (e.g. ENOMEM)

    def Key(self):
        return SimpleNamespace()

    def Leaf(self, *_):
        return SimpleNamespace(packets=0, bytes=0)

    @staticmethod
    def _k(key) -> tuple[int, bytes]:
        return key.prefixlen, bytes(key.addr)

    def __setitem__(self, key, leaf) -> None:
        k = self._k(key)
        if k in self.fail_on:
            raise Exception("Could not update table: Cannot allocate memory")
        if k not in self.entries and len(self.entries) >= self.max_entries:
            raise Exception("Could not update table: Argument list too long")
        self.entries[k] = leaf

    def get(self, key):
        return self.entries.get(self._k(key))

    def __delitem__(self, key) -> None:
        del self.entries[self._k(key)]


class FakeProg:
    def __init__(self, size: int = 16384):
        self.bpf = {name: FakeLpm(size) for name in (b"block_v4", b"block_v6", b"allow_v4", b"allow_v6")}

    def blocked(self, version: int = 4) -> set[str]:
        out = set()
        for plen, addr in self.bpf[f"block_v{version}".encode()].entries:
            out.add(str(ipaddress.ip_network((ipaddress.ip_address(addr), plen))))
        return out


def cmd(action: str, prefix: str, ttl_s: int | None = 3600, at: str = AT0, cid: str | None = None) -> bytes:
    c = {"id": cid or f"c-{action}-{prefix}-{at}", "action": action, "prefix": prefix, "issued_by": "operator:t"}
    if action == "block" and ttl_s is not None:
        c["ttl_s"] = ttl_s
    return orjson.dumps({"@timestamp": at, "command": c})


def make(size: int = 16384, policy: Policy = Policy(), protected=()):
    prog, events = FakeProg(size), []
    enf = Enforcer(prog, "enforce", policy, events.append, EventShaper("test0"))
    enf.protect(protected)
    return prog, enf, events


def decisions(events):
    return [(e["event"]["action"], e["xdpwatch"]["enforcement"].get("rejection")) for e in events]


def test_commands_dated_far_ahead_are_rejected_and_nothing_is_written():
    prog, enf, events = make()
    for at in ("2099-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999999+00:00"):
        enf.handle(cmd("block", "203.0.113.7", ttl_s=3600, at=at), now=T0)
    assert [a for a, _ in decisions(events)] == ["command_rejected"] * 3
    assert all("issued in the future" in r and f"at most {MAX_FUTURE_S}" in r for _, r in decisions(events))
    assert prog.blocked() == set() and enf.blocks == {}
    # A little ahead (clock skew between hosts) is fine.
    ahead = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + MAX_FUTURE_S - 10))
    enf.handle(cmd("block", "203.0.113.8", at=ahead), now=T0)
    assert events[-1]["event"]["action"] == "block_applied" and prog.blocked() == {"203.0.113.8/32"}
    assert all(schemas.errors("enforcement", e) == [] for e in events)


def test_expiry_is_clamped_to_seven_days_from_receipt():
    prog, enf, events = make()
    ahead = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 200))
    enf.handle(cmd("block", "203.0.113.9", ttl_s=WEEK, at=ahead), now=T0)
    (applied,) = events
    expires = schemas.parse_time(applied["xdpwatch"]["enforcement"]["expires"])
    assert expires == T0 + WEEK  # not T0 + 200 + WEEK
    enf.expire(now=T0 + WEEK)
    assert events[-1]["event"]["action"] == "block_expired" and prog.blocked() == set()


def test_a_full_blocklist_rejects_before_writing_and_keeps_what_it_has():
    prog, enf, events = make(size=4)
    for i in range(6):
        enf.handle(cmd("block", f"203.0.113.{i}"), now=T0)
    enf.handle(cmd("block", "2001:db8::1"), now=T0)  # the other family has its own room
    enf.handle(cmd("block", "203.0.113.0", ttl_s=60), now=T0)  # a block in place may be renewed
    got = decisions(events)
    assert got[:4] == [("block_applied", None)] * 4
    assert got[4:6] == [("command_rejected", "blocklist full: 4 entries (IPv4)")] * 2
    assert got[6:] == [("block_applied", None)] * 2
    assert prog.blocked() == {f"203.0.113.{i}/32" for i in range(4)} and prog.blocked(6) == {"2001:db8::1/128"}
    enf.handle(cmd("unblock", "203.0.113.1"), now=T0)  # room again
    enf.handle(cmd("block", "203.0.113.5"), now=T0)
    assert events[-1]["event"]["action"] == "block_applied" and "203.0.113.5/32" in prog.blocked()


def test_an_error_inside_handle_rejects_that_command_only():
    prog, enf, events = make()
    table = prog.bpf[b"block_v4"]
    table.fail_on.add((32, bytes([203, 0, 113, 66])))
    enf.handle(cmd("block", "203.0.113.66"), now=T0)
    enf.handle(cmd("block", "203.0.113.67"), now=T0)
    (rejected, applied) = events
    assert rejected["event"]["action"] == "command_rejected"
    assert "Cannot allocate memory" in rejected["xdpwatch"]["enforcement"]["rejection"]
    assert applied["event"]["action"] == "block_applied" and prog.blocked() == {"203.0.113.67/32"}
    assert list(enf.blocks) == [ipaddress.ip_network("203.0.113.67/32")]


@pytest.mark.parametrize("raw", [
    None, b"", b"\xff\xfe", b"[]", b"null", b"1e999", b'{"command": 1}', b'"' + b"x" * 100_000 + b'"',
    orjson.dumps({"@timestamp": AT0, "command": []}),
    cmd("block", "203.0.113.7", ttl_s=2**62), cmd("block", "203.0.113.7", ttl_s=0),
    cmd("block", "203.0.113.7", at="0001-01-01T00:00:00+14:00"),
    cmd("block", "203.0.113.7", at="1970-01-01T00:00:00Z"),  # over long ago
    cmd("block", "203.0.113.7/33"), cmd("block", "fe80::1%eth0"),  # a scope is not a prefix
    cmd("block", "0.0.0.0/0"), cmd("unblock", "x" * 64),
])
def test_any_bad_command_is_one_rejection(raw):
    prog, enf, events = make()
    enf.handle(raw, now=T0)
    assert [e["event"]["action"] for e in events] == ["command_rejected"], events
    assert all(schemas.errors("enforcement", e) == [] for e in events)
    assert prog.blocked() == set() and prog.blocked(6) == set()


def test_protected_addresses_are_never_blocked_and_a_block_that_becomes_one_is_lifted():
    host = Protected(ipaddress.ip_network("192.0.2.2/32"), "an address of this host (eth0)")
    broker = Protected(ipaddress.ip_network("198.51.100.9/32"), "the Kafka broker kafka:9092")
    gw6 = Protected(ipaddress.ip_network("fd00::1/128"), "a default gateway (eth0)")
    prog, enf, events = make(protected=[host, broker, gw6])
    for prefix in ("192.0.2.2", "192.0.2.0/24", "198.51.100.0/24", "fd00::/64", "192.0.2.3", "203.0.113.0/24"):
        enf.handle(cmd("block", prefix), now=T0)
    got = decisions(events)
    assert got[0][1] == "192.0.2.2 is an address of this host (eth0): never blocked (prefix 192.0.2.2/32 overlaps it)"
    assert "192.0.2.2 is an address of this host (eth0)" in got[1][1]
    assert "198.51.100.9 is the Kafka broker kafka:9092" in got[2][1]
    assert "fd00::1 is a default gateway (eth0)" in got[3][1]
    assert [a for a, _ in got[4:]] == ["block_applied"] * 2
    assert prog.blocked() == {"192.0.2.3/32", "203.0.113.0/24"}

    # The host takes a new address inside a blocked prefix: the next refresh lifts that block.
    new = Protected(ipaddress.ip_network("203.0.113.50/32"), "an address of this host (eth1)")
    enf.protect([host, broker, gw6, new])
    removed = events[-1]
    assert removed["event"]["action"] == "block_removed" and removed["xdpwatch"]["enforcement"]["prefix"] == \
        "203.0.113.0/24"
    assert "203.0.113.50 is an address of this host (eth1)" in removed["event"]["reason"]
    assert prog.blocked() == {"192.0.2.3/32"}
    n = len(events)
    enf.protect([host, broker, gw6, new])  # nothing new: nothing happens
    assert len(events) == n


def test_restore_streams_any_history_and_never_raises():
    """A control topic written by an attacker: junk, future dates, more blocks than fit,
    unblocks, repeated prefixes. The restore keeps only what a live producer would have in
    place now, never raises, and holds no more than the blocklist's capacity."""
    prog, enf, events = make(size=100)
    host = Protected(ipaddress.ip_network("192.0.2.2/32"), "an address of this host (eth0)")
    enf.protect([host])

    def history():
        yield b"{nope"
        yield cmd("block", "192.0.2.2")  # protected: rejected
        yield cmd("block", "203.0.113.1", at="9999-12-31T23:59:59Z")
        yield cmd("block", "203.0.113.2", ttl_s=60)  # over by now
        yield cmd("block", "203.0.113.3", ttl_s=WEEK)
        yield cmd("block", "203.0.113.3", ttl_s=60)  # the last valid command wins: over
        yield cmd("block", "203.0.113.4", ttl_s=WEEK)
        yield cmd("block", "203.0.113.4", ttl_s=WEEK, at="2099-01-01T00:00:00Z")  # invalid: the first stays
        yield cmd("block", "203.0.113.5", ttl_s=WEEK)
        yield cmd("unblock", "203.0.113.5")
        for i in range(30_000):  # far more than fit: the first 100-1 are kept
            yield cmd("block", str(ipaddress.ip_address(0xC6120000 + i)), ttl_s=WEEK, cid=f"flood-{i}")

    schemas.is_valid("control", {}), schemas.validator("control")  # compiled once, before measuring
    tracemalloc.start()
    stats = enf.restore(history(), now=T0 + 3600)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stats.commands == 30_010
    assert stats.applied == len(enf.blocks) == 100
    assert "203.0.113.4/32" in prog.blocked() and {"203.0.113.2/32", "203.0.113.3/32", "203.0.113.5/32",
                                                   "192.0.2.2/32"}.isdisjoint(prog.blocked())
    assert [e["event"]["action"] for e in events] == ["block_applied"] * 100
    print(f"restore of {stats.commands} commands: peak {peak / 1e6:.2f} MB traced")
    assert peak < 2 * 1024 * 1024, peak  # bounded by the capacity, not by the 30,010 commands (~6 MB)


def test_a_block_over_when_it_arrives_ends_the_block_in_place_as_a_restore_would():
    """Live and restore read the history alike: the last valid command of a prefix counts,
    so a block already over ends the one in place (and is a rejection when there is none)."""
    prog, enf, events = make()
    enf.handle(cmd("block", "203.0.113.7", ttl_s=WEEK), now=T0)
    enf.handle(cmd("block", "203.0.113.7", ttl_s=60, cid="shorter"), now=T0 + 120)
    enf.handle(cmd("block", "203.0.113.8", ttl_s=60), now=T0 + 120)
    assert decisions(events)[1:] == [("block_removed", None),
                                     ("command_rejected", f"already over when it arrived (issued {AT0}, ttl 60s)")]
    assert events[1]["xdpwatch"]["enforcement"]["command_id"] == "shorter"
    assert prog.blocked() == set()
    _, again, _ = make()
    again.restore([cmd("block", "203.0.113.7", ttl_s=WEEK), cmd("block", "203.0.113.7", ttl_s=60)], now=T0 + 120)
    assert again.blocks == {}
