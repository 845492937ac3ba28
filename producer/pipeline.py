"""The producer: kernel -> decode -> shape -> serialize -> export, as one Pipeline.

`build(options)` makes it from what `xdpwatch produce` is told, `Pipeline.run(stop)` runs it
until `stop` is set, `finish` reports the run (the last log line, --summary-file) and says
whether every event was delivered. The CLI only parses options and maps errors.

The run loop is one thread. Each turn waits on the ring buffer (at most until the next
deadline), serves Kafka delivery reports, follows the interfaces (on a link notification,
and every few seconds), and when due sweeps the flow table and emits each interface's
interval counters. Shutdown order matters for exact counts: detach first (no packet can be
counted after that), then drain the ring buffer, end open flows, emit the last partial
intervals, flush. An interface that goes is handled the same way, alone.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from xdpwatch import schemas
from xdpwatch.kafka.read import ControlReader
from xdpwatch.observability import serve_metrics
from xdpwatch.producer.enforcement import Enforcer, Network, Policy
from xdpwatch.producer.errors import AttachError, ConfigError, DeliveryError, InterfaceError, OccupiedError
from xdpwatch.producer.events import Clock, CounterDeltas, EventShaper
from xdpwatch.producer.exporter import DeliveryStats, Exporter, KafkaExporter, StdoutExporter
from xdpwatch.producer.flowpath import PATHS as FLOW_PATHS, open_flow_path
from xdpwatch.producer.flows import FlowTimeouts
from xdpwatch.producer.hostnet import Protected, broker_protected, host_protected
from xdpwatch.producer import libbpf
from xdpwatch.producer.interfaces import LinkEvents, Selection, current_links
from xdpwatch.producer.loader import Attachment, BpfConfig, XdpProgram
from xdpwatch.producer.metrics import ProducerMetrics, Snapshot
from xdpwatch.producer.records import NR_COUNTERS, CounterId
from xdpwatch.producer.spool import Spool

log = logging.getLogger(__name__)


@dataclass
class Options:
    """What `xdpwatch produce` is told, parsed: the README's table of options."""

    ifaces: tuple[str, ...]           # --iface, repeated
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
    iface_pattern: str | None = None
    exclude_iface_pattern: str | None = None
    flow_path: str = "auto"           # auto, compiled, python (flowpath.open_flow_path)

    def selection(self) -> Selection:
        return Selection.parse(self.ifaces, self.iface_pattern, self.exclude_iface_pattern)

    def check(self) -> BpfConfig:
        """The program's settings; ConfigError for options that cannot work together."""
        bpf = BpfConfig(tuple(sorted(set(self.ssh_ports))), self.flow_table_size, self.ringbuf_pages,
                        self.enforce_mode, self.syn_rate_limit, self.syn_burst)
        bpf.validate()
        self.selection()
        if self.flow_path not in FLOW_PATHS:
            raise ConfigError(f"the flow path must be one of {', '.join(FLOW_PATHS)}, got {self.flow_path!r}")
        if self.enforce_mode != "off" and self.output != "kafka":
            raise ConfigError("--enforce and --dry-run take their commands from Kafka: use --output kafka")
        if self.summary_file is not None and not self.summary_file.resolve().parent.is_dir():
            raise ConfigError(f"--summary-file {self.summary_file}: its directory does not exist")
        return bpf

    def config(self, bpf: BpfConfig) -> ProduceConfig:
        brokers = self.kafka["bootstrap.servers"].split(",") if self.kafka else ()
        return ProduceConfig(
            selection=self.selection(), interval_s=self.interval_s, xdp_mode=self.xdp_mode, bpf=bpf,
            timeouts=FlowTimeouts(idle_ns=int(self.flow_idle_timeout_s * 1e9),
                                  active_ns=int(self.flow_active_timeout_s * 1e9),
                                  fin_linger_ns=int(self.flow_fin_linger_s * 1e9)),
            sweep_s=min(1.0, self.interval_s), flush_timeout_s=self.shutdown_timeout_s,
            policy=Policy(allow=self.allow), egress=self.egress, kafka_brokers=tuple(brokers),
            flow_path=self.flow_path)


@dataclass(frozen=True)
class ProduceConfig:
    """What the run loop needs."""

    selection: Selection | None = None  # None: attach nowhere (benchmarks drive start/step)
    interval_s: float = 1.0
    xdp_mode: str = "auto"
    bpf: BpfConfig = field(default_factory=BpfConfig)
    timeouts: FlowTimeouts = field(default_factory=FlowTimeouts)
    sweep_s: float = 1.0
    flush_timeout_s: float = 30.0
    policy: Policy = field(default_factory=Policy)  # used when bpf.enforce_mode is not "off"
    egress: bool = True  # also hook egress: SSH flows count both directions
    kafka_brokers: tuple[str, ...] = ()  # bootstrap servers: never blocked (with the host's own addresses)
    rescan_s: float = 2.0  # interfaces re-read this often, and on every link notification
    flow_path: str = "auto"  # auto | compiled | python: who makes the flow events (flowpath.py)


@dataclass
class RunSummary:
    intervals: int = 0
    packets: int = 0
    flows_started: int = 0
    flows_evicted: int = 0
    ringbuf_drops: int = 0
    delivery: DeliveryStats = field(default_factory=DeliveryStats)
    interfaces: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> packets, bytes (all its intervals)
    flow_path: str = ""  # compiled | python: the one that ran
    MAX_INTERFACES = 4096  # names kept; the rest add up under "(others)"

    def add(self, iface: str, delta: list[tuple[int, int]]) -> None:
        """One interval record's deltas of `iface`."""
        self.packets += delta[CounterId.TOTAL][0]
        self.flows_started += delta[CounterId.FLOWS_STARTED][0]
        self.ringbuf_drops += delta[CounterId.RINGBUF_DROPS][0]
        if iface not in self.interfaces and len(self.interfaces) >= self.MAX_INTERFACES:
            iface = "(others)"  # a host whose interfaces come and go all day: bounded
        mine = self.interfaces.setdefault(iface, {"packets": 0, "bytes": 0})
        mine["packets"] += delta[CounterId.TOTAL][0]
        mine["bytes"] += delta[CounterId.TOTAL][1]

    def as_dict(self) -> dict:
        """The run's figures as --summary-file has them (README, *Run the producer*)."""
        d = self.delivery
        return {"packets": self.packets, "ssh_flows": self.flows_started, "flows_evicted": self.flows_evicted,
                "ringbuf_drops": self.ringbuf_drops, "intervals": self.intervals, "flow_path": self.flow_path,
                "interfaces": self.interfaces,
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
    cfg.selection.check_start(current_links())  # fail on a bad interface before touching Kafka
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
        metrics = ProducerMetrics(options.flow_table_size, exporter.stats) if options.metrics_port else None
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


@dataclass
class _Watched:
    """One interface the program is attached to, and its interval bookkeeping."""

    name: str
    attachment: Attachment
    deltas: CounterDeltas          # its slot's counters, from the moment it was attached
    start_ns: int                  # the start of its current interval (monotonic)
    totals: list[tuple[int, int]]  # cumulative this run: what the metrics show
    intervals: int = 0
    evicted_reported: int = 0


class Pipeline:
    """The run loop over a loaded program: `run(stop)` attaches, loops until `stop`, shuts
    down in order and closes; `start` then `step` are its parts (the benchmark drives them).
    With enforcement on, `control` brings the block/unblock commands.

    Interfaces: `cfg.selection` says which; each one that appears (a link notification, or
    the periodic re-read) and matches is attached, each one that goes (or stops matching) is
    detached, its flows ended (reason shutdown) and its last partial interval emitted. One
    that cannot be attached (a foreign XDP program) is skipped with one log line and tried
    again only once its XDP hook is free."""

    def __init__(self, cfg: ProduceConfig, prog: XdpProgram, exporter: Exporter,
                 metrics: ProducerMetrics | None = None, control: ControlReader | None = None):
        self.cfg, self.prog, self.exporter, self.metrics = cfg, prog, exporter, metrics
        self.clock = Clock()
        self.shaper = EventShaper(None, self.clock, enforce_mode=cfg.bpf.enforce_mode)
        # ring buffer -> flow tracking -> ssh-flows documents -> exporter, compiled or in Python
        self.tracker = open_flow_path(cfg.flow_path, prog, self.shaper, cfg.timeouts, exporter, self._name_of)
        if metrics is not None:
            metrics.flow_path = self.tracker.path
        self.control = control
        self.enforcer = None
        if cfg.bpf.enforce_mode != "off":
            self.enforcer = Enforcer(prog, cfg.bpf.enforce_mode, cfg.policy,
                                     lambda doc: self._export("enforcement", doc), self.shaper)
        self.summary = RunSummary(flow_path=self.tracker.path)
        self._brokers: list[Protected] = []
        self.watched: dict[int, _Watched] = {}  # ifindex -> the interface attached to
        self._skipped: dict[int, tuple[str, bool]] = {}  # ifindex -> (name, retry once its XDP hook is free)
        self._links: LinkEvents | None = None
        self._other_names: dict[int, str] = {}

    def _name_of(self, ifindex: int) -> str:
        w = self.watched.get(ifindex)
        if w is not None:
            return w.name
        # A flow of an interface not watched (a packet in flight as it was detached; the
        # benchmarks, which attach nowhere): its name now, remembered (ifindexes are not
        # reused soon: the kernel hands them out in turn).
        name = self._other_names.get(ifindex)
        if name is None:
            try:
                name = socket.if_indextoname(ifindex)
            except OSError:
                name = f"ifindex-{ifindex}"
            if len(self._other_names) >= 1024:
                self._other_names.clear()
            self._other_names[ifindex] = name
        return name

    def _export(self, stream: str, doc: dict) -> None:
        self.exporter.export(stream, schemas.key_of(stream, doc), orjson.dumps(doc))

    def _export_interval(self, now_ns: int, final: bool = False) -> None:
        """Every watched interface's record of the interval ending now."""
        active = self.tracker.active_by_iface()  # counts the tracked flows: once per interval
        for ifindex, w in self.watched.items():
            self._emit_interval(ifindex, w, now_ns, active.get(ifindex, 0), final)
        self.clock.resync()
        self.summary.intervals += 1
        self.summary.flows_evicted = self.tracker.evicted

    def _emit_interval(self, ifindex: int, w: _Watched, now_ns: int, active: int, final: bool) -> None:
        """`w`'s record from the start of its interval to `now_ns`."""
        delta = w.deltas.delta(self.prog.read_counters(w.attachment.slot))
        evicted_total = self.tracker.evicted_by_iface.get(ifindex, 0)
        evicted, w.evicted_reported = evicted_total - w.evicted_reported, evicted_total
        doc = self.shaper.packet_counts(self.clock.wall_ns(w.start_ns), self.clock.wall_ns(now_ns),
                                        delta, evicted, active, final, interface=w.name)
        self._export("packet-counts", doc)
        w.start_ns = now_ns
        w.intervals += 1
        w.totals = [(p + dp, b + db) for (p, b), (dp, db) in zip(w.totals, delta)]
        self.summary.add(w.name, delta)
        if self.metrics is not None:
            self.metrics.snapshots[w.name] = Snapshot(w.totals, w.intervals, active, evicted_total)
        if delta[CounterId.RINGBUF_DROPS][0]:
            log.warning("ring buffer full: %d flow events lost in the kernel this interval on %s "
                        "(raise --ringbuf-pages)", delta[CounterId.RINGBUF_DROPS][0], w.name)

    # ---- interfaces ----
    def _attach(self, ifindex: int, name: str) -> AttachError | None:
        """Watch `name`: a slot of the counters (its starting point read before any packet can
        reach it), then the links. An interface that cannot be attached is skipped, logged once."""
        cfg = self.cfg
        try:
            slot = self.prog.add_iface(ifindex)  # AttachError when every slot is taken
            deltas = CounterDeltas(self.prog.read_counters(slot))
            start = self.clock.monotonic_ns()
            att = self.prog.attach(name, cfg.xdp_mode, cfg.egress, ifindex)
        except (AttachError, OSError) as e:  # OSError: it went away while being attached
            self.prog.remove_iface(ifindex)
            if isinstance(e, OSError):
                e = AttachError(f"cannot attach XDP to {name}: {e.strerror or e}")
            if ifindex not in self._skipped:
                log.error("not watching %s: %s", name, e)
                if self.metrics is not None:
                    self.metrics.interfaces.skipped += 1
            self._skipped[ifindex] = (name, isinstance(e, OccupiedError))
            return e
        self._skipped.pop(ifindex, None)
        self.watched[ifindex] = _Watched(name, att, deltas, start, [(0, 0)] * NR_COUNTERS)
        if self.metrics is not None:
            self.metrics.interfaces.attached += 1
        log.info("watching %s (ifindex %d, %d interfaces watched)", name, ifindex, len(self.watched))
        return None

    def _detach(self, ifindex: int, why: str) -> None:
        """Stop watching an interface: detach (no packet counted after), end its flows, emit its
        last partial interval, free its slot."""
        w = self.watched[ifindex]
        w.attachment.detach()
        now = self.clock.monotonic_ns()
        self.tracker.poll_events(0)
        self.tracker.end_iface(ifindex, now)
        self._emit_interval(ifindex, w, now, 0, final=True)
        w.attachment.release()
        del self.watched[ifindex]
        self.tracker.evicted_by_iface.pop(ifindex, None)
        if self.metrics is not None:
            self.metrics.snapshots.pop(w.name, None)
            self.metrics.interfaces.detached += 1
        log.info("stopped watching %s (%s): its flows ended, its last interval emitted", w.name, why)

    def _follow_interfaces(self) -> None:
        """Attach to every matching interface not watched yet, detach from every watched one
        that went away, was renamed or no longer matches."""
        links = current_links()
        want = self.cfg.selection.select(links)
        for ifindex, w in list(self.watched.items()):
            now_name = links.get(ifindex)
            if ifindex not in want or now_name != w.name:
                why = ("gone" if now_name is None else f"renamed {now_name}" if now_name != w.name
                       else "no longer matching")
                self._detach(ifindex, why)
        for ifindex in [i for i, (n, _) in self._skipped.items() if want.get(i) != n]:
            del self._skipped[ifindex]  # gone or renamed: a new one is tried afresh
        for ifindex, name in want.items():
            if ifindex in self.watched:
                continue
            skipped = self._skipped.get(ifindex)
            if skipped is not None:
                if not skipped[1]:
                    continue
                try:  # retry a foreign-occupied interface only once its XDP hook is free
                    if libbpf.xdp_query(ifindex).prog_id:
                        continue
                except OSError:
                    continue
            self._attach(ifindex, name)

    def _attach_at_start(self) -> None:
        """Attach to every interface the selection names now; at least one must take it."""
        errors = [e for e in (self._attach(i, n) for i, n in self.cfg.selection.select(current_links()).items()) if e]
        if not self.watched:
            raise errors[0] if errors else InterfaceError(
                f"no interface to watch matches {self.cfg.selection.describe()}; list interfaces with `ip link`")
        log.info("watching %d interface(s): %s%s", len(self.watched), ", ".join(w.name for w in self.watched.values()),
                 f"; {len(errors)} skipped" if errors else "")

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

    # How often, at most, link notifications are looked at.
    LINK_CHECK_S = 0.1

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
        self._rescan_ns = int(cfg.rescan_s * 1e9)
        start = self.clock.monotonic_ns()
        self._next_interval = start + self._interval_ns
        self._next_sweep = start + self._sweep_ns
        self._next_protect = start + int(self.NEVER_BLOCK_REFRESH_S * 1e9)
        self._next_rescan = start + self._rescan_ns
        self._next_link_check = start

    def step(self) -> None:
        """One turn: wait for ring-buffer records (until the next deadline, at most 100 ms),
        serve Kafka delivery reports, sweep and emit the interval when they are due."""
        clock = self.clock
        now = clock.monotonic_ns()
        wait_ms = max(0, min(self._next_interval, self._next_sweep, now + 100_000_000) - now) // 1_000_000
        self.tracker.poll_events(max(1, wait_ms))
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
        if self._links is not None and now >= self._next_link_check:
            # Link notifications at most every LINK_CHECK_S (a busy loop turns often).
            self._next_link_check = now + int(self.LINK_CHECK_S * 1e9)
            if self._links.pending() or now >= self._next_rescan:
                self._follow_interfaces()
                now = clock.monotonic_ns()
                self._next_rescan = now + self._rescan_ns
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
        """Watch the interfaces `cfg.selection` names until `stop` is set; returns what was
        counted and delivered."""
        try:
            return self._loop(stop)
        finally:
            self.close()

    def close(self) -> None:
        for w in self.watched.values():
            w.attachment.detach()
        if self._links is not None:
            self._links.close()
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
        self._links = LinkEvents()  # before the first listing: no link change falls in between
        try:
            self._attach_at_start()
            while not stop.is_set():
                self.step()
        finally:
            for w in self.watched.values():
                w.attachment.detach()
        now = clock.monotonic_ns()
        self.tracker.poll_events(0)
        self.tracker.shutdown(now)
        self.tracker.close()
        if self.enforcer is not None:
            self.enforcer.close()
        self._export_interval(now, final=True)
        for w in self.watched.values():
            w.attachment.release()
        self.summary.delivery = self.exporter.close(cfg.flush_timeout_s)
        return self.summary
