"""The flow path: ring-buffer records and flow-table reads -> flow reports -> ssh-flows
documents -> the exporter. Two implementations behind one interface (poll_events, sweep,
shutdown, end_iface, evicted, evicted_by_iface, active, active_by_iface, close, path):

- PythonFlows, the reference: bcc's ring-buffer callback, FlowTracker (flows.py),
  EventShaper.flow (events.py), orjson, one export per document.
- CompiledFlows: the same in C (_fastpath.c): the ring buffer read through libbpf, the
  tracker's decisions and the documents made there, handed to the exporter in batches, so
  that the Python left per event is the exporter's loop around produce(). It shares the
  EventShaper's id sequence and Clock. tests/unit/test_fastpath.py proves both make the same
  bytes for the same records and table reads.

open_flow_path("auto") takes the compiled one when it is built and imports, else the Python
one with one warning; "compiled" insists, "python" forces the reference. `name_of(ifindex)`
names the interface a flow was seen on (its document's observer); without it every document
has the shaper's default observer. The compiled path asks once per interface, until
end_iface(ifindex).
"""

from __future__ import annotations

import ctypes as ct
import logging
from typing import Callable, Optional, Protocol

import orjson

from xdpwatch import schemas
from xdpwatch.producer.errors import ConfigError
from xdpwatch.producer.events import EventShaper
from xdpwatch.producer.flows import FlowReport, FlowTimeouts, FlowTracker
from xdpwatch.producer.records import BannerEvent, FlowEvent, FlowKey, FlowValue

log = logging.getLogger(__name__)

PATHS = ("auto", "compiled", "python")
STREAM = "ssh-flows"

try:
    from xdpwatch.producer import _fastpath
except ImportError as e:  # not built (no compiler at install time) or built for another Python
    _fastpath = None
    _IMPORT_ERROR = str(e)


def unavailable() -> str | None:
    """Why the compiled path cannot run here, or None when it can."""
    if _fastpath is None:
        return f"xdpwatch.producer._fastpath does not import ({_IMPORT_ERROR})"
    expected = {"flow_key": ct.sizeof(FlowKey), "flow_value": ct.sizeof(FlowValue),
                "flow_event": ct.sizeof(FlowEvent), "banner_event": ct.sizeof(BannerEvent),
                "type": FlowEvent.type.offset, "handshake": FlowValue.handshake.offset,
                "server_sizes": FlowValue.server_sizes.offset, "banner_len": BannerEvent.len.offset,
                "banner_dir": BannerEvent.dir.offset}
    if _fastpath.LAYOUT != expected:
        return f"it was built for another bpf/xdpwatch.h ({_fastpath.LAYOUT} != {expected}); run `make setup`"
    return None


class Exporter(Protocol):
    def export(self, stream: str, key: bytes | None, value: bytes) -> None: ...
    def export_many(self, stream: str, items: list[tuple[bytes | None, bytes]]) -> None: ...


class CompiledTable(Protocol):
    def flow_blobs(self) -> list[tuple[bytes, bytes]]: ...  # the table as (keys, values) chunks of raw records
    def pop_flow(self, key: FlowKey) -> FlowValue | None: ...
    def delete_flow(self, key: FlowKey) -> None: ...


class PythonFlows:
    """The reference path on an XdpProgram: FlowTracker fed by bcc's ring-buffer callback."""

    path = "python"

    def __init__(self, prog, shaper: EventShaper, timeouts: FlowTimeouts, exporter: Exporter,
                 name_of: Optional[Callable[[int], str]] = None):
        self._shaper, self._exporter, self._name_of = shaper, exporter, name_of
        self.tracker = FlowTracker(prog, self._report, timeouts, drain=lambda: prog.poll_events(0))
        prog.open_events(self.tracker.on_event)
        self.poll_events = prog.poll_events

    def _report(self, report: FlowReport) -> None:
        doc = self._shaper.flow(report, None if self._name_of is None else self._name_of(report.key.ifindex))
        self._exporter.export(STREAM, schemas.key_of(STREAM, doc), orjson.dumps(doc))

    def sweep(self, now_ns: int) -> None:
        self.tracker.sweep(now_ns)

    def shutdown(self, now_ns: int) -> None:
        self.tracker.shutdown(now_ns)

    def end_iface(self, ifindex: int, now_ns: int) -> None:
        self.tracker.end_iface(ifindex, now_ns)

    def active_by_iface(self) -> dict[int, int]:
        return self.tracker.active_by_iface()

    @property
    def evicted(self) -> int:
        return self.tracker.evicted

    @property
    def evicted_by_iface(self) -> dict[int, int]:
        return self.tracker.evicted_by_iface

    @property
    def active(self) -> int:
        return self.tracker.active

    def close(self) -> None:
        pass


class CompiledFlows:
    """FlowTracker + EventShaper.flow + orjson.dumps + schemas.key_of in C, on `table`.

    Documents go to `emit` as lists of (key, JSON bytes), in the order the reference makes
    them. `drain` (tests): what FlowTracker's drain does when no ring buffer is open."""

    path = "compiled"
    # Ring-buffer records read per poll_events(): under a flood the run loop still gets back
    # to its sweeps, intervals and delivery reports between batches.
    BUDGET = 8192

    def __init__(self, table: CompiledTable, shaper: EventShaper, timeouts: FlowTimeouts,
                 emit: Callable[[list[tuple[bytes, bytes]]], None], drain: Callable[[], None] | None = None,
                 name_of: Optional[Callable[[int], str]] = None):
        problem = unavailable()
        if problem:
            raise ConfigError(f"the compiled flow path is not available: {problem}")
        self._shaper = shaper
        self._depth = 0

        def pop(kb: bytes) -> bytes | None:
            val = table.pop_flow(FlowKey.from_buffer_copy(kb))
            return None if val is None else bytes(val)

        self._t = _fastpath.Tracker(
            orjson.dumps(shaper._id_prefix)[1:-1], orjson.dumps(shaper._observer),  # the shaper's constant parts
            timeouts.idle_ns, timeouts.active_ns, timeouts.fin_linger_ns, emit, table.flow_blobs, pop,
            lambda kb: table.delete_flow(FlowKey.from_buffer_copy(kb)), drain,
            observer_of=None if name_of is None else lambda ifindex: orjson.dumps(shaper.observer(name_of(ifindex))))

    def _call(self, method, arg):
        """Run a tracker method with the shaper's id sequence and clock, and give the
        sequence back (packet-count and enforcement events share it)."""
        if self._depth:  # called back from within (a test's drain)
            return method(arg)
        t, shaper = self._t, self._shaper
        t.seq, t.offset = shaper._seq, shaper.clock.wall_ns(0)
        self._depth += 1
        try:
            return method(arg)
        finally:
            self._depth -= 1
            shaper._seq = t.seq

    def open_ring(self, map_fd: int) -> None:
        """Read the BPF ring buffer `map_fd` in poll_events() (and in sweeps)."""
        self._t.open_ring(map_fd)

    def poll_events(self, timeout_ms: int) -> int:
        """Up to BUDGET ring-buffer records, waiting up to `timeout_ms` for the first (0: no wait)."""
        return self._call(lambda ms: self._t.poll(ms, self.BUDGET), timeout_ms)

    def record(self, data: bytes) -> None:
        """One raw ring-buffer record (what FlowTracker.on_event takes decoded)."""
        self._call(self._t.record, data)

    def shape(self, report: FlowReport) -> tuple[bytes, bytes]:
        """(key, document) of one report, as the reference makes them: EventShaper.flow, orjson."""
        return self._call(lambda r: self._t.shape(r.action, r.reason, bytes(r.key), bytes(r.val), r.banners), report)

    def sweep(self, now_ns: int) -> None:
        self._call(self._t.sweep, now_ns)

    def shutdown(self, now_ns: int) -> None:
        self._call(self._t.shutdown, now_ns)

    def end_iface(self, ifindex: int, now_ns: int) -> None:
        self._call(lambda now: self._t.end_iface(ifindex, now), now_ns)

    def active_by_iface(self) -> dict[int, int]:
        return self._t.active_by_iface()

    @property
    def evicted(self) -> int:
        return self._t.evicted

    @property
    def evicted_by_iface(self) -> dict[int, int]:
        return self._t.evicted_by_iface

    @property
    def active(self) -> int:
        return self._t.active

    def close(self) -> None:
        self._t.close()


def open_flow_path(mode: str, prog, shaper: EventShaper, timeouts: FlowTimeouts, exporter: Exporter,
                   name_of: Optional[Callable[[int], str]] = None) -> PythonFlows | CompiledFlows:
    """The flow path for `prog` (an XdpProgram), its ring buffer opened: `mode` auto (the
    compiled one when it can run here, else the Python one with a warning), compiled, python."""
    if mode not in PATHS:
        raise ConfigError(f"the flow path must be one of {', '.join(PATHS)}, got {mode!r}")
    if mode != "python":
        problem = unavailable()
        if problem is None:
            flows = CompiledFlows(prog, shaper, timeouts, lambda docs: exporter.export_many(STREAM, docs),
                                  name_of=name_of)
            flows.open_ring(prog.bpf[b"events"].map_fd)
            log.info("flow events: compiled path")
            return flows
        if mode == "compiled":
            raise ConfigError(f"the compiled flow path is not available: {problem}")
        log.warning("flow events: Python path, the compiled one is not available (%s); `make setup` builds it",
                    problem)
    else:
        log.info("flow events: Python path (chosen)")
    return PythonFlows(prog, shaper, timeouts, exporter, name_of)
