"""Prevention in the real XDP program (BPF_PROG_TEST_RUN): blocklist LPM matching for IPv4
and IPv6, the allowlist winning over any block, dry run, the SYN rate limiter; and the
Enforcer applying commands to the real maps, with policy and expiry."""

from __future__ import annotations

import ctypes as ct
import ipaddress

import orjson
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from xdpwatch.producer.enforcement import Enforcer, Policy
from xdpwatch.producer.events import EventShaper
from xdpwatch.producer.libbpf import XDP_DROP, XDP_PASS
from xdpwatch.producer.loader import BpfConfig, XdpProgram
from xdpwatch.producer.records import CounterId

pytestmark = pytest.mark.kernel

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def udp4(src: str) -> bytes:
    return bytes(E / IP(src=src, dst="198.51.100.1") / UDP(sport=5000, dport=53) / b"q")


def udp6(src: str) -> bytes:
    return bytes(E / IPv6(src=src, dst="2001:db8:ffff::1") / UDP(sport=5000, dport=53) / b"q")


def syn(src: str, sport: int, flags: str = "S") -> bytes:
    return bytes(E / IP(src=src, dst="198.51.100.1") / TCP(sport=sport, dport=22, flags=flags))


@pytest.fixture(scope="module")
def progs():
    made = {}

    def get(mode: str, syn_rate: int = 0, syn_burst: int = 1) -> XdpProgram:
        key = (mode, syn_rate, syn_burst)
        if key not in made:
            made[key] = XdpProgram(BpfConfig(enforce_mode=mode, syn_rate=syn_rate, syn_burst=syn_burst))
            made[key].add_iface(1)  # BPF_PROG_TEST_RUN's frames arrive on lo (ifindex 1): slot 0
        return made[key]

    yield get
    for p in made.values():
        p.close()


def put(prog: XdpProgram, table: str, prefix: str) -> None:
    """An entry straight into a map, bypassing the Enforcer's policy (to test the kernel alone)."""
    net = ipaddress.ip_network(prefix)
    t = prog.bpf[table.encode()]
    k = t.Key()
    k.prefixlen = net.prefixlen
    raw = net.network_address.packed
    k.addr = (ct.c_ubyte * len(raw))(*raw)
    t[k] = t.Leaf(1) if table.startswith("allow") else t.Leaf()
    return k


def clear(prog: XdpProgram) -> None:
    for name in (b"block_v4", b"block_v6", b"allow_v4", b"allow_v6"):
        prog.bpf[name].clear()


def blocked(prog: XdpProgram) -> tuple[int, int]:
    return prog.read_counters()[CounterId.BLOCKED]


@pytest.mark.parametrize("family", [4, 6])
def test_longest_prefix_match_drops_in_enforce_mode(progs, family):
    prog = progs("enforce")
    clear(prog)
    if family == 4:
        frame, prefixes, inside, outside = udp4, ["192.0.2.0/24", "203.0.113.9/32"], ["192.0.2.7", "192.0.2.255",
                                                                                      "203.0.113.9"], ["192.0.3.7", "203.0.113.8"]
    else:
        frame, prefixes, inside, outside = udp6, ["2001:db8:1::/48", "2001:db8:2::9/128"], [
            "2001:db8:1::7", "2001:db8:1:ffff::1", "2001:db8:2::9"], ["2001:db8:3::7", "2001:db8:2::8"]
    keys = [put(prog, f"block_v{family}", p) for p in prefixes]
    before = blocked(prog)
    for src in inside:
        assert prog.test_run(frame(src))[0] == XDP_DROP, src
    for src in outside:
        assert prog.test_run(frame(src))[0] == XDP_PASS, src
    after = blocked(prog)
    assert after[0] - before[0] == len(inside)
    assert after[1] - before[1] == sum(len(frame(s)) for s in inside)
    table = prog.bpf[f"block_v{family}".encode()]
    per_entry = [table[k].packets for k in keys]
    assert per_entry == [2, 1]  # counted on the entry that matched


def test_allowlist_wins_over_any_block(progs):
    prog = progs("enforce", syn_rate=1, syn_burst=1)
    clear(prog)
    put(prog, "block_v4", "192.0.2.0/24")
    put(prog, "allow_v4", "192.0.2.7/32")
    assert prog.test_run(udp4("192.0.2.7"))[0] == XDP_PASS
    assert prog.test_run(udp4("192.0.2.8"))[0] == XDP_DROP
    # ... and over the SYN rate limit
    assert all(prog.test_run(syn("192.0.2.7", 40000 + i))[0] == XDP_PASS for i in range(5))


def test_dry_run_counts_and_passes(progs):
    prog = progs("dry_run")
    clear(prog)
    put(prog, "block_v4", "192.0.2.0/24")
    before = blocked(prog)
    assert prog.test_run(udp4("192.0.2.7"), repeat=10)[0] == XDP_PASS
    assert blocked(prog)[0] - before[0] == 10


def test_monitor_only_never_looks(progs):
    prog = progs("off")
    clear(prog)
    put(prog, "block_v4", "192.0.2.0/24")
    assert prog.test_run(udp4("192.0.2.7"))[0] == XDP_PASS
    assert blocked(prog) == (0, 0)


def test_syn_rate_limit_per_source(progs):
    prog = progs("enforce", syn_rate=1, syn_burst=3)  # 3 at once, then 1 per second
    clear(prog)
    limited = lambda: prog.read_counters()[CounterId.SYN_LIMITED][0]  # noqa: E731
    before = limited()
    verdicts = [prog.test_run(syn("192.0.2.50", 41000 + i))[0] for i in range(10)]
    assert verdicts == [XDP_PASS] * 3 + [XDP_DROP] * 7
    assert limited() - before == 7
    assert prog.test_run(syn("192.0.2.51", 41000))[0] == XDP_PASS  # another source: its own bucket
    # Only new connections are limited: the rest of an established one passes.
    assert prog.test_run(syn("192.0.2.50", 41000, flags="A"))[0] == XDP_PASS
    assert prog.test_run(syn("192.0.2.50", 41000, flags="SA"))[0] == XDP_PASS


def test_syn_rate_limit_dry_run_counts_only(progs):
    prog = progs("dry_run", syn_rate=1, syn_burst=1)
    clear(prog)
    before = prog.read_counters()[CounterId.SYN_LIMITED][0]
    assert all(prog.test_run(syn("192.0.2.60", 42000 + i))[0] == XDP_PASS for i in range(4))
    assert prog.read_counters()[CounterId.SYN_LIMITED][0] - before == 3


# ---- the Enforcer on the real maps ----------------------------------------------------------

def cmd(action: str, prefix: str, ttl_s: int | None = 60, at: str = "2026-11-25T10:00:00.000000Z", **kw) -> bytes:
    c = {"id": f"c-{action}-{prefix}", "action": action, "prefix": prefix, "issued_by": "operator:test", **kw}
    if ttl_s is not None and action == "block":
        c["ttl_s"] = ttl_s
    return orjson.dumps({"@timestamp": at, "command": c})


T0 = 1795600800.0  # 2026-11-25T10:00:00Z


def test_enforcer_applies_rejects_and_expires(progs):
    prog = progs("enforce")
    clear(prog)
    events = []
    enf = Enforcer(prog, "enforce", Policy(allow=(ipaddress.ip_network("10.0.0.0/8"),)), events.append,
                   EventShaper("test0"))
    enf.handle(cmd("block", "192.0.2.7", ttl_s=60), now=T0 + 1)
    enf.handle(cmd("block", "2001:db8:1::/48", ttl_s=30), now=T0 + 1)
    for bad in (cmd("block", "0.0.0.0/0"), cmd("block", "10.1.2.3"), cmd("block", "127.0.0.1"),
                cmd("block", "192.0.2.8", ttl_s=30 * 86400), cmd("block", "not-an-ip"), b"{nope",
                cmd("block", "192.0.2.9", ttl_s=None)):
        enf.handle(bad, now=T0 + 1)
    enf.handle(cmd("block", "192.0.2.10", ttl_s=5), now=T0 + 10)  # already over when it arrived
    actions = [e["event"]["action"] for e in events]
    assert actions == ["block_applied"] * 2 + ["command_rejected"] * 8
    reasons = [e["xdpwatch"]["enforcement"]["rejection"] for e in events[2:]]
    assert "already over when it arrived" in reasons.pop()
    assert "wider than the policy allows" in reasons[0]
    assert "overlaps the allowlist entry 10.0.0.0/8" in reasons[1]
    assert "overlaps the allowlist entry 127.0.0.0/8" in reasons[2]
    assert "longer than the policy allows" in reasons[3]
    assert "not an IPv4 or IPv6" in reasons[4] and "not JSON" in reasons[5] and "ttl_s" in reasons[6]
    assert prog.test_run(udp4("192.0.2.7"), repeat=4)[0] == XDP_DROP
    assert prog.test_run(udp4("10.1.2.3"))[0] == XDP_PASS
    assert prog.test_run(udp6("2001:db8:1::5"))[0] == XDP_DROP

    enf.expire(now=T0 + 31)  # the /48 ends, the /32 stays
    assert prog.test_run(udp6("2001:db8:1::5"))[0] == XDP_PASS
    assert prog.test_run(udp4("192.0.2.7"))[0] == XDP_DROP
    enf.handle(cmd("unblock", "192.0.2.7", reason="false positive"), now=T0 + 32)
    assert prog.test_run(udp4("192.0.2.7"))[0] == XDP_PASS
    ends = [e for e in events if e["event"]["action"] in ("block_expired", "block_removed")]
    assert [(e["event"]["action"], e["xdpwatch"]["enforcement"]["prefix"], e["xdpwatch"]["enforcement"]["packets"])
            for e in ends] == [("block_expired", "2001:db8:1::/48", 1), ("block_removed", "192.0.2.7/32", 5)]
    assert ends[1]["event"]["reason"] == "false positive"
    from xdpwatch import schemas

    assert all(schemas.errors("enforcement", e) == [] for e in events)
    assert enf.blocks == {}


def test_a_full_blocklist_rejects_the_next_block_and_leaves_the_map_as_it_was(progs):
    """The real LPM trie filled to its compiled size (BLOCKLIST_SIZE): the next block is a
    rejection before any write, the kernel's map keeps exactly what it had, and the
    Enforcer goes on (an unblock makes room)."""
    prog = progs("enforce")
    clear(prog)
    table = prog.bpf[b"block_v4"]
    events = []
    enf = Enforcer(prog, "enforce", Policy(), events.append, EventShaper("test0"))
    size = enf.capacity[4]
    assert size == table.max_entries == 16384  # bpf/config.h
    addrs = [str(ipaddress.ip_address(0xC6130000 + i)) for i in range(size + 1)]  # 198.19.0.0/16
    for a in addrs:
        enf.handle(cmd("block", a), now=T0 + 1)
    assert [e["event"]["action"] for e in events] == ["block_applied"] * size + ["command_rejected"]
    assert events[-1]["xdpwatch"]["enforcement"]["rejection"] == "blocklist full: 16384 entries (IPv4)"
    before = {(k.prefixlen, bytes(k.addr)) for k in table.keys()}
    assert len(before) == size and (32, ipaddress.ip_address(addrs[-1]).packed) not in before
    with pytest.raises(Exception, match="Could not update table"):  # the kernel's own limit is the same
        put(prog, "block_v4", addrs[-1])
    assert prog.test_run(udp4(addrs[-1]))[0] == XDP_PASS
    assert prog.test_run(udp4(addrs[0]))[0] == XDP_DROP and prog.test_run(udp4(addrs[-2]))[0] == XDP_DROP
    enf.handle(cmd("unblock", addrs[0]), now=T0 + 2)
    enf.handle(cmd("block", addrs[-1]), now=T0 + 2)
    assert [e["event"]["action"] for e in events[-2:]] == ["block_removed", "block_applied"]
    assert prog.test_run(udp4(addrs[-1]))[0] == XDP_DROP and prog.test_run(udp4(addrs[0]))[0] == XDP_PASS
    clear(prog)
