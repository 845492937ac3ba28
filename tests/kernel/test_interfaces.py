"""One loaded program on two veths (attached as the producer attaches, real frames sent from
namespaces): each interface's counters in its own slot, exactly; flows keyed by interface;
one blocklist dropping on both; an interface whose direct ifindex entry is taken found
through the hash; slots freed on release and counted afresh when given again."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from xdpwatch.producer.loader import IFSLOT_CACHE, BpfConfig, XdpProgram
from xdpwatch.producer.records import CounterId

from ..veths import Veth, syns, udp

N = os.getpid() % 90 + 10
BLOCKED, OTHER = "203.0.113.9", "203.0.113.10"


@pytest.fixture(scope="module")
def prog():
    p = XdpProgram(BpfConfig(enforce_mode="enforce"))
    yield p
    p.close()


@pytest.fixture
def veths():
    made = [Veth(f"xwk{N}{c}") for c in "ab"]
    yield made
    for v in made:
        v.delete()


def block(prog: XdpProgram, prefix: str) -> object:
    net = ipaddress.ip_network(prefix)
    t = prog.bpf[b"block_v4"]
    k = t.Key()
    k.prefixlen = net.prefixlen
    k.addr = (type(k.addr))(*net.network_address.packed)
    t[k] = t.Leaf()
    return k


class Tap:
    """What the stack receives on an interface after XDP (AF_PACKET sees only passed frames)."""

    def __init__(self, iface: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((iface, 0))
        self.sock.settimeout(0.5)

    def sources(self) -> list[str]:
        out = []
        try:
            while True:
                frame, addr = self.sock.recvfrom(65536)
                if addr[2] == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
                    continue
                out.append(socket.inet_ntoa(frame[26:30]))
        except TimeoutError:
            return out

    def close(self) -> None:
        self.sock.close()


def test_two_interfaces_one_program_one_blocklist(prog, veths):
    a, b = veths
    ia, ib = socket.if_nametoindex(a.name), socket.if_nametoindex(b.name)
    # b's direct entry taken by another ifindex first: b is found through the hash
    squatter = ib + IFSLOT_CACHE
    prog.add_iface(squatter)
    before = {i: prog.read_counters(prog.add_iface(i)) for i in (ia, ib)}
    atts = [prog.attach(v.name, "auto", egress=False) for v in (a, b)]
    taps = [Tap(v.name) for v in (a, b)]
    try:
        entry = block(prog, f"{BLOCKED}/32")
        sent = {}
        for v, n_blocked, n_other, size in ((a, 5, 3, 100), (b, 4, 2, 300)):
            # one SSH flow each
            nbytes = v.send(udp(n_blocked, size, BLOCKED) + udp(n_other, size, OTHER) + syns(OTHER, [41000 + n_other]))
            sent[v.name] = (n_blocked, n_other + 1, nbytes, n_blocked * len(udp(1, size, BLOCKED)[0]))
        received = [t.sources() for t in taps]
        for att, v, got in zip(atts, (a, b), received):
            n_blocked, n_passed, nbytes, blocked_bytes = sent[v.name]
            c = prog.read_counters(att.slot)
            d = [(x[0] - y[0], x[1] - y[1]) for x, y in zip(c, before[att.ifindex])]
            assert d[CounterId.TOTAL] == (n_blocked + n_passed, nbytes), v.name
            assert d[CounterId.BLOCKED] == (n_blocked, blocked_bytes), v.name
            assert d[CounterId.FLOWS_STARTED][0] == 1
            assert got.count(BLOCKED) == 0 and got.count(OTHER) == n_passed, (v.name, got)  # dropped, passed
        hits = prog.bpf[b"block_v4"][entry]
        assert (hits.packets, hits.bytes) == (5 + 4, sent[a.name][3] + sent[b.name][3])
        flows = {k.client_port: k.ifindex for k, _ in prog.flow_entries()}
        assert flows == {41003: ia, 41002: ib}
    finally:
        for t in taps:
            t.close()
        for att in atts:
            att.release()
        prog.remove_iface(squatter)
    # released: the slots are free, the hash and the direct table hold none of them
    assert prog.bpf[b"ifslots"][prog.bpf[b"ifslots"].Key(ia % IFSLOT_CACHE)].ifindex == 0
    assert len(prog.bpf[b"ifslots_more"]) == 0
    # attached again (a slot freed and given anew): counted from its new starting point
    att = prog.attach(a.name, "auto", egress=False)
    slot_a = att.slot
    start = prog.read_counters(slot_a)
    a.send(udp(2, 64, OTHER))
    assert prog.read_counters(slot_a)[CounterId.TOTAL][0] - start[CounterId.TOTAL][0] == 2
    att.release()
