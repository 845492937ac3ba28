"""FlowTracker lifecycle against a fake kernel table (the real one is covered in e2e)."""

from __future__ import annotations

import pytest

from xdpwatch.producer.flows import FlowReport, FlowTimeouts, FlowTracker
from xdpwatch.producer.records import EventType, FlowEvent, FlowKey, FlowValue, Handshake

S = 10**9


class FakeTable:
    """Stands in for the kernel LRU hash: the test plays the kernel."""

    def __init__(self):
        self.entries: dict[bytes, tuple[FlowKey, FlowValue]] = {}

    def put(self, key: FlowKey, val: FlowValue):
        self.entries[bytes(key)] = (key, val)

    def flow_records(self):
        return [(bytes(k), bytes(v)) for k, v in self.entries.values()]

    def pop_flow(self, key):
        kv = self.entries.pop(bytes(key), None)
        return kv[1] if kv else None

    def delete_flow(self, key):
        self.entries.pop(bytes(key), None)


def key(port: int) -> FlowKey:
    k = FlowKey(family=4, proto=6, client_port=port, server_port=22)
    k.client_addr[:4] = [10, 0, 0, 7]
    k.server_addr[:4] = [10, 0, 0, 1]
    return k


def val(first: int, last: int | None = None, packets: int = 1, fin: int = 0, rst: int = 0) -> FlowValue:
    return FlowValue(first_ns=first, last_ns=last or first, packets=packets, bytes=packets * 60,
                     fin_ns=fin, rst_ns=rst, tcp_flags=0x02, directions=1)


def event(kind: EventType, k: FlowKey, v: FlowValue) -> FlowEvent:
    return FlowEvent(val=v, key=k, type=kind)


@pytest.fixture
def world():
    table = FakeTable()
    reports: list[FlowReport] = []
    pending: list[FlowEvent] = []  # ring buffer: delivered on drain
    tracker = FlowTracker(table, reports.append, FlowTimeouts(idle_ns=10 * S, active_ns=5 * S, fin_linger_ns=2 * S))
    tracker.drain = lambda: [tracker.on_event(pending.pop(0)) for _ in list(pending)]
    return table, reports, pending, tracker


def actions(reports):
    return [(r.action, r.reason, r.key.client_port, r.val.packets) for r in reports]


def test_start_then_fin_linger_ends_with_final_counts(world):
    table, reports, pending, tracker = world
    k = key(40000)
    table.put(k, val(1 * S))
    pending.append(event(EventType.FLOW_START, k, val(1 * S)))
    tracker.sweep(2 * S)
    table.put(k, val(1 * S, last=3 * S, packets=5, fin=3 * S))
    tracker.sweep(4 * S)  # linger not over: nothing
    table.put(k, val(1 * S, last=4 * S, packets=6, fin=3 * S))  # closing ACK during the linger
    tracker.sweep(5 * S)
    assert actions(reports) == [("flow_start", None, 40000, 1), ("flow_end", "fin", 40000, 6)]
    assert table.entries == {} and tracker.active == 0 and tracker.evicted == 0


def test_idle_timeout_and_active_updates(world):
    table, reports, pending, tracker = world
    k = key(40001)
    pending.append(event(EventType.FLOW_START, k, val(0)))
    table.put(k, val(0, last=4 * S, packets=3))
    tracker.sweep(4 * S)
    tracker.sweep(6 * S)  # 6 s since the start report >= active 5 s
    table.put(k, val(0, last=8 * S, packets=9))
    tracker.sweep(9 * S)
    tracker.sweep(12 * S)  # 6 s since the update -> another update
    tracker.sweep(18 * S)  # 10 s since the last packet -> idle
    assert actions(reports) == [("flow_start", None, 40001, 1), ("flow_update", None, 40001, 3),
                                ("flow_update", None, 40001, 9), ("flow_end", "idle", 40001, 9)]
    assert table.entries == {}


def test_rst_event_ends_at_once_and_sweep_deletes(world):
    table, reports, pending, tracker = world
    k = key(40002)
    tracker.on_event(event(EventType.FLOW_START, k, val(S)))
    tracker.on_event(event(EventType.FLOW_END_RST, k, val(S, last=2 * S, packets=4, rst=2 * S)))
    table.put(k, val(S, last=2 * S, packets=4, rst=2 * S))
    tracker.sweep(3 * S)
    assert actions(reports) == [("flow_start", None, 40002, 1), ("flow_end", "rst", 40002, 4)]
    assert table.entries == {} and tracker.evicted == 0


def test_dropped_ring_buffer_events_are_recovered_from_the_table(world):
    table, reports, pending, tracker = world
    k = key(40003)
    table.put(k, val(S, packets=2))  # its FLOW_START was dropped by a full ring buffer
    tracker.sweep(2 * S)
    table.put(k, val(S, last=2 * S, packets=3, rst=2 * S))  # and so was its RST event
    tracker.sweep(3 * S)
    assert actions(reports) == [("flow_start", None, 40003, 2), ("flow_end", "rst", 40003, 3)]


def test_eviction_is_counted_and_reported_with_last_counts(world):
    table, reports, pending, tracker = world
    a, b = key(40004), key(40005)
    for k in (a, b):
        pending.append(event(EventType.FLOW_START, k, val(S)))
        table.put(k, val(S, packets=7))
    tracker.sweep(2 * S)
    del table.entries[bytes(a)]  # the LRU pushed it out
    tracker.sweep(3 * S)
    assert ("flow_end", "evicted", 40004, 7) in actions(reports)
    assert tracker.evicted == 1 and tracker.active == 1


def test_flow_started_while_table_was_read_is_not_evicted(world):
    table, reports, pending, tracker = world
    k = key(40006)
    original = table.flow_records

    def read_then_kernel_adds():
        out = original()
        table.put(k, val(S))  # created after our read...
        pending.append(event(EventType.FLOW_START, k, val(S)))  # ...its event queued meanwhile
        return out

    table.flow_records = read_then_kernel_adds
    tracker.sweep(2 * S)
    assert tracker.evicted == 0 and tracker.active == 1
    assert actions(reports) == [("flow_start", None, 40006, 1)]


def test_reused_tuple_after_rst_is_a_new_flow(world):
    table, reports, pending, tracker = world
    k = key(40007)
    tracker.on_event(event(EventType.FLOW_START, k, val(S)))
    tracker.on_event(event(EventType.FLOW_END_RST, k, val(S, packets=2, rst=S)))
    tracker.on_event(event(EventType.FLOW_START, k, val(3 * S)))
    table.put(k, val(3 * S))
    tracker.sweep(4 * S)
    assert actions(reports) == [("flow_start", None, 40007, 1), ("flow_end", "rst", 40007, 2),
                                ("flow_start", None, 40007, 1)]
    assert tracker.evicted == 0 and tracker.active == 1


def test_shutdown_ends_every_open_flow_once(world):
    table, reports, pending, tracker = world
    for port in (40010, 40011):
        tracker.on_event(event(EventType.FLOW_START, key(port), val(S)))
        table.put(key(port), val(S, last=2 * S, packets=3))
    tracker.shutdown(3 * S)
    ends = [a for a in actions(reports) if a[0] == "flow_end"]
    assert sorted(ends) == [("flow_end", "shutdown", 40010, 3), ("flow_end", "shutdown", 40011, 3)]
    assert tracker.active == 0


def test_the_sweep_reads_the_timestamps_at_the_head_of_a_raw_value():
    from xdpwatch.producer.flows import _TIMES

    raw = bytes(FlowValue(first_ns=1, last_ns=2, fin_ns=3, rst_ns=4, packets=5))
    assert _TIMES.unpack_from(raw) == (1, 2, 3, 4)


def complete(v: FlowValue) -> FlowValue:
    v.handshake = Handshake.COMPLETE
    return v


def test_established_is_reported_once_between_start_and_end(world):
    table, reports, pending, tracker = world
    k = key(40100)
    table.put(k, complete(val(1 * S, last=2 * S, packets=3)))
    pending += [event(EventType.FLOW_START, k, val(1 * S)), event(EventType.FLOW_ESTABLISHED, k,
                                                                   complete(val(1 * S, packets=3)))]
    tracker.sweep(2 * S)
    tracker.sweep(3 * S)  # the table says complete again: no second report
    table.put(k, complete(val(1 * S, last=4 * S, packets=9, fin=4 * S)))
    tracker.sweep(7 * S)
    assert actions(reports) == [("flow_start", None, 40100, 1), ("flow_established", None, 40100, 3),
                                ("flow_end", "fin", 40100, 9)]


def test_a_dropped_established_event_is_recovered_by_the_sweep(world):
    """The ring buffer was full when the handshake completed: the sweep finds it complete
    in the table and reports it, after the start and before the end."""
    table, reports, pending, tracker = world
    k = key(40101)
    pending.append(event(EventType.FLOW_START, k, val(1 * S)))
    table.put(k, complete(val(1 * S, last=2 * S, packets=3)))
    tracker.sweep(3 * S)
    assert actions(reports) == [("flow_start", None, 40101, 1), ("flow_established", None, 40101, 3)]


@pytest.mark.parametrize("how", ["rst event", "shutdown"])
def test_an_end_of_a_complete_flow_reports_its_handshake_first(world, how):
    """The established event was lost and no sweep saw the handshake complete before the
    flow ended: its end still comes after its start and an established report."""
    table, reports, pending, tracker = world
    k = key(40102)
    if how == "rst event":  # start and established events both lost
        pending.append(event(EventType.FLOW_END_RST, k, complete(val(1 * S, packets=4, rst=2 * S))))
        tracker.sweep(3 * S)
    else:
        pending.append(event(EventType.FLOW_START, k, val(1 * S)))
        table.put(k, val(1 * S))
        tracker.sweep(2 * S)
        table.put(k, complete(val(1 * S, packets=4)))
        tracker.shutdown(3 * S)
    assert [a for a, *_ in actions(reports)] == ["flow_start", "flow_established", "flow_end"]


def test_end_iface_ends_only_that_interfaces_flows_with_their_final_counts(world):
    """An interface that goes: its open flows end (reason shutdown) with the table's last
    counts and leave the table; another interface's flows, same 5-tuple included, go on."""
    table, reports, pending, tracker = world
    k7, k8, k7b = key(40000), key(40000), key(40001)
    k7.ifindex, k8.ifindex, k7b.ifindex = 7, 8, 7
    for k in (k7, k8, k7b):
        table.put(k, val(1 * S))
        pending.append(event(EventType.FLOW_START, k, val(1 * S)))
    tracker.sweep(2 * S)
    assert tracker.active_by_iface() == {7: 2, 8: 1}
    table.put(k7, val(1 * S, last=2 * S, packets=4))
    tracker.end_iface(7, 3 * S)
    ends = [(r.reason, r.key.ifindex, r.key.client_port, r.val.packets) for r in reports if r.action == "flow_end"]
    assert sorted(ends) == [("shutdown", 7, 40000, 4), ("shutdown", 7, 40001, 1)]
    assert list(table.entries) == [bytes(k8)] and tracker.active_by_iface() == {8: 1}
