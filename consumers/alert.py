"""`xdpwatch alert`: detection rules over ssh-flows and packet-counts.

Rules are pure and run on event time (the events' own timestamps), never the wall clock,
so replaying archived events raises the same alerts, with the same ids, as live traffic did.
Settings come from a TOML rules file (see DEFAULT_RULES and the README); every key is optional.

Every message is an adversary's: the rules that can lead to a block (ssh_bruteforce, ssh_scan,
ssh_auth_failures) count only connections whose client completed the TCP handshake, which a
spoofed source cannot do; ssh_syn_flood counts raw SYNs and says its source is unverified. The
state is bounded by design: windows keep (time, event id, destination) per event and no more
events than their rule needs; the sources tracked, the cooldowns and the traffic baselines are
capped (`[limits]`), and what a cap drops is counted (`Detector.evicted`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import itertools
import math
import logging
import sys
import time
import tomllib
from dataclasses import dataclass, fields
from typing import Callable

from xdpwatch import schemas
from xdpwatch.consumers.base import crash_point
from xdpwatch.consumers.errors import ConsumerError
from xdpwatch.schemas import format_time, parse_time

log = logging.getLogger(__name__)

DEFAULT_RULES = """\
# xdpwatch alert rules. Durations in seconds. Remove a section or set enabled = false to turn a rule off.
# ssh_bruteforce, ssh_scan and ssh_auth_failures count only connections whose client completed
# the TCP handshake (flow_established, tcp.handshake = complete): a spoofed source never does.

[ssh_bruteforce]          # many new SSH connections from one source
enabled = true
threshold = 10            # flow_established events (completed handshakes) from one source IP ...
window = 60               # ... within this many seconds
cooldown = 300            # then at most one alert per source per cooldown

[ssh_auth_failures]       # many failed logins from one source, as guessed per flow (ssh.auth)
enabled = true
threshold = 5             # refused authentication attempts (ssh.auth.failures on flow_end, handshake complete) ...
window = 60               # ... within this many seconds
cooldown = 300

[ssh_scan]                # one source reaching many SSH servers
enabled = true
threshold = 5             # distinct destination IPs of flow_established events ...
window = 60
cooldown = 300

[ssh_syn_flood]           # many SSH connection attempts claiming one source: unverified, may be spoofed
enabled = true
threshold = 20            # flow_start events (raw SYNs; not those first seen from the server side) ...
window = 10               # ... within this many seconds
cooldown = 300

[traffic_spike]           # packets per second far above the moving baseline
enabled = true
factor = 4.0              # alert when rate > mean + factor * deviation ...
min_rate = 100.0          # ... and rate >= this many packets/s
alpha = 0.1               # EWMA weight of each new interval
warmup = 20               # intervals before the baseline is trusted
cooldown = 60
history = 600             # after a restart or rebalance, the baseline is rebuilt from this many seconds of counts

[kernel_drops]            # the kernel lost flow events (ring buffer full)
enabled = true
cooldown = 60

[limits]                  # memory bounds: an attack must not grow the consumer's state
max_sources = 100000      # sources tracked by the window rules; beyond, the least recently active is dropped
max_observers = 10000     # traffic baselines (hostname/interface); beyond, the least recently reporting is dropped
"""


@dataclass(frozen=True)
class WindowRule:
    """At least `threshold` of something from one source within `window` seconds."""

    enabled: bool = True
    threshold: int = 10
    window: float = 60.0
    cooldown: float = 300.0


@dataclass(frozen=True)
class SpikeConfig:
    enabled: bool = True
    factor: float = 4.0
    min_rate: float = 100.0
    alpha: float = 0.1
    warmup: int = 20
    cooldown: float = 60.0
    history: float = 600.0  # seconds of packet counts replayed to rebuild the baseline after a restart


@dataclass(frozen=True)
class DropsConfig:
    enabled: bool = True
    cooldown: float = 60.0


@dataclass(frozen=True)
class Limits:
    """Caps on the detector's state. Live cooldowns are capped at `max_sources` as well."""

    max_sources: int = 100_000
    max_observers: int = 10_000


@dataclass(frozen=True)
class Rules:
    ssh_bruteforce: WindowRule = WindowRule(threshold=10)
    ssh_auth_failures: WindowRule = WindowRule(threshold=5)
    ssh_scan: WindowRule = WindowRule(threshold=5)
    ssh_syn_flood: WindowRule = WindowRule(threshold=20, window=10.0)
    traffic_spike: SpikeConfig = SpikeConfig()
    kernel_drops: DropsConfig = DropsConfig()
    limits: Limits = Limits()


def load_rules(text: str, origin: str = "rules file") -> Rules:
    """Parse a TOML rules file; unknown sections or keys and wrong types are errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConsumerError(f"{origin}: not valid TOML: {e}") from None
    out = {}
    for f in fields(Rules):
        section = data.pop(f.name, {})
        if not isinstance(section, dict):
            raise ConsumerError(f"{origin}: {f.name} must be a section ([{f.name}])")
        known = {x.name: x.type for x in fields(f.default)}
        for k, v in section.items():
            if k not in known:
                raise ConsumerError(f"{origin}: [{f.name}] has no setting {k!r} (known: {', '.join(known)})")
            want = {"bool": bool, "int": int, "float": (int, float)}[known[k]]
            if not isinstance(v, want) or (known[k] != "bool" and (isinstance(v, bool) or not v >= 0)):  # NaN too
                raise ConsumerError(f"{origin}: [{f.name}] {k} must be a non-negative {known[k]}, got {v!r}")
            if f.name == "limits" and v < 1:
                raise ConsumerError(f"{origin}: [limits] {k} must be at least 1, got {v!r}")
        out[f.name] = dataclasses.replace(f.default, **section)
    if data:
        raise ConsumerError(f"{origin}: unknown section(s) {', '.join(data)} (known: {', '.join(x.name for x in fields(Rules))})")
    return Rules(**out)


def alert_id(rule: str, subject: str, first_event_id: str) -> str:
    return hashlib.sha256(f"{rule}|{subject}|{first_event_id}".encode()).hexdigest()[:32]


TECHNIQUES = {
    "ssh_bruteforce": {"id": "T1110", "name": "Brute Force"},
    "ssh_auth_failures": {"id": "T1110", "name": "Brute Force"},
    "ssh_scan": {"id": "T1046", "name": "Network Service Discovery"},
    "ssh_syn_flood": {"id": "T1499.001", "name": "Endpoint Denial of Service: OS Exhaustion Flood"},
}
DESCRIPTIONS = {
    "ssh_bruteforce": "Many SSH connections with a completed TCP handshake from one source in a short window",
    "ssh_auth_failures": "Many refused SSH logins from one source in a short window (guessed from packet sizes, "
                         "handshake-verified connections only)",
    "ssh_scan": "One source completing SSH handshakes with many servers in a short window",
    "ssh_syn_flood": "Many SSH connection attempts (SYNs) claiming one source in a short window; the source is "
                     "unverified and may be spoofed, so this rule never blocks",
    "traffic_spike": "Packet rate far above the interface's moving baseline",
    "kernel_drops": "The kernel lost flow events: the ring buffer was full",
}
SEVERITY = {"ssh_bruteforce": 70, "ssh_auth_failures": 75, "ssh_scan": 60, "ssh_syn_flood": 50,
            "traffic_spike": 50, "kernel_drops": 40}


def make_alert(rule: str, subject: str, message: str, first: tuple, last: tuple, count: float, window: float,
               observer: dict, source_ip: str | None = None, at: float | None = None, **extra) -> dict:
    """An alert document. `first`, `last`: (event time, event id, ...) of the oldest and the
    newest event of the evidence, as the detector's state holds them; `at`: the event time of
    the event that completed it (its @timestamp; `last`'s unless that event came late)."""
    alert = {
        "@timestamp": format_time(last[0] if at is None else at),
        "event": {"id": alert_id(rule, subject, first[1]), "kind": "alert", "module": "xdpwatch",
                  "dataset": "xdpwatch.alerts", "severity": SEVERITY[rule],
                  "category": ["intrusion_detection", "network"]},
        "rule": {"name": rule, "description": DESCRIPTIONS[rule]},
        "message": message,
        "observer": observer,
        "xdpwatch": {"evidence": {"count": count, "window_s": window, "first_seen": format_time(first[0]),
                                  "last_seen": format_time(last[0]), "first_event_id": first[1],
                                  "last_event_id": last[1], **extra}},
    }
    if source_ip is not None:
        alert["source"] = {"ip": source_ip}
    if rule in TECHNIQUES:
        alert["threat"] = {"framework": "MITRE ATT&CK", "technique": TECHNIQUES[rule]}
    return alert


# Windows: lists of entries (event time, event id, value) sorted by time, oldest first, holding
# no more than "at least `threshold` within `window`" needs. Late events are placed by time.
def _insert(q: list, entry: tuple) -> None:
    if q and entry[0] < q[-1][0]:
        bisect.insort(q, entry)
    else:
        q.append(entry)


def _expire(q: list, window: float) -> None:
    """Drop entries `window` seconds or more older than the newest (which always stays)."""
    horizon = q[-1][0] - window
    n, last = 0, len(q) - 1
    while n < last and q[n][0] <= horizon:
        n += 1
    if n:
        del q[:n]


def _count(q: list, entry: tuple, window: float, cap: int) -> None:
    """Events counted: the newest `cap` (= threshold) within the window are all the rule needs."""
    _insert(q, entry)
    _expire(q, window)
    if len(q) > cap:
        del q[:len(q) - cap]


def _distinct(q: list, entry: tuple, window: float, cap: int) -> None:
    """Distinct values (destinations), each with its newest event: the newest `cap` of them."""
    for i, old in enumerate(q):
        if old[2] == entry[2]:
            if old[0] > entry[0]:
                return  # a late event of a destination seen since
            del q[i]
            break
    _count(q, entry, window, cap)


def _summed(q: list, entry: tuple, window: float, threshold: int) -> int:
    """Amounts (refused logins) summed: the oldest entry goes once the newer ones alone reach
    the threshold. Returns the sum of what is kept."""
    _insert(q, entry)
    _expire(q, window)
    total = sum(e[2] for e in q)
    while len(q) > 1 and total - q[0][2] >= threshold:
        total -= q.pop(0)[2]
    return total


class _Source:
    """What the window rules keep about one source IP."""

    __slots__ = ("last", "brute", "scan", "fails", "syn")

    def __init__(self) -> None:
        self.last = -math.inf  # newest event time seen
        self.brute: list = []  # (time, event id, destination) of flow_established
        self.scan: list = []   # the same, one per destination
        self.fails: list = []  # (time, event id, refused logins) of flow_end
        self.syn: list = []    # (time, event id, destination) of flow_start


_COUNTED_HANDSHAKES = (None, "complete")  # on flow_established: absent (older producers) or complete


class Raised:
    """The alerts raised, as the cooldowns need them: per (rule, subject), the event times of
    its recent alerts (`times`); and the alerts already in the alerts topic, read back at a
    rebuild (`published`: id -> event time), which count in `times` too. A detector raises
    an alert already published again exactly where it was raised (same id, same event time),
    to hand it on, and publishes it only once."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str], list[float]] = {}
        self.published: dict[str, float] = {}

    def add_published(self, alert: dict) -> None:
        t = parse_time(alert["@timestamp"])
        self.published[alert["event"]["id"]] = t
        times = self.times.setdefault((alert["rule"]["name"], _subject(alert)), [])
        if t not in times:
            bisect.insort(times, t)


class SourcePool:
    """The cap on sources tracked by every Detector that shares it (one per partition), and
    what the caps dropped: `evicted` sources, observers (traffic baselines) and cooldowns."""

    def __init__(self, max_sources: int):
        self.max_sources, self.tracked = max_sources, 0
        self.evicted = {"sources": 0, "observers": 0, "cooldowns": 0}


class Detector:
    """All rules over one stream of events (a partition: its events' sources and observers
    are nobody else's); feed it events in order (`on_event`), it calls `emit(alert)` for each
    alert.

    Cooldowns: a rule raises at most one alert per subject within `cooldown` seconds of event
    time, before or after (late events included): `raised.times` keeps, per (rule, subject),
    the event times of its recent alerts, whether raised here or read back from the alerts
    topic, so a rebuilt detector is quiet exactly where an uninterrupted one was.

    State, all bounded: `sources` (source IP -> _Source, least recently active first; every
    detector sharing `pool` tracks at most `limits.max_sources` in all), `raised` (expired
    entries pruned, at most `limits.max_sources` keys; may be shared by the detectors of one
    consumer, subjects being partition-disjoint), `baselines` (observer -> traffic EWMA, at
    most `limits.max_observers`), and `pool.evicted`: how many sources, observers and live
    cooldowns the caps dropped.
    """

    def __init__(self, rules: Rules, emit: Callable[[dict], None], raised: Raised | None = None,
                 pool: SourcePool | None = None):
        self.rules, self.emit = rules, emit
        self.sources: collections.OrderedDict[str, _Source] = collections.OrderedDict()
        self.raised = raised or Raised()
        self.baselines: collections.OrderedDict[str, tuple[float, float, int]] = collections.OrderedDict()
        self.pool = pool or SourcePool(rules.limits.max_sources)
        self.evicted = self.pool.evicted
        self._idle = max(r.window for r in (rules.ssh_bruteforce, rules.ssh_scan, rules.ssh_auth_failures,
                                            rules.ssh_syn_flood))
        self._sweep_at = 1024  # raised: prune expired keys whenever the map doubled
        self._cooldown = {"ssh_bruteforce": rules.ssh_bruteforce.cooldown, "ssh_scan": rules.ssh_scan.cooldown,
                          "ssh_auth_failures": rules.ssh_auth_failures.cooldown,
                          "ssh_syn_flood": rules.ssh_syn_flood.cooldown, "traffic_spike": rules.traffic_spike.cooldown,
                          "kernel_drops": rules.kernel_drops.cooldown}
        self._emitting = self._cooling = True

    def on_event(self, stream: str, doc: dict, emit: bool = True, cooldowns: bool = True) -> None:
        """Feed one schema-valid event. With `emit=False` no alert goes out but the windows
        and baselines move exactly as live: to rebuild state after a restart. `cooldowns`
        says whether the alerts that would have been raised count in the cooldowns then (when
        the alerts actually published cannot be read back instead)."""
        self._emitting, self._cooling = emit, cooldowns or emit
        if stream == "ssh-flows":
            action, handshake = doc["event"]["action"], doc["tcp"].get("handshake")
            if action == "flow_established" and handshake in _COUNTED_HANDSHAKES:
                self._on_established(doc)
            elif action == "flow_start" and handshake != "none":
                self._on_syn(doc)
            elif action == "flow_end" and handshake == "complete":
                self._on_flow_end(doc)
        elif stream == "packet-counts":
            self._on_counts(doc)

    # --- state -------------------------------------------------------------------------
    def _source(self, src: str, t: float) -> _Source:
        """The state of `src`, now the most recently active. Sources silent for the longest
        window are forgotten (nothing of theirs is in any window); beyond the cap, the least
        recently active one is dropped and counted."""
        sources = self.sources
        s = sources.get(src)
        if s is None:
            s = sources[src] = _Source()
            pool = self.pool
            pool.tracked += 1
            if pool.tracked > pool.max_sources and len(sources) > 1:
                sources.popitem(last=False)
                pool.tracked -= 1
                pool.evicted["sources"] += 1
        else:
            sources.move_to_end(src)
        if t > s.last:
            s.last = t
        horizon = t - self._idle
        while (oldest := next(iter(sources.values()))).last <= horizon and oldest is not s:
            sources.popitem(last=False)
            self.pool.tracked -= 1
        return s

    def forget(self) -> None:
        """Give this detector's sources back to the pool (its partition went elsewhere)."""
        self.pool.tracked -= len(self.sources)
        self.sources.clear()

    def _may_alert(self, rule: str, subject: str, t: float, cooldown: float, first_id: str) -> bool:
        """True (and the raise counts in the cooldowns) unless `rule` is quiet for `subject` at
        event time t: within `cooldown` of one of its alerts (raised here or published). An
        alert already published is raised again where it was raised (its id, from `first_id`,
        the oldest event of its evidence, and its event time say so): it is not published
        twice, but handed on (its block may not have been sent). Always False while
        rebuilding; the raise then counts only if on_event said so."""
        if not self._cooling:
            return False
        key = (rule, subject)
        raised = self.raised.times
        times = raised.get(key)
        published = self.raised.published
        if times and not (published and published.get(alert_id(rule, subject, first_id)) == t):
            if any(abs(t - f) < cooldown for f in times):
                return False
        if times is None:
            times = raised[key] = []
        if t not in times:
            times.append(t)
            times.sort()
            while len(times) > 1 and times[0] < times[-1] - 2 * cooldown:  # too old to quiet anything
                times.pop(0)
        if len(raised) > self._sweep_at:
            self._prune_raised(t)
        return self._emitting

    def _prune_raised(self, t: float) -> None:
        """Forget the raises whose cooldowns are over at event time t; beyond the cap, drop
        (and count) the oldest keys. Runs when the map doubled since the last time: O(1) per
        alert."""
        cooldown, raised = self._cooldown, self.raised.times
        for key in [k for k, times in raised.items() if times[-1] + cooldown.get(k[0], 0) <= t]:
            del raised[key]
        over = len(raised) - self.pool.max_sources
        if over > 0:
            for key in list(itertools.islice(raised, over)):
                del raised[key]
            self.evicted["cooldowns"] += over
        self._sweep_at = 2 * len(raised) + 1024

    # --- rules -------------------------------------------------------------------------
    def _on_established(self, doc: dict) -> None:
        src, t, eid = doc["source"]["ip"], parse_time(doc["@timestamp"]), doc["event"]["id"]
        entry = (t, eid, sys.intern(doc["destination"]["ip"]))
        brute, scan = self.rules.ssh_bruteforce, self.rules.ssh_scan
        if not (brute.enabled or scan.enabled):
            return
        s = self._source(src, t)
        if brute.enabled:
            q = s.brute
            _count(q, entry, brute.window, max(brute.threshold, 1))
            if len(q) >= brute.threshold and self._may_alert("ssh_bruteforce", src, t, brute.cooldown, q[0][1]):
                self.emit(make_alert("ssh_bruteforce", src,
                                     f"{len(q)} SSH connections with a completed handshake from {src} "
                                     f"within {brute.window:g}s", q[0], q[-1], len(q), brute.window,
                                     doc["observer"], src, at=t, destinations=sorted({e[2] for e in q})))
        if scan.enabled:
            q = s.scan
            _distinct(q, entry, scan.window, max(scan.threshold, 1))
            if len(q) >= scan.threshold and self._may_alert("ssh_scan", src, t, scan.cooldown, q[0][1]):
                self.emit(make_alert("ssh_scan", src, f"{src} completed SSH handshakes with {len(q)} servers "
                                     f"within {scan.window:g}s", q[0], q[-1], len(q), scan.window,
                                     doc["observer"], src, at=t, destinations=sorted(e[2] for e in q)))

    def _on_syn(self, doc: dict) -> None:
        r = self.rules.ssh_syn_flood
        if not r.enabled:
            return
        src, t = doc["source"]["ip"], parse_time(doc["@timestamp"])
        q = self._source(src, t).syn
        _count(q, (t, doc["event"]["id"], sys.intern(doc["destination"]["ip"])), r.window, max(r.threshold, 1))
        if len(q) >= r.threshold and self._may_alert("ssh_syn_flood", src, t, r.cooldown, q[0][1]):
            self.emit(make_alert("ssh_syn_flood", src,
                                 f"{len(q)} SSH connection attempts claiming source {src} within {r.window:g}s "
                                 "(unverified: no completed handshake is needed, the address may be spoofed)",
                                 q[0], q[-1], len(q), r.window, doc["observer"], src, at=t,
                                 destinations=sorted({e[2] for e in q})))

    def _on_flow_end(self, doc: dict) -> None:
        """The brute-force variant that counts refused logins (ssh.auth.failures, guessed
        by the producer) rather than connections: it also sees many passwords tried over
        few connections, and ignores many successful ones. Each flow's count is one addition."""
        r = self.rules.ssh_auth_failures
        failures = int(doc.get("ssh", {}).get("auth", {}).get("failures", 0))
        if not r.enabled or failures <= 0:
            return
        src, t = doc["source"]["ip"], parse_time(doc["@timestamp"])
        q = self._source(src, t).fails
        total = _summed(q, (t, doc["event"]["id"], failures), r.window, r.threshold)
        if total >= r.threshold and self._may_alert("ssh_auth_failures", src, t, r.cooldown, q[0][1]):
            self.emit(make_alert("ssh_auth_failures", src, f"{total} refused SSH logins from {src} within "
                                 f"{r.window:g}s", q[0], q[-1], total, r.window, doc["observer"], src, at=t))

    def _on_counts(self, doc: dict) -> None:
        t, eid = parse_time(doc["@timestamp"]), doc["event"]["id"]
        obs = f"{doc['observer']['hostname']}/{doc['observer']['ingress']['interface']['name']}"
        d = self.rules.kernel_drops
        drops = doc["drops"]["ringbuf"]
        if d.enabled and drops > 0 and self._may_alert("kernel_drops", obs, t, d.cooldown, eid):
            self.emit(make_alert("kernel_drops", obs, f"{drops} flow events lost in the kernel on {obs} "
                                 "(ring buffer full; raise --ringbuf-pages)", (t, eid), (t, eid), drops, 0,
                                 doc["observer"]))
        s = self.rules.traffic_spike
        secs = doc["interval"]["duration_ms"] / 1000
        if not s.enabled or secs <= 0:
            return
        rate = doc["packets"]["total"] / secs
        baselines = self.baselines
        mean, var, n = baselines.pop(obs, None) or (rate, 0.0, 0)
        baselines[obs] = (mean, var, n)  # the most recently reporting observer last
        if len(baselines) > self.rules.limits.max_observers:
            baselines.popitem(last=False)
            self.evicted["observers"] += 1
        dev = math.sqrt(var)
        if n >= s.warmup and rate >= s.min_rate and rate > mean + s.factor * dev:
            if self._may_alert("traffic_spike", obs, t, s.cooldown, eid):
                self.emit(make_alert("traffic_spike", obs,
                                     f"{rate:.0f} packets/s on {obs}, baseline {mean:.0f} ± {dev:.0f}",
                                     (t, eid), (t, eid), round(rate, 3), secs, doc["observer"],
                                     baseline_mean=round(mean, 3), baseline_dev=round(dev, 3)))
            return  # a spike does not move the baseline it is judged against
        # Exponentially weighted mean and variance (West 1979 / Finch 2009).
        diff = rate - mean
        incr = s.alpha * diff
        baselines[obs] = (mean + incr, (1 - s.alpha) * (var + diff * incr), n + 1)


class AlertSink:
    """Where alerts go: a Kafka topic (each acknowledged before the offset is stored),
    stdout, or a file (fsynced). One JSON object per alert."""

    def __init__(self, output: str, kafka_conf: dict, topic: str):
        self.count = 0
        self._kafka = self._file = None
        if output == "kafka":
            from xdpwatch.kafka.admin import ensure_topics
            from xdpwatch.kafka.produce import AckedProducer

            ensure_topics(kafka_conf, [topic])
            self._kafka = AckedProducer(kafka_conf, topic, "an alert")
        elif output == "stdout":
            import sys

            self._file, self._fsync = sys.stdout.buffer, False
        else:
            from xdpwatch.consumers.base import append_private

            self._file, self._fsync = append_private(output, "alert output"), True

    def put(self, alert: dict) -> None:
        import os

        import orjson

        data = orjson.dumps(alert)
        if self._kafka is not None:
            self._kafka.send(data, schemas.key_of("alerts", alert), schemas.headers("alerts"))
        else:
            self._file.write(data + b"\n")
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        self.count += 1

    def close(self) -> None:
        if self._kafka is not None:
            self._kafka.close()
        elif self._fsync:
            self._file.close()


class AlertHandler:
    """The alert consumer's handler: one Detector per assigned partition (a partition's
    sources and observers are its own: SSH flows are keyed by client IP, packet counts by
    observer), alerts to `sink`, and each alert handed on to `on_alert` (e.g.
    consumers.control.BlockOnAlert) once published.

    Exactly once across restarts, kills and rebalances (with `history`, an xdpwatch.kafka.read.Reader):
    when the group gives it a partition that has a committed offset C, it first rebuilds that
    partition's state as the last owner had it, by feeding the events of the longest window
    (and the baseline's history) before C to a fresh detector without alerting; then reads
    back the tail of the alerts topic: every alert already published is not published again
    (its event.id is deterministic), and the cooldowns start when those alerts were raised.
    `on_alert` reads back the control topic the same way (`remember`). Without a Kafka sink
    (stdout, a file) the cooldowns are rebuilt from the replayed events instead, and delivery
    is at least once: deduplicate on event.id.
    """

    def __init__(self, rules: Rules, sink: AlertSink, on_alert: Callable[[dict], None] | None = None,
                 history=None, alerts_topic: str | None = None, control_topic: str | None = None,
                 from_beginning: bool = True):
        self.rules, self.sink, self.on_alert, self.from_beginning = rules, sink, on_alert, from_beginning
        self.history, self.alerts_topic, self.control_topic = history, alerts_topic, control_topic
        self.pool = SourcePool(rules.limits.max_sources)
        self.raised = Raised()  # the detectors' shared cooldowns, and what the alerts topic held at the last rebuild
        self._detectors: dict[tuple[str, int], Detector] = {}
        self.stats = {"rebuilds": 0, "rebuild_seconds": 0.0, "events_reread": 0, "alerts_suppressed": 0}
        # How far back a rebuild reads: every window, the baseline's history, every cooldown.
        windows = (rules.ssh_bruteforce, rules.ssh_scan, rules.ssh_auth_failures, rules.ssh_syn_flood)
        self.horizon_events = max(*(r.window for r in windows), rules.traffic_spike.history)
        self.horizon_alerts = max(*(r.cooldown for r in windows), rules.traffic_spike.cooldown,
                                  rules.kernel_drops.cooldown)

    @property
    def evicted(self) -> dict:
        return self.pool.evicted

    def _detector(self, topic: str, partition: int) -> Detector:
        d = self._detectors.get((topic, partition))
        if d is None:
            d = self._detectors[(topic, partition)] = Detector(self.rules, self._emit, self.raised, self.pool)
        return d

    # --- publishing ----------------------------------------------------------------------
    def publish(self, alert: dict) -> bool:
        """Put `alert` on the sink unless it is already there (read back at the last
        rebuild); True if it was put."""
        if alert["event"]["id"] in self.raised.published:
            self.stats["alerts_suppressed"] += 1
            log.info("alert %s (%s) is already published: not again", alert["event"]["id"], alert["rule"]["name"])
            return False
        self.sink.put(alert)
        crash_point("alert-published")
        return True

    def _emit(self, alert: dict) -> None:
        self.publish(alert)
        if self.on_alert is not None:
            self.on_alert(alert)  # also for an alert published before a crash: its block may not be

    def handle(self, ev) -> None:
        self._detector(ev.topic, ev.partition).on_event(ev.stream, ev.doc)

    # --- rebalances (consumers.base.run_loop) ----------------------------------------------
    def on_assign(self, consumer, partitions: list) -> None:
        """Fresh state for each partition given to us, rebuilt from before its committed offset."""
        started = time.monotonic()
        plan, from_start = [], False
        for tp in consumer.committed(partitions, timeout=15):
            old = self._detectors.pop((tp.topic, tp.partition), None)
            if old is not None:
                old.forget()
            self._detector(tp.topic, tp.partition)
            if tp.offset > 0:
                plan.append((tp.topic, tp.partition, tp.offset))
            else:  # never committed: read again from the reset position
                from_start |= self.from_beginning
        if self.history is None:
            return
        reread = self._rebuild(plan, from_start)
        self.stats["rebuilds"] += 1
        self.stats["events_reread"] += reread
        self.stats["rebuild_seconds"] = round(time.monotonic() - started, 3)
        log.info("rebuilt the state of %s from %d events before the committed offsets, and read back %d alerts "
                 "already published (%.1fs)", ", ".join(f"{t}[{p}]@{c}" for t, p, c in plan) or "no partition",
                 reread, len(self.raised.published), self.stats["rebuild_seconds"])

    def on_revoke(self, partitions: list) -> None:
        for tp in partitions:
            d = self._detectors.pop((tp.topic, tp.partition), None)
            if d is not None:
                d.forget()

    def _rebuild(self, plan: list[tuple[str, int, int]], from_start: bool) -> int:
        """Feed each partition's events before its committed offset C to its detector, from
        the longest horizon before the last one handled (C - 1); then the alerts and control
        tails, from the horizon before the earliest of those (the whole alerts topic when a
        partition is read again from its beginning: any alert may come again). Returns how
        many events were fed."""
        from xdpwatch.consumers.base import decode
        from xdpwatch.kafka.read import MARGIN_S

        h = self.history
        readback = self.alerts_topic is not None
        anchors: dict[tuple[str, int], float] = {}
        ranges = []
        for topic, partition, committed in plan:
            last = h.message_at(topic, partition, committed - 1)
            if last is None:  # gone by retention: nothing before it either
                continue
            ev, _ = decode(last)
            t = last.timestamp()[1] / 1000
            if ev is not None and "@timestamp" in ev.doc:
                t = min(t, parse_time(ev.doc["@timestamp"]))
            anchors[(topic, partition)] = t
            ranges.append((topic, partition, h.start(topic, partition, t - self.horizon_events - MARGIN_S), committed))
        fed = 0
        for m in h.read(ranges):
            ev, _ = decode(m)  # what is invalid now was dead-lettered then
            if ev is None or parse_time(ev.doc["@timestamp"]) < anchors[(m.topic(), m.partition())] - self.horizon_events:
                continue
            self._detectors[(m.topic(), m.partition())].on_event(ev.stream, ev.doc, emit=False, cooldowns=not readback)
            fed += 1
        since = 0.0 if from_start else min(anchors.values(), default=time.time()) - self.horizon_alerts - MARGIN_S
        budget_alerts = self._read_alerts(since) if readback else []
        blocker = self.on_alert
        if self.control_topic is not None and hasattr(blocker, "remember"):
            horizon = min(since, time.time() - blocker.ttl_s - MARGIN_S)
            commands = (d for m in h.tail(self.control_topic, horizon) if (d := _valid(m, "control")) is not None)
            blocker.remember(commands, budget_alerts)
        return fed

    def _read_alerts(self, since: float) -> list[float]:
        """The alerts published since `since` (event time or publication): not published
        again, and quiet for a cooldown after each. Returns when the block_budget_exhausted
        ones among them were published."""
        self.raised.published.clear()
        budget_alerts = []
        for m in self.history.tail(self.alerts_topic, since):
            alert = _valid(m, "alerts")
            if alert is None:
                continue
            t, sent = parse_time(alert["@timestamp"]), m.timestamp()[1] / 1000
            if t < since and sent < since:
                continue
            if alert["rule"]["name"] == "block_budget_exhausted":
                budget_alerts.append(sent)
            self.raised.add_published(alert)
        return budget_alerts

    def close(self) -> None:
        self.sink.close()
        if self.history is not None:
            self.history.close()


def _subject(alert: dict) -> str:
    """Who an alert is about, as the detector keys its cooldown: the source IP, or for the
    interface rules the observer (hostname/interface)."""
    if "source" in alert:
        return alert["source"]["ip"]
    obs = alert.get("observer", {})
    return f"{obs.get('hostname')}/{obs.get('ingress', {}).get('interface', {}).get('name')}"


def _valid(m, stream: str) -> dict | None:
    """A message read back, decoded and schema-valid, or None."""
    import orjson

    value = m.value()
    if value is None:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return doc if schemas.is_valid(stream, doc) else None
