"""The TCP handshake as evidence that a client's address is real, on exact frames.

A flow becomes `complete` only when the client's SYN arrived (XDP), the server's SYN-ACK
left through the interface (egress program) acknowledging the client's ISN, and the client's
ACK arrived acknowledging the server's ISN. These tests play the attacker: a spoofed SYN
whose SYN-ACK the attacker never sees, guessed ACKs, SYN-ACKs forged from outside, packets
from the SSH port, and fake server payloads that would forge login failures."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from xdpwatch.producer.records import DIR_TO_CLIENT, DIR_TO_SERVER, EventType, Handshake

pytestmark = pytest.mark.kernel


@pytest.fixture
def fresh(xdp):
    """The module's program with an empty flow table and ring buffer (compiling one per test
    would cost seconds each)."""
    def make():
        xdp.reset()
        return xdp
    return make

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
ADDRS = {4: (IP, "192.0.2.7", "192.0.2.1"), 6: (IPv6, "2001:db8::7", "2001:db8::1")}
CISN, SISN = 1_000_000, 4_294_967_000  # the server's ISN wraps: ack = (isn + 1) mod 2^32


def to_server(flags, port=40100, family=4, **kw):
    l3, client, server = ADDRS[family]
    return bytes(E / l3(src=client, dst=server) / TCP(sport=port, dport=22, flags=flags, **kw))


def to_client(flags, port=40100, family=4, **kw):
    l3, client, server = ADDRS[family]
    return bytes(E / l3(src=server, dst=client) / TCP(sport=22, dport=port, flags=flags, **kw))


def server_data(payload: bytes) -> bytes:
    return bytes(E / IP(src="192.0.2.1", dst="192.0.2.7") / TCP(sport=22, dport=40100, flags="PA") / payload)


def egress(h, frame) -> None:
    assert h.prog.test_run_egress(frame) == -1  # egress never changes a verdict


def state(h, port=40100):
    (v,) = [v for k, v in h.flows() if k.client_port == port]
    return v


def kinds(events):
    return [(EventType(e.type).name, e.key.client_port) for e in events]


@pytest.mark.parametrize("family", [4, 6])
def test_a_real_handshake_completes_once(fresh, family):
    h = fresh()
    h.run(to_server("S", seq=CISN, family=family))
    assert state(h).handshake == Handshake.SYN and state(h).client_isn == CISN
    egress(h, to_client("SA", seq=SISN, ack=CISN + 1, family=family))
    assert state(h).handshake == Handshake.SYN_ACK and state(h).server_isn == SISN
    h.run(to_server("A", seq=CISN + 1, ack=(SISN + 1) % 2**32, family=family))
    v = state(h)
    assert v.handshake == Handshake.COMPLETE
    start, est = h.take_events()
    assert (start.type, est.type) == (EventType.FLOW_START, EventType.FLOW_ESTABLISHED)
    assert start.val.handshake == Handshake.SYN and est.val.handshake == Handshake.COMPLETE
    assert est.val.packets == 3 and est.key.family == family
    # Later packets (data, another ACK of the same number) never report it again.
    h.run(to_server("PA", seq=CISN + 1, ack=(SISN + 1) % 2**32, family=family),
          to_server("A", ack=(SISN + 1) % 2**32, family=family))
    assert h.take_events() == [] and state(h).handshake == Handshake.COMPLETE


def test_a_spoofed_syn_never_completes(fresh):
    """The attacker sends the SYN in the victim's name; the server's SYN-ACK goes to the
    victim. Without it, ACKs are guesses: none with the wrong number counts."""
    h = fresh()
    h.run(to_server("S", seq=CISN))
    egress(h, to_client("SA", seq=SISN, ack=CISN + 1))
    guesses = [to_server("A", seq=CISN + 1, ack=a) for a in (0, 1, SISN, SISN + 2, CISN + 1, 0xFFFFFFFF)]
    h.run(*guesses, to_server("PA", ack=SISN + 2))
    assert state(h).handshake == Handshake.SYN_ACK
    assert kinds(h.take_events()) == [("FLOW_START", 40100)]


def test_a_syn_ack_forged_from_outside_is_not_evidence(fresh):
    """A SYN-ACK that arrives (XDP) claims to come from the server but is the attacker's: a
    flow whose handshake depends on it never completes, whatever the numbers."""
    h = fresh()
    h.run(to_server("S", seq=CISN), to_client("SA", seq=SISN, ack=CISN + 1), to_server("A", ack=SISN + 1))
    assert state(h).handshake == Handshake.SYN
    assert kinds(h.take_events()) == [("FLOW_START", 40100)]


def test_a_syn_ack_with_the_wrong_acknowledgement_does_not_advance(fresh):
    h = fresh()
    h.run(to_server("S", seq=CISN))
    egress(h, to_client("SA", seq=SISN, ack=CISN))  # not the client's ISN + 1
    h.run(to_server("A", ack=SISN + 1))
    assert state(h).handshake == Handshake.SYN and h.take_events()[1:] == []


@pytest.mark.parametrize("first", ["from the ssh port", "mid-connection", "leaving this host"])
def test_flows_not_opened_by_an_arriving_client_syn_never_complete(fresh, first):
    """Packets *from* port 22 make the other end look like a client; a flow seen first any
    way but the client's SYN arriving stays `none` whatever follows."""
    h = fresh()
    if first == "from the ssh port":
        h.run(to_client("SA", seq=SISN, ack=CISN + 1))
    elif first == "mid-connection":
        h.run(to_server("A", seq=CISN + 1, ack=SISN + 1))
    else:
        egress(h, to_server("S", seq=CISN))
    assert state(h).handshake == Handshake.NONE
    h.run(to_server("S", seq=CISN))
    egress(h, to_client("SA", seq=SISN, ack=CISN + 1))
    h.run(to_server("A", ack=SISN + 1))
    assert state(h).handshake == Handshake.NONE
    assert [k for k, _ in kinds(h.take_events())] == ["FLOW_START"]


def test_packets_from_port_22_to_many_ports_are_never_handshakes(fresh):
    h = fresh()
    h.run(*[to_client(flags, port=50000 + i, seq=SISN, ack=CISN + 1) for i, flags in enumerate(["SA", "A", "PA"] * 4)])
    flows = h.flows()
    assert len(flows) == 12 and all(v.handshake == Handshake.NONE for _, v in flows)
    assert all(e.type == EventType.FLOW_START for e in h.take_events())


def test_a_new_syn_before_completion_starts_over(fresh):
    h = fresh()
    h.run(to_server("S", seq=CISN))
    egress(h, to_client("SA", seq=SISN, ack=CISN + 1))
    h.run(to_server("S", seq=7))  # the client gave up and retried with a new ISN
    assert (state(h).handshake, state(h).client_isn) == (Handshake.SYN, 7)
    h.run(to_server("A", ack=SISN + 1))  # acknowledges a SYN-ACK of the old attempt: not complete
    assert state(h).handshake == Handshake.SYN
    egress(h, to_client("SA", seq=99, ack=8))
    h.run(to_server("A", ack=100))
    assert state(h).handshake == Handshake.COMPLETE


def test_forged_server_payload_cannot_write_login_sizes_or_banner(fresh):
    """After the server's SYN-ACK left, its packets leave: payload that *arrives* claiming
    to be the server's (equal sizes forging refused logins, a fake banner) is ignored."""
    h = fresh()
    h.run(to_server("S", seq=CISN))
    egress(h, to_client("SA", seq=SISN, ack=CISN + 1))
    h.run(to_server("A", ack=SISN + 1))
    h.run(server_data(b"SSH-2.0-fake\r\n"), *[server_data(b"x" * 52)] * 7)
    v = state(h)
    assert (v.nsizes, v.banners & DIR_TO_CLIENT) == (0, 0)
    egress(h, server_data(b"SSH-2.0-OpenSSH_9.2p1\r\n"))
    v = state(h)
    assert v.nsizes == 1 and v.server_sizes[0] == len(b"SSH-2.0-OpenSSH_9.2p1\r\n") and v.banners == DIR_TO_CLIENT
    (banner,) = [e for e in h.take_events() if e.type == EventType.BANNER]
    assert banner.dir == DIR_TO_CLIENT and banner.banner == b"SSH-2.0-OpenSSH_9.2p1\r\n"
    assert v.directions == DIR_TO_SERVER | DIR_TO_CLIENT  # the forged packets were still seen and counted
