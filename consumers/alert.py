"""`xdpwatch alert`: detection rules over ssh-flows and packet-counts.

Rules are pure and run on event time (the events' own timestamps), never the wall clock,
so replaying archived events raises the same alerts, with the same ids, as live traffic did.
Settings come from a TOML rules file (see DEFAULT_RULES and the README); every key is optional.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import math
import tomllib
from dataclasses import dataclass, fields
from typing import Callable

from .. import schemas
from .errors import ConsumerError

DEFAULT_RULES = """\
# xdpwatch alert rules. Durations in seconds. Remove a section or set enabled = false to turn a rule off.

[ssh_bruteforce]          # many new SSH connections from one source
enabled = true
threshold = 10            # flow_start events from one source IP ...
window = 60               # ... within this many seconds
cooldown = 300            # then at most one alert per source per cooldown

[ssh_auth_failures]       # many failed logins from one source, as guessed per flow (ssh.auth)
enabled = true
threshold = 5             # refused authentication attempts (ssh.auth.failures on flow_end) ...
window = 60               # ... within this many seconds
cooldown = 300

[ssh_scan]                # one source reaching many SSH servers
enabled = true
threshold = 5             # distinct destination IPs on SSH ports ...
window = 60
cooldown = 300

[traffic_spike]           # packets per second far above the moving baseline
enabled = true
factor = 4.0              # alert when rate > mean + factor * deviation ...
min_rate = 100.0          # ... and rate >= this many packets/s
alpha = 0.1               # EWMA weight of each new interval
warmup = 20               # intervals before the baseline is trusted
cooldown = 60

[kernel_drops]            # the kernel lost flow events (ring buffer full)
enabled = true
cooldown = 60
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


@dataclass(frozen=True)
class DropsConfig:
    enabled: bool = True
    cooldown: float = 60.0


@dataclass(frozen=True)
class Rules:
    ssh_bruteforce: WindowRule = WindowRule(threshold=10)
    ssh_auth_failures: WindowRule = WindowRule(threshold=5)
    ssh_scan: WindowRule = WindowRule(threshold=5)
    traffic_spike: SpikeConfig = SpikeConfig()
    kernel_drops: DropsConfig = DropsConfig()


def load_rules(text: str, origin: str = "rules file") -> Rules:
    """Parse a TOML rules file; unknown sections or keys and wrong types are errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConsumerError(f"{origin}: not valid TOML: {e}") from None
    out = {}
    for f in fields(Rules):
        section = data.pop(f.name, {})
        known = {x.name: x.type for x in fields(f.default)}
        for k, v in section.items():
            if k not in known:
                raise ConsumerError(f"{origin}: [{f.name}] has no setting {k!r} (known: {', '.join(known)})")
            want = {"bool": bool, "int": int, "float": (int, float)}[known[k]]
            if not isinstance(v, want) or (known[k] != "bool" and (isinstance(v, bool) or v < 0)):
                raise ConsumerError(f"{origin}: [{f.name}] {k} must be a non-negative {known[k]}, got {v!r}")
        out[f.name] = dataclasses.replace(f.default, **section)
    if data:
        raise ConsumerError(f"{origin}: unknown section(s) {', '.join(data)} (known: {', '.join(x.name for x in fields(Rules))})")
    return Rules(**out)


parse_time = schemas.timestamp_s


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def alert_id(rule: str, subject: str, first_event_id: str) -> str:
    return hashlib.sha256(f"{rule}|{subject}|{first_event_id}".encode()).hexdigest()[:32]


TECHNIQUES = {
    "ssh_bruteforce": {"id": "T1110", "name": "Brute Force"},
    "ssh_auth_failures": {"id": "T1110", "name": "Brute Force"},
    "ssh_scan": {"id": "T1046", "name": "Network Service Discovery"},
}
DESCRIPTIONS = {
    "ssh_bruteforce": "Many new SSH connections from one source in a short window",
    "ssh_auth_failures": "Many refused SSH logins from one source in a short window (guessed from packet sizes)",
    "ssh_scan": "One source reaching many SSH servers in a short window",
    "traffic_spike": "Packet rate far above the interface's moving baseline",
    "kernel_drops": "The kernel lost flow events: the ring buffer was full",
}
SEVERITY = {"ssh_bruteforce": 70, "ssh_auth_failures": 75, "ssh_scan": 60, "traffic_spike": 50, "kernel_drops": 40}


def make_alert(rule: str, subject: str, message: str, first: dict, last: dict, count: float,
               window: float, source_ip: str | None = None, **extra) -> dict:
    alert = {
        "@timestamp": last["@timestamp"],
        "event": {"id": alert_id(rule, subject, first["event"]["id"]), "kind": "alert", "module": "xdpwatch",
                  "dataset": "xdpwatch.alerts", "severity": SEVERITY[rule],
                  "category": ["intrusion_detection", "network"]},
        "rule": {"name": rule, "description": DESCRIPTIONS[rule]},
        "message": message,
        "observer": last.get("observer", {}),
        "xdpwatch": {"evidence": {"count": count, "window_s": window, "first_seen": first["@timestamp"],
                                  "last_seen": last["@timestamp"], "first_event_id": first["event"]["id"],
                                  "last_event_id": last["event"]["id"], **extra}},
    }
    if source_ip is not None:
        alert["source"] = {"ip": source_ip}
    if rule in TECHNIQUES:
        alert["threat"] = {"framework": "MITRE ATT&CK", "technique": TECHNIQUES[rule]}
    return alert


class _PerSourceWindow:
    """Event-time sliding windows of flow_start events per source, with a cooldown."""

    def __init__(self, window: float, cooldown: float):
        self.window, self.cooldown = window, cooldown
        self.events: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.quiet_until: dict[str, float] = {}
        self._seen = 0

    def add(self, src: str, t: float, doc: dict) -> collections.deque:
        q = self.events[src]
        q.append((t, doc))
        while q and q[0][0] <= t - self.window:
            q.popleft()
        self._seen += 1
        if self._seen % 10_000 == 0:  # forget sources silent for a whole window
            for s in [s for s, d in self.events.items() if not d or d[-1][0] <= t - self.window]:
                del self.events[s]
        return q

    def may_alert(self, src: str, t: float) -> bool:
        if t < self.quiet_until.get(src, -math.inf):
            return False
        self.quiet_until[src] = t + self.cooldown
        return True


class Detector:
    """All rules; feed it events in order, it calls `emit(alert)` for each alert."""

    def __init__(self, rules: Rules, emit: Callable[[dict], None]):
        self.rules, self.emit = rules, emit
        self._brute = _PerSourceWindow(rules.ssh_bruteforce.window, rules.ssh_bruteforce.cooldown)
        self._failures = _PerSourceWindow(rules.ssh_auth_failures.window, rules.ssh_auth_failures.cooldown)
        self._scan = _PerSourceWindow(rules.ssh_scan.window, rules.ssh_scan.cooldown)
        self._baselines: dict[str, tuple[float, float, int]] = {}  # observer -> (mean, variance, n)
        self._spike_quiet: dict[str, float] = {}
        self._drops_quiet: dict[str, float] = {}

    def on_event(self, stream: str, doc: dict) -> None:
        if stream == "ssh-flows" and doc["event"]["action"] == "flow_start":
            self._on_flow_start(doc)
        elif stream == "ssh-flows" and doc["event"]["action"] == "flow_end":
            self._on_flow_end(doc)
        elif stream == "packet-counts":
            self._on_counts(doc)

    def _on_flow_start(self, doc: dict) -> None:
        src, t = doc["source"]["ip"], parse_time(doc["@timestamp"])
        r = self.rules.ssh_bruteforce
        if r.enabled:
            q = self._brute.add(src, t, doc)
            if len(q) >= r.threshold and self._brute.may_alert(src, t):
                first = q[0][1]
                dsts = sorted({d["destination"]["ip"] for _, d in q})
                self.emit(make_alert("ssh_bruteforce", src,
                                     f"{len(q)} SSH connections from {src} within {r.window:g}s",
                                     first, doc, len(q), r.window, src, destinations=dsts))
        r2 = self.rules.ssh_scan
        if r2.enabled:
            q = self._scan.add(src, t, doc)
            dsts = sorted({d["destination"]["ip"] for _, d in q})
            if len(dsts) >= r2.threshold and self._scan.may_alert(src, t):
                self.emit(make_alert("ssh_scan", src, f"{src} reached {len(dsts)} SSH servers within {r2.window:g}s",
                                     q[0][1], doc, len(dsts), r2.window, src, destinations=dsts))

    def _on_flow_end(self, doc: dict) -> None:
        """The brute-force variant that counts refused logins (ssh.auth.failures, guessed
        by the producer) rather than connections: it also sees many passwords tried over
        few connections, and ignores many successful ones."""
        r = self.rules.ssh_auth_failures
        failures = doc.get("ssh", {}).get("auth", {}).get("failures", 0)
        if not r.enabled or not failures:
            return
        src, t = doc["source"]["ip"], parse_time(doc["@timestamp"])
        for _ in range(failures):
            q = self._failures.add(src, t, doc)
        if len(q) >= r.threshold and self._failures.may_alert(src, t):
            self.emit(make_alert("ssh_auth_failures", src,
                                 f"{len(q)} refused SSH logins from {src} within {r.window:g}s",
                                 q[0][1], doc, len(q), r.window, src))

    def _on_counts(self, doc: dict) -> None:
        t = parse_time(doc["@timestamp"])
        obs = f"{doc['observer']['hostname']}/{doc['observer']['ingress']['interface']['name']}"
        d = self.rules.kernel_drops
        drops = doc["drops"]["ringbuf"]
        if d.enabled and drops > 0 and t >= self._drops_quiet.get(obs, -math.inf):
            self._drops_quiet[obs] = t + d.cooldown
            self.emit(make_alert("kernel_drops", obs, f"{drops} flow events lost in the kernel on {obs} "
                                 "(ring buffer full; raise --ringbuf-pages)", doc, doc, drops, 0))
        s = self.rules.traffic_spike
        secs = doc["interval"]["duration_ms"] / 1000
        if not s.enabled or secs <= 0:
            return
        rate = doc["packets"]["total"] / secs
        mean, var, n = self._baselines.get(obs, (rate, 0.0, 0))
        dev = math.sqrt(var)
        spike = n >= s.warmup and rate >= s.min_rate and rate > mean + s.factor * dev
        if spike:
            if t >= self._spike_quiet.get(obs, -math.inf):
                self._spike_quiet[obs] = t + s.cooldown
                self.emit(make_alert("traffic_spike", obs,
                                     f"{rate:.0f} packets/s on {obs}, baseline {mean:.0f} ± {dev:.0f}",
                                     doc, doc, round(rate, 3), secs, baseline_mean=round(mean, 3),
                                     baseline_dev=round(dev, 3)))
            return  # a spike does not move the baseline it is judged against
        # Exponentially weighted mean and variance (West 1979 / Finch 2009).
        diff = rate - mean
        incr = s.alpha * diff
        self._baselines[obs] = (mean + incr, (1 - s.alpha) * (var + diff * incr), n + 1)


class AlertSink:
    """Where alerts go: a Kafka topic (each acknowledged before the offset is stored),
    stdout, or a file (fsynced). One JSON object per alert."""

    def __init__(self, output: str, kafka_conf: dict, topic: str):
        self.count = 0
        self._kafka = self._file = None
        if output == "kafka":
            from .base import AckedProducer, ensure_topics

            ensure_topics(kafka_conf, [topic])
            self._kafka = AckedProducer(kafka_conf, topic, "an alert")
        elif output == "stdout":
            import sys

            self._file, self._fsync = sys.stdout.buffer, False
        else:
            from .base import append_private

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
    """Alerts go to `sink`; with `on_alert` (e.g. consumers.control.BlockOnAlert) each one
    is also handed on once it is delivered."""

    def __init__(self, rules: Rules, sink: AlertSink, on_alert: Callable[[dict], None] | None = None):
        self.sink, self.on_alert = sink, on_alert
        self.detector = Detector(rules, self._emit)

    def _emit(self, alert: dict) -> None:
        self.sink.put(alert)
        if self.on_alert is not None:
            self.on_alert(alert)

    def handle(self, ev) -> None:
        self.detector.on_event(ev.stream, ev.doc)

    def close(self) -> None:
        self.sink.close()
