"""The producer's run loop: kernel -> decode -> shape -> serialize -> export.

One thread. Each turn waits on the ring buffer (at most `tick`), serves Kafka delivery
reports, and when due sweeps the flow table and emits the interval's counters.
Shutdown order matters for exact counts: detach first (no packet can be counted after
that), then drain the ring buffer, end open flows, emit the last partial interval, flush.
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field

import orjson

from xdpwatch import schemas
from xdpwatch.producer.enforcement import Enforcer, Policy
from xdpwatch.producer.errors import ConfigError
from xdpwatch.producer.events import Clock, CounterDeltas, EventShaper
from xdpwatch.kafka.read import ControlReader
from xdpwatch.producer.exporter import DeliveryStats, Exporter
from xdpwatch.producer.flows import FlowReport, FlowTimeouts, FlowTracker
from xdpwatch.producer.hostnet import Protected, broker_protected, host_protected
from xdpwatch.producer.loader import BpfConfig, XdpProgram
from xdpwatch.producer.metrics import ProducerMetrics, Snapshot
from xdpwatch.producer.records import CounterId

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProduceConfig:
    iface: str
    interval_s: float = 1.0
    xdp_mode: str = "auto"
    bpf: BpfConfig = field(default_factory=BpfConfig)
    timeouts: FlowTimeouts = field(default_factory=FlowTimeouts)
    sweep_s: float = 1.0
    flush_timeout_s: float = 30.0
    policy: Policy = field(default_factory=Policy)  # used when bpf.enforce_mode is not "off"
    egress: bool = True  # also hook egress: SSH flows count both directions
    kafka_brokers: tuple[str, ...] = ()  # bootstrap servers: never blocked (with the host's own addresses)


@dataclass
class RunSummary:
    intervals: int = 0
    packets: int = 0
    flows_started: int = 0
    flows_evicted: int = 0
    ringbuf_drops: int = 0
    delivery: DeliveryStats = field(default_factory=DeliveryStats)


def run(cfg: ProduceConfig, exporter: Exporter, stop: threading.Event,
        metrics: ProducerMetrics | None = None, control: ControlReader | None = None) -> RunSummary:
    """Watch `cfg.iface` until `stop` is set; returns what was counted and delivered. With
    enforcement on, `control` brings the block/unblock commands."""
    prog = XdpProgram(cfg.bpf)
    try:
        return _Run(cfg, prog, exporter, metrics, control).loop(stop)
    finally:
        prog.close()


class _Run:
    def __init__(self, cfg: ProduceConfig, prog: XdpProgram, exporter: Exporter, metrics: ProducerMetrics | None,
                 control: ControlReader | None = None):
        self.cfg, self.prog, self.exporter, self.metrics = cfg, prog, exporter, metrics
        self.clock = Clock()
        self.shaper = EventShaper(cfg.iface, self.clock, enforce_mode=cfg.bpf.enforce_mode)
        self.tracker = FlowTracker(prog, self._export_flow, cfg.timeouts, drain=lambda: prog.poll_events(0))
        prog.open_events(self.tracker.on_event)
        self.control = control
        self.enforcer = None
        if cfg.bpf.enforce_mode != "off":
            self.enforcer = Enforcer(prog, cfg.bpf.enforce_mode, cfg.policy,
                                     lambda doc: self._export("enforcement", doc), self.shaper)
        self.summary = RunSummary()
        self._evicted_reported = 0
        self._brokers: list[Protected] = []

    def _export_flow(self, report: FlowReport) -> None:
        self._export("ssh-flows", self.shaper.flow(report))

    def _export(self, stream: str, doc: dict) -> None:
        self.exporter.export(stream, schemas.key_of(stream, doc), orjson.dumps(doc))

    def _export_interval(self, now_ns: int, final: bool = False) -> None:
        current = self.prog.read_counters()
        delta = self.deltas.delta(current)
        evicted = self.tracker.evicted - self._evicted_reported
        self._evicted_reported = self.tracker.evicted
        active = self.tracker.active  # counts the tracked flows: once per interval
        doc = self.shaper.packet_counts(self.clock.wall_ns(self.interval_start), self.clock.wall_ns(now_ns),
                                        delta, evicted, active, final)
        self._export("packet-counts", doc)
        self.interval_start = now_ns
        self.clock.resync()
        s = self.summary
        s.intervals += 1
        s.packets = current[CounterId.TOTAL][0]
        s.flows_started = current[CounterId.FLOWS_STARTED][0]
        s.ringbuf_drops = current[CounterId.RINGBUF_DROPS][0]
        s.flows_evicted = self.tracker.evicted
        if self.metrics is not None:
            self.metrics.snapshot = Snapshot(current, active, self.tracker.evicted, s.intervals)
        if delta[CounterId.RINGBUF_DROPS][0]:
            log.warning("ring buffer full: %d flow events lost in the kernel this interval "
                        "(raise --ringbuf-pages)", delta[CounterId.RINGBUF_DROPS][0])

    # Sweeping reads the whole flow table in Python: with a big table it must not take
    # the loop over. After a sweep that took d seconds, the next one waits at least
    # SWEEP_BUDGET_FACTOR * d, so sweeping uses at most ~1/(1+factor) of the time; timeouts
    # then fire up to that much later (still seconds for 100k flows).
    SWEEP_BUDGET_FACTOR = 10

    # The tracked flows are many long-lived objects without reference cycles; Python's
    # default collector (a young-generation pass every 700 allocations) walks them again
    # and again under a burst of events. Rarer passes, and the startup heap frozen out of
    # them, cut that to a fraction (bench/run.py measures the loop with this setting).
    GC_THRESHOLD = (20_000, 10, 10)

    # How often the never-block list (this host's addresses and gateways) is read again.
    NEVER_BLOCK_REFRESH_S = 10.0

    def _protect(self, at_start: bool = False) -> None:
        """Give the enforcer the never-block list as it is now: the Kafka brokers (resolved
        at start) and this host's addresses and default gateways (read each time). Without
        the host's addresses at start, enforcement does not start; later, the last list read
        stays in force."""
        try:
            host = host_protected()
        except OSError as e:
            if at_start:
                raise ConfigError(f"cannot read this host's addresses from /proc/net ({e}): enforcement needs them "
                                  "so as never to block the host itself") from None
            log.error("never-block list not refreshed: cannot read /proc/net (%s); the last one stays in force", e)
            return
        self.enforcer.protect([*self._brokers, *host])

    def start(self) -> None:
        """Take the counters' starting point and the schedule; call before step()."""
        gc.freeze()
        gc.set_threshold(*self.GC_THRESHOLD)
        cfg = self.cfg
        self._interval_ns, self._sweep_ns = int(cfg.interval_s * 1e9), int(cfg.sweep_s * 1e9)
        self.deltas = CounterDeltas(self.prog.read_counters())
        self.interval_start = self.clock.monotonic_ns()
        self._next_interval = self.interval_start + self._interval_ns
        self._next_sweep = self.interval_start + self._sweep_ns
        self._next_protect = self.interval_start + int(self.NEVER_BLOCK_REFRESH_S * 1e9)

    def step(self) -> None:
        """One turn: wait for ring-buffer records (until the next deadline, at most 100 ms),
        serve Kafka delivery reports, sweep and emit the interval when they are due."""
        clock = self.clock
        now = clock.monotonic_ns()
        wait_ms = max(0, min(self._next_interval, self._next_sweep, now + 100_000_000) - now) // 1_000_000
        self.prog.poll_events(max(1, wait_ms))
        self.exporter.poll()
        if self.enforcer is not None:
            if self.control is not None:
                for raw in self.control.poll():
                    self.enforcer.handle(raw)
            self.enforcer.expire()
            if clock.monotonic_ns() >= self._next_protect:
                self._protect()
                self._next_protect = clock.monotonic_ns() + int(self.NEVER_BLOCK_REFRESH_S * 1e9)
        now = clock.monotonic_ns()
        if now >= self._next_sweep:
            self.tracker.sweep(now)
            done = clock.monotonic_ns()
            self._next_sweep = done + max(self._sweep_ns, self.SWEEP_BUDGET_FACTOR * (done - now))
        if now >= self._next_interval:
            self._export_interval(now)
            # Keep a steady cadence; skip intervals we were too busy to emit.
            n = self._interval_ns
            self._next_interval += n * max(1, (now - self._next_interval) // n + 1)

    def loop(self, stop: threading.Event) -> RunSummary:
        cfg, clock = self.cfg, self.clock
        if self.enforcer is not None:
            servers = (*cfg.kafka_brokers, *(self.control.brokers if self.control is not None else ()))
            self._brokers = broker_protected(servers)
            self._protect(at_start=True)
        if self.enforcer is not None and self.control is not None:
            # Every command so far, before the first packet: blocks still within their TTL
            # are in place from the start.
            self.enforcer.restore(self.control.catch_up())
        self.start()
        attachment = self.prog.attach(cfg.iface, cfg.xdp_mode, cfg.egress)
        try:
            while not stop.is_set():
                self.step()
        finally:
            attachment.detach()
        now = clock.monotonic_ns()
        self.prog.poll_events(0)
        self.tracker.shutdown(now)
        if self.enforcer is not None:
            self.enforcer.close()
        self._export_interval(now, final=True)
        self.summary.delivery = self.exporter.close(cfg.flush_timeout_s)
        return self.summary
