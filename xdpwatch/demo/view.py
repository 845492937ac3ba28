"""What the demo shows: the topics read back as they fill (`read_topics` into a `View`),
drawn live in the terminal (`render`, with rich)."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import orjson
from confluent_kafka import OFFSET_BEGINNING

from xdpwatch import schemas
from xdpwatch.demo.lab import wait_for
from xdpwatch.kafka.read import Reader


@dataclass
class View:
    """What the demo has read back from Kafka, for the live view and the summary."""

    started: float = field(default_factory=time.monotonic)
    messages: collections.Counter = field(default_factory=collections.Counter)  # per topic
    packets: collections.Counter = field(default_factory=collections.Counter)   # totals per class
    rate: dict[str, float] = field(default_factory=dict)                        # last interval, per second
    peak_pps: float = 0.0
    flows_started: int = 0
    flows_ended: collections.Counter = field(default_factory=collections.Counter)  # by reason
    drops: int = 0
    alerts: list[dict] = field(default_factory=list)
    delivery: dict[str, float] = field(default_factory=dict)
    phase: str = "starting"
    reader_error: str | None = None  # the topic reader died: the demo must not go on blind

    def add(self, topic: str, doc: dict) -> None:
        self.messages[topic] += 1
        stream = schemas.stream_of(topic)
        if stream == "packet-counts":
            secs = max(doc["interval"]["duration_ms"] / 1000, 1e-3)
            self.packets.update(doc["packets"])
            self.rate = {k: v / secs for k, v in doc["packets"].items()}
            self.peak_pps = max(self.peak_pps, self.rate["total"])
            self.drops += doc["drops"]["ringbuf"]
        elif stream == "ssh-flows":
            action = doc["event"]["action"]
            if action == "flow_start":
                self.flows_started += 1
            elif action == "flow_end":
                self.flows_ended[doc["event"]["reason"]] += 1
        elif stream == "alerts":
            self.alerts.append(doc)


# What the demo's components write (it runs monitor-only: no control or enforcement topics).
DEMO_STREAMS = ("packet-counts", "ssh-flows", "alerts")


def read_topics(bootstrap: str, topics: list[str], view: View, stop: threading.Event) -> None:
    """Every message of `topics` from the beginning into `view`, as it arrives, until `stop`."""
    reader = None
    try:
        reader = Reader({"bootstrap.servers": bootstrap}, "demo-view")

        def partitions() -> dict | None:
            found = {t: reader.partitions(t) for t in topics}
            return found if all(found.values()) else None

        found = wait_for(partitions, 60, "the demo topics")
        reader.follow([(t, p, OFFSET_BEGINNING) for t in topics for p in found[t]])
        while not stop.is_set():
            for m in reader.poll(500, 0.2):
                if m.error() is None:
                    view.add(m.topic(), orjson.loads(m.value()))
    except Exception as e:  # noqa: BLE001 (reported by the main thread)
        view.reader_error = f"reading {', '.join(topics)} failed: {e}"
    finally:
        if reader is not None:
            reader.close()


def render(view: View, duration: float):
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    elapsed = time.monotonic() - view.started
    t = Table(title=f"xdpwatch demo — {elapsed:4.0f}/{duration:.0f} s — {view.phase}", expand=True)
    t.add_column("packets/s by class", justify="left")
    for name in ("total", "ipv4", "tcp", "udp", "icmp", "arp", "ssh", "malformed"):
        t.add_column(name, justify="right")
    t.add_row("last interval", *(f"{view.rate.get(n, 0):,.0f}" for n in
                                 ("total", "ipv4", "tcp", "udp", "icmp", "arp", "ssh", "malformed")))
    t.add_row("total packets", *(f"{view.packets.get(n, 0):,}" for n in
                                 ("total", "ipv4", "tcp", "udp", "icmp", "arp", "ssh", "malformed")))
    d = view.delivery
    stats = (f"SSH flows opened {view.flows_started}, closed {sum(view.flows_ended.values())} "
             f"({', '.join(f'{k} {v}' for k, v in sorted(view.flows_ended.items())) or '-'}) · "
             f"kernel drops {view.drops} · producer: produced {d.get('produced', 0):.0f}, "
             f"delivered {d.get('delivered', 0):.0f}, failed {d.get('failed', 0):.0f}")
    alerts = Table(expand=True, show_edge=False)
    for col in ("time", "rule", "source", "message"):
        alerts.add_column(col)
    for a in view.alerts[-6:]:
        alerts.add_row(a["@timestamp"][11:19], a["rule"]["name"], a.get("source", {}).get("ip", "-"), a["message"])
    return Group(t, Panel(stats), Panel(alerts if view.alerts else "no alerts yet", title="alerts"))
