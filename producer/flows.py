"""SSH flow lifecycle in user space.

The kernel creates flow entries (and reports each start through the ring buffer), updates
them, and reports an RST at once. It never deletes: this tracker does, so an entry that
vanishes without us deleting it was evicted by the LRU table, and we can count it exactly.

A flow whose client completed the TCP handshake (the kernel's EV_FLOW_ESTABLISHED, or a
handshake found complete in the table when that event was lost) is reported once as
flow_established, always after its start and before its end.

Every `sweep()` reads the whole table and decides per flow:
  RST seen                     -> flow_end(rst) if the kernel's event was lost, then delete
  FIN seen, linger passed      -> flow_end(fin) with the final counts (atomic read+delete)
  no packet for idle timeout   -> flow_end(idle)
  active timeout since report  -> flow_update
A flow we knew that is gone from the table ends as flow_end(evicted) with the last counts
read. A table entry we never heard of (its start event was dropped) is reported as started.

Keys and values are kept and reported as given, never copied: both sources hand over
objects of their own (decode_event and the table read copy out of kernel memory), and
nothing here changes one in place. The sweep reads the table as raw bytes and builds ctypes
structs only for what it reports: it visits every flow every second, reports few.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from xdpwatch.producer.records import BannerEvent, EventType, FlowEvent, FlowKey, FlowValue, Handshake


class FlowTable(Protocol):
    def flow_records(self) -> Iterable[tuple[bytes, bytes]]: ...  # raw (FlowKey, FlowValue) bytes
    def pop_flow(self, key: FlowKey) -> FlowValue | None: ...
    def delete_flow(self, key: FlowKey) -> None: ...


_FLOW_START, _FLOW_END_RST, _BANNER = int(EventType.FLOW_START), int(EventType.FLOW_END_RST), int(EventType.BANNER)
_ESTABLISHED, _COMPLETE = int(EventType.FLOW_ESTABLISHED), int(Handshake.COMPLETE)
# first_ns, last_ns, fin_ns, rst_ns: the head of a raw FlowValue (tests/unit/test_flows.py)
_TIMES = struct.Struct("<4Q")
_HANDSHAKE = FlowValue.handshake.offset


@dataclass(frozen=True)
class FlowTimeouts:
    idle_ns: int = 60 * 10**9
    active_ns: int = 300 * 10**9
    fin_linger_ns: int = 2 * 10**9


@dataclass(slots=True)
class FlowReport:
    """One thing to tell the world about a flow."""

    action: str  # flow_start | flow_established | flow_update | flow_end
    reason: str | None  # on flow_end: fin | rst | idle | shutdown | evicted
    key: FlowKey
    val: FlowValue
    banners: dict[int, bytes] = field(default_factory=dict)  # DIR_* -> the SSH identification bytes


@dataclass(slots=True)
class _Tracked:
    key: FlowKey
    val: FlowValue | bytes  # the last counts read (raw when read by a sweep: see _value)
    first_ns: int  # which instance of the 5-tuple this is
    generation: int  # sweep generation in which we learned of it
    last_report_ns: int
    ended: bool = False
    established: bool = False  # flow_established reported
    banners: dict[int, bytes] = field(default_factory=dict)


def _value(v: FlowValue | bytes) -> FlowValue:
    return v if isinstance(v, FlowValue) else FlowValue.from_buffer_copy(v)


@dataclass
class FlowTracker:
    table: FlowTable
    report: Callable[[FlowReport], None]
    timeouts: FlowTimeouts = field(default_factory=FlowTimeouts)
    drain: Callable[[], None] = lambda: None  # hands queued ring-buffer events to on_event

    def __post_init__(self) -> None:
        self._flows: dict[bytes, _Tracked] = {}
        self._generation = 0
        self.evicted = 0  # cumulative

    @property
    def active(self) -> int:
        return sum(1 for t in self._flows.values() if not t.ended)

    # ---- events from the kernel ----
    def on_event(self, ev: FlowEvent | BannerEvent) -> None:
        kind, key = ev.type, ev.key  # (each ctypes field read builds an object: once each)
        kb = bytes(key)
        t = self._flows.get(kb)
        if kind == _BANNER:
            # It follows its flow's start event in the ring buffer; if that was dropped and
            # no sweep has adopted the flow yet, the banner is lost with it.
            if t is not None and t.first_ns == ev.first_ns:
                t.banners.setdefault(ev.dir, ev.banner)
            return
        val = ev.val
        first_ns = val.first_ns
        if kind == _FLOW_START:
            if t is not None and t.first_ns == first_ns:
                return  # already adopted by a sweep
            self._start(kb, key, val, first_ns)
        elif kind == _FLOW_END_RST or kind == _ESTABLISHED:
            if t is None or t.first_ns != first_ns:
                # Its start event was lost: still report the start first.
                t = self._start(kb, key, val, first_ns)
            if t.ended:
                return
            t.val = val
            if kind == _ESTABLISHED:
                self._established(t, val)
            else:
                self._end(t, "rst", val)

    def _start(self, kb: bytes, key: FlowKey, val: FlowValue, now_ns: int) -> _Tracked:
        old = self._flows.get(kb)
        if old is not None and not old.ended:
            # The kernel replaced the entry (table full, or the 5-tuple reused) before we
            # saw the old flow end.
            self._evict(old)
        t = _Tracked(key, val, val.first_ns, self._generation, now_ns)
        self._flows[kb] = t
        self.report(FlowReport("flow_start", None, key, val))
        return t

    def _established(self, t: _Tracked, val: FlowValue) -> None:
        if not t.established:
            t.established = True
            self.report(FlowReport("flow_established", None, t.key, val, t.banners))

    def _end(self, t: _Tracked, reason: str, val: FlowValue) -> None:
        if val.handshake == _COMPLETE:
            self._established(t, val)  # its event was lost: the handshake still counts
        t.ended = True
        self.report(FlowReport("flow_end", reason, t.key, val, t.banners))

    def _evict(self, t: _Tracked) -> None:
        self.evicted += 1
        self._end(t, "evicted", _value(t.val))

    # ---- periodic reconciliation with the kernel table ----
    def sweep(self, now_ns: int) -> None:
        self.drain()
        self._generation += 1
        records = list(self.table.flow_records())
        # Events queued while we read belong to the new generation: a flow that started
        # after our read is not missing from it.
        self.drain()
        present = set()
        flows, times = self._flows, _TIMES.unpack_from
        to = self.timeouts
        for kb, vb in records:
            first_ns, last_ns, fin_ns, rst_ns = times(vb)
            t = flows.get(kb)
            if t is not None and first_ns < t.first_ns:
                present.add(kb)  # we read an older instance than the one we know
                continue
            if t is None or first_ns > t.first_ns:  # its start event was dropped
                t = self._start(kb, FlowKey.from_buffer_copy(kb), FlowValue.from_buffer_copy(vb), now_ns)
            present.add(kb)
            if not t.ended:
                t.val = vb
                if vb[_HANDSHAKE] == _COMPLETE and not t.established:  # its event was dropped
                    self._established(t, _value(vb))
            if rst_ns:
                if not t.ended:
                    self._end(t, "rst", _value(vb))  # the kernel's RST event was dropped
                self.table.delete_flow(t.key)
                del flows[kb]
            elif fin_ns and now_ns - fin_ns >= to.fin_linger_ns:
                self._finish(kb, t, "fin")
            elif now_ns - last_ns >= to.idle_ns:
                self._finish(kb, t, "idle")
            elif now_ns - t.last_report_ns >= to.active_ns:
                t.last_report_ns = now_ns
                self.report(FlowReport("flow_update", None, t.key, _value(vb), t.banners))
        for kb in flows.keys() - present:  # gone from the table (or learned of during the read)
            t = flows[kb]
            if t.generation < self._generation:
                if not t.ended:
                    self._evict(t)
                del flows[kb]

    def _finish(self, kb: bytes, t: _Tracked, reason: str) -> None:
        final = self.table.pop_flow(t.key)
        if final is None or final.first_ns != t.first_ns:
            final = _value(t.val)  # evicted or replaced between read and delete: last counts read
        self._end(t, reason, final)
        del self._flows[kb]

    def shutdown(self, now_ns: int) -> None:
        """End every open flow (reason shutdown). Call after detaching the program, so the
        counts read here are final."""
        self.sweep(now_ns)
        for t in self._flows.values():
            if not t.ended:
                self._end(t, "shutdown", _value(t.val))
        self._flows.clear()
