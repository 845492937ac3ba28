"""The compiled flow path on the real program: its ring buffer read through libbpf, its flow
table read in batches, entries popped and deleted, against the Python reference path doing
the same on a second copy of the program fed the same frames.

The two programs stamp their flows with their own clock readings, and their hash tables list
flows in their own orders (each map has its own hash seed), so the documents of each step are
compared as sets, with the fields that come from those readings taken out (@timestamp,
event.start, event.end, event.duration, the first_ns in flow.id) and the id's sequence number;
tests/unit/test_fastpath.py proves those, and the order, byte for byte. Everything else must be
identical bytes."""

from __future__ import annotations

import time

import orjson
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from xdpwatch import schemas
from xdpwatch.producer import flowpath
from xdpwatch.producer.events import Clock, EventShaper
from xdpwatch.producer.flows import FlowTimeouts
from xdpwatch.producer.libbpf import XDP_PASS
from xdpwatch.producer.loader import BpfConfig, XdpProgram
from xdpwatch.producer.records import CounterId

pytestmark = pytest.mark.kernel

S = 10**9
E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
ADDRS = {4: (IP, "192.0.2.7", "192.0.2.1"), 6: (IPv6, "2001:db8::7", "2001:db8::1")}
CISN, SISN = 1_000_000, 4_000_000_000


def to_server(flags, port, family=4, payload=b"", **kw):
    l3, client, server = ADDRS[family]
    return bytes(E / l3(src=client, dst=server) / TCP(sport=port, dport=22, flags=flags, **kw) / payload)


def to_client(flags, port, family=4, payload=b"", **kw):
    l3, client, server = ADDRS[family]
    return bytes(E / l3(src=server, dst=client) / TCP(sport=22, dport=port, flags=flags, **kw) / payload)


class Capture:
    """An exporter that keeps what it is given."""

    def __init__(self):
        self.docs: list[tuple[bytes, bytes]] = []

    def export(self, stream, key, value):
        assert stream == "ssh-flows"
        self.docs.append((key, value))

    def export_many(self, stream, items):
        for key, value in items:
            self.export(stream, key, value)


class Side:
    """One program with one flow path, fed frames."""

    def __init__(self, mode: str, shaper: EventShaper, timeouts: FlowTimeouts, **cfg):
        self.prog = XdpProgram(BpfConfig(**cfg))
        self.prog.add_iface(1)  # BPF_PROG_TEST_RUN's frames arrive on lo (ifindex 1): its counters in slot 0
        self.out = Capture()
        self.flows = flowpath.open_flow_path(mode, self.prog, shaper, timeouts, self.out,
                                             name_of=lambda ifindex: {1: "lo"}[ifindex])
        assert self.flows.path == {"python": "python", "compiled": "compiled"}[mode]

    def ingress(self, *frames):
        for f in frames:
            assert self.prog.test_run(f)[0] == XDP_PASS

    def egress(self, *frames):
        for f in frames:
            assert self.prog.test_run_egress(f) == -1


class FixedClock(Clock):
    def resync(self):
        self._offset = 1_700_000_000 * S


TIME_FIELDS = ("start", "end", "duration")


def timeless(doc: bytes) -> bytes:
    """The document without what the program's own clock readings and table order decide."""
    d = orjson.loads(doc)
    del d["@timestamp"]
    for f in TIME_FIELDS:
        del d["event"][f]
    d["event"]["id"] = d["event"]["id"].rsplit("-", 1)[0]
    prefix, _first_ns, cid = d["flow"]["id"].rsplit("-", 2)
    d["flow"]["id"] = f"{prefix}-{cid}"
    return orjson.dumps(d)


@pytest.fixture
def pair():
    made = []

    def make(timeouts=FlowTimeouts(idle_ns=30 * S, active_ns=20 * S, fin_linger_ns=2 * S), **cfg):
        ref_shaper = EventShaper("eth0", FixedClock(), hostname="gw1")
        fast_shaper = EventShaper("eth0", FixedClock(), hostname="gw1")
        fast_shaper._id_prefix = ref_shaper._id_prefix
        sides = Side("python", ref_shaper, timeouts, **cfg), Side("compiled", fast_shaper, timeouts, **cfg)
        made.extend(sides)
        return sides

    yield make
    for side in made:
        side.flows.close()
        side.prog.close()


def both(sides, method, *args):
    for s in sides:
        getattr(s, method)(*args)


def step(sides, method, *args):
    """The same step on both flow paths; the documents it made, compared."""
    before = [len(s.out.docs) for s in sides]
    for s in sides:
        getattr(s.flows, method)(*args)
    ref, fast = (s.out.docs[n:] for s, n in zip(sides, before))
    assert sorted((k, timeless(d)) for k, d in fast) == sorted((k, timeless(d)) for k, d in ref)


def compare(sides) -> list[dict]:
    """Every document of the compiled path, valid, with the reference's ids."""
    ref, fast = (s.out.docs for s in sides)
    ids = [[orjson.loads(d)["event"]["id"] for _, d in docs] for docs in (ref, fast)]
    assert ids[0] == ids[1] and [i.rsplit("-", 1)[1] for i in ids[1]] == [str(n) for n in range(1, len(fast) + 1)]
    docs = [orjson.loads(d) for _, d in fast]
    for doc in docs:
        assert schemas.errors("ssh-flows", doc) == []
    return docs


def test_a_session_of_every_kind_through_the_real_program(pair):
    sides = pair(ssh_ports=(22,))
    # 40100: a real handshake, both banners, the server's replies (one failed login), FIN
    both(sides, "ingress", to_server("S", 40100, seq=CISN))
    both(sides, "egress", to_client("SA", 40100, seq=SISN, ack=CISN + 1))
    both(sides, "ingress", to_server("A", 40100, seq=CISN + 1, ack=SISN + 1),
         to_server("PA", 40100, payload=b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"))
    both(sides, "egress", to_client("PA", 40100, payload=b"SSH-2.0-OpenSSH_9.6\r\n"),
         *[to_client("PA", 40100, payload=b"x" * n) for n in (1088, 1564, 44, 52, 52)])
    # 40200: IPv6, reset at once; 40300: joined mid-connection; 40400: a SYN, then silence
    both(sides, "ingress", to_server("S", 40200, family=6), to_server("R", 40200, family=6),
         to_server("A", 40300, ack=5), to_server("S", 40400))
    step(sides, "poll_events", 0)
    now = time.monotonic_ns()
    both(sides, "ingress", to_server("FA", 40100), to_client("FA", 40100))
    step(sides, "sweep", now + S)  # FIN seen, linger not over
    step(sides, "sweep", now + 5 * S)  # 40100 ends (fin)
    step(sides, "sweep", now + 25 * S)  # 40300 and 40400: updates
    step(sides, "sweep", now + 40 * S)  # ... and idle
    both(sides, "ingress", to_server("S", 40500))
    step(sides, "shutdown", time.monotonic_ns())  # 40500: still open
    docs = compare(sides)
    seen = [(d["source"]["port"], d["event"]["action"], d["event"].get("reason")) for d in docs]
    for expected in [(40100, "flow_start", None), (40100, "flow_established", None), (40100, "flow_end", "fin"),
                     (40200, "flow_end", "rst"), (40300, "flow_update", None), (40300, "flow_end", "idle"),
                     (40400, "flow_end", "idle"), (40500, "flow_end", "shutdown")]:
        assert expected in seen
    (end,) = [d for d in docs if d["source"]["port"] == 40100 and d["event"]["action"] == "flow_end"]
    assert end["ssh"]["client"]["software"] == "OpenSSH_9.2p1" and end["ssh"]["server"]["protocol"] == "2.0"
    assert end["ssh"]["auth"] == {"outcome": "failure", "confidence": "medium", "failures": 1}
    assert end["tcp"]["handshake"] == "complete" and end["network"]["direction"] == "internal"
    assert end["observer"] == {"hostname": "gw1", "ingress": {"interface": {"name": "lo"}}}
    assert (end["source"]["packets"], end["destination"]["packets"]) == (4, 8)
    assert [d for d in docs if d["source"]["port"] == 40300][0]["flow"]["midstream"] is True
    assert docs[-1]["event"]["id"].endswith(f"-{len(docs)}")
    for s in sides:
        assert (s.flows.active, s.flows.evicted) == (0, 0)
        # ended flows were taken out of the table; shutdown leaves the open ones to the kernel
        assert [k.client_port for k, _ in s.prog.flow_entries()] == [40500]


def test_ring_buffer_drops_and_evictions_are_recovered_and_counted_alike(pair):
    """A one-page ring buffer that overflows and a 16-entry table that evicts: every flow
    still has its flow_start (the sweep adopts those whose event was dropped), each drop is
    counted in the kernel, and each eviction once by the tracker."""
    sides = pair(ssh_ports=(22,), ringbuf_pages=1, flow_table_size=16)
    n = 60
    both(sides, "ingress", *[to_server("S", 20000 + i) for i in range(n)])
    step(sides, "poll_events", 0)
    step(sides, "sweep", time.monotonic_ns())
    docs = compare(sides)
    for s in sides:
        c = s.prog.read_counters()
        submitted, drops = c[CounterId.EVENTS_SUBMITTED][0], c[CounterId.RINGBUF_DROPS][0]
        assert c[CounterId.FLOWS_STARTED][0] == n == submitted + drops and drops > 0
    starts = [d["source"]["port"] for d in docs if d["event"]["action"] == "flow_start"]
    evicted = [d["source"]["port"] for d in docs if d["event"].get("reason") == "evicted"]
    # the flows whose event arrived, and those the sweep found in the table
    assert len(starts) == len(set(starts)) and set(starts) <= set(range(20000, 20000 + n))
    assert sides[1].flows.evicted == sides[0].flows.evicted == len(evicted) > 0
    assert sides[1].flows.evicted_by_iface == sides[0].flows.evicted_by_iface == {1: len(evicted)}
    assert sides[1].flows.active_by_iface() == sides[0].flows.active_by_iface() == {1: 16}
    assert sides[1].flows.active == sides[0].flows.active == 16


def test_a_poll_takes_at_most_its_budget_in_order(pair):
    _, fast = pair(ssh_ports=(22,), ringbuf_pages=16)
    fast.flows.BUDGET = 7
    fast.ingress(*[to_server("S", 30000 + i) for i in range(20)])
    taken = [fast.flows.poll_events(0) for _ in range(4)]
    assert taken == [7, 7, 6, 0]
    assert [orjson.loads(d)["source"]["port"] for _, d in fast.out.docs] == list(range(30000, 30020))
    assert fast.flows.poll_events(20) == 0  # waits, then nothing
