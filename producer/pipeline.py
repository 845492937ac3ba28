"""The producer: kernel -> decode -> shape -> serialize -> export, as one Pipeline.

`build(options)` makes it from what `xdpwatch produce` is told, `Pipeline.run(stop)` runs it
until `stop` is set, `finish` reports the run (the last log line, --summary-file) and says
whether every event was delivered. The CLI only parses options and maps errors.

The run loop is one thread. Each turn waits on the ring buffer (at most until the next
deadline), serves Kafka delivery reports, and when due sweeps the flow table and emits the
interval's counters. Shutdown order matters for exact counts: detach first (no packet can be
counted after that), then drain the ring buffer, end open flows, emit the last partial
interval, flush.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from xdpwatch import schemas
from xdpwatch.kafka.read import ControlReader
from xdpwatch.observability import serve_metrics
from xdpwatch.producer.enforcement import Enforcer, Network, Policy
from xdpwatch.producer.errors import ConfigError, DeliveryError
from xdpwatch.producer.events import Clock, CounterDeltas, EventShaper
from xdpwatch.producer.exporter import DeliveryStats, Exporter, KafkaExporter, StdoutExporter
from xdpwatch.producer.flows import FlowReport, FlowTimeouts, FlowTracker
from xdpwatch.producer.hostnet import Protected, broker_protected, host_protected
from xdpwatch.producer.loader import BpfConfig, XdpProgram, ifindex_of
from xdpwatch.producer.metrics import ProducerMetrics, Snapshot
from xdpwatch.producer.records import CounterId
from xdpwatch.producer.spool import Spool

log = logging.getLogger(__name__)


@dataclass
class Options:
    """What `xdpwatch produce` is told, parsed: the README's table of options."""

    iface: str
    output: str                       # "kafka" or "stdout"
    kafka: dict | None                # client settings (bootstrap.servers, -X ...) with --output kafka
    interval_s: float
    flow_idle_timeout_s: float
    flow_active_timeout_s: float
    flow_fin_linger_s: float
    ssh_ports: tuple[int, ...]
    topic_prefix: str
    topic_partitions: int
    topic_replication: int
    xdp_mode: str                     # auto, native, generic
    egress: bool
    flow_table_size: int
    ringbuf_pages: int
    shutdown_timeout_s: float
    spool_dir: Path
    spool_max_mb: int                 # 0: no spool
    enforce_mode: str                 # off, dry_run, enforce
    allow: tuple[Network, ...]
    syn_rate_limit: int
    syn_burst: int
    metrics_port: int | None
    metrics_address: str
    summary_file: Path | None

    def check(self) -> BpfConfig:
        """The program's settings; ConfigError for options that cannot work together."""
        bpf = BpfConfig(tuple(sorted(set(self.ssh_ports))), self.flow_table_size, self.ringbuf_pages,
                        self.enforce_mode, self.syn_rate_limit, self.syn_burst)
        bpf.validate()
        if self.enforce_mode != "off" and self.output != "kafka":
            raise ConfigError("--enforce and --dry-run take their commands from Kafka: use --output kafka")
        if self.summary_file is not None and not self.summary_file.resolve().parent.is_dir():
            raise ConfigError(f"--summary-file {self.summary_file}: its directory does not exist")
        return bpf

    def config(self, bpf: BpfConfig) -> ProduceConfig:
        brokers = self.kafka["bootstrap.servers"].split(",") if self.kafka else ()
        return ProduceConfig(
            iface=self.iface, interval_s=self.interval_s, xdp_mode=self.xdp_mode, bpf=bpf,
            timeouts=FlowTimeouts(idle_ns=int(self.flow_idle_timeout_s * 1e9),
                                  active_ns=int(self.flow_active_timeout_s * 1e9),
                                  fin_linger_ns=int(self.flow_fin_linger_s * 1e9)),
            sweep_s=min(1.0, self.interval_s), flush_timeout_s=self.shutdown_timeout_s,
            policy=Policy(allow=self.allow), egress=self.egress, kafka_brokers=tuple(brokers))


@dataclass(frozen=True)
class ProduceConfig:
    """What the run loop needs."""

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

    def as_dict(self) -> dict:
        """The run's figures as --summary-file has them (README, *Run the producer*)."""
        d = self.delivery
        return {"packets": self.packets, "ssh_flows": self.flows_started, "flows_evicted": self.flows_evicted,
                "ringbuf_drops": self.ringbuf_drops, "intervals": self.intervals,
                "events": {"produced": d.produced, "delivered": d.delivered, "failed": d.failed,
                           "undelivered": d.pending, "spooled": d.spooled, "dropped": d.dropped,
                           "already_in_kafka": d.already_in_kafka}}


def build(options: Options) -> Pipeline:
    """The producer `options` describe, in the order that fails fastest and leaves least
    behind: options checked, the interface looked up, Kafka reached and topics created, then
    the spool opened (a wrong broker address leaves nothing on disk), the control topic's
    reader (with enforcement), the metrics endpoint, and last the program compiled and
    loaded (about 2 s). Not yet attached: `run` attaches."""
    bpf = options.check()
    cfg = options.config(bpf)
    ifindex_of(options.iface)  # fail on a bad interface before touching Kafka
    control = None
    enforcing = options.enforce_mode != "off"
    if options.output == "kafka":
        streams = ("packet-counts", "ssh-flows") + (("enforcement",) if enforcing else ())
        exporter = KafkaExporter(options.kafka, options.topic_prefix, streams=streams)
        control_topic = schemas.topic(options.topic_prefix, "control")
        exporter.ensure_topics(options.topic_partitions, options.topic_replication,
                               single_partition=(control_topic,) if enforcing else ())
        if options.spool_max_mb:
            exporter.use_spool(open_spool(options.spool_dir, options.spool_max_mb))
        if enforcing:
            control = ControlReader(options.kafka, control_topic)
    else:
        exporter = StdoutExporter()
    try:
        metrics = ProducerMetrics(options.iface, options.flow_table_size, exporter.stats) if options.metrics_port else None
        serve_metrics(options.metrics_port, metrics, options.metrics_address)
        return Pipeline(cfg, XdpProgram(bpf), exporter, metrics, control)
    except BaseException:
        if control is not None:
            control.close()
        raise


def open_spool(directory: Path, max_mb: int) -> Spool:
    try:
        return Spool(directory, max_mb << 20)
    except OSError as e:
        raise ConfigError(f"cannot use spool directory {directory} ({e.strerror}): choose another with --spool-dir, "
                          "or run without a spool with --spool-max-mb 0") from None


def finish(summary: RunSummary, options: Options) -> None:
    """The end of a run: its figures in the last log line, and in --summary-file; then
    DeliveryError (exit 3) if events were lost or wait in the spool."""
    d = summary.delivery
    log.info("stopped: %d packets, %d SSH flows (%d evicted), %d ring-buffer drops; events produced %d, "
             "delivered %d, failed %d, undelivered %d, spooled %d, dropped %d, already in Kafka %d",
             summary.packets, summary.flows_started, summary.flows_evicted, summary.ringbuf_drops,
             d.produced, d.delivered, d.failed, d.pending, d.spooled, d.dropped, d.already_in_kafka)
    unwritten = None
    if options.summary_file is not None:
        try:
            write_private(options.summary_file, orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as e:
            unwritten = ConfigError(f"cannot write --summary-file {options.summary_file}: {e.strerror}")
            log.error("%s", unwritten)
    lost = d.failed + d.pending + d.dropped
    if lost:
        raise DeliveryError(f"{lost} of {d.produced + d.dropped} events were not delivered to Kafka "
                            "(see the errors above)" + (f"; {d.spooled} more wait in the spool" if d.spooled else ""))
    if d.spooled:
        raise DeliveryError(f"Kafka did not take every event before the shutdown timeout: {d.spooled} wait in "
                            f"the spool {options.spool_dir} and are sent first at the next start")
    if unwritten is not None:
        raise unwritten


def write_private(path: Path, data: bytes) -> None:
    """`data` as the whole of `path`, readable by its owner only (0600): written to a new file
    beside it, then renamed over it, so a reader sees the old file or the new one, whole, and
    a symbolic link planted at `path` is replaced, never followed."""
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Pipeline:
    """The run loop over a loaded program: `run(stop)` attaches, loops until `stop`, shuts
    down in order and closes; `start` then `step` are its parts (the benchmark drives them).
    With enforcement on, `control` brings the block/unblock commands."""

    def __init__(self, cfg: ProduceConfig, prog: XdpProgram, exporter: Exporter,
                 metrics: ProducerMetrics | None = None, control: ControlReader | None = None):
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

    def run(self, stop: threading.Event) -> RunSummary:
        """Watch `cfg.iface` until `stop` is set; returns what was counted and delivered."""
        try:
            return self._loop(stop)
        finally:
            self.close()

    def close(self) -> None:
        self.prog.close()
        if self.control is not None:
            self.control.close()

    def _loop(self, stop: threading.Event) -> RunSummary:
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
