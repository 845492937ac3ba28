"""Prometheus view of the producer. The run loop hands it a snapshot per interface once per
interval (the same numbers as the interval records) and counts interfaces attached,
detached and skipped; a scrape only reads those and the exporter's delivery counters, so it
never touches the kernel maps. Per-interface series carry the label `interface`; the flow
table's capacity, the interface counts and Kafka deliveries are the process's, without it."""

from __future__ import annotations

from dataclasses import dataclass, field

from xdpwatch.producer.events import CLASSES
from xdpwatch.producer.exporter import DeliveryStats
from xdpwatch.producer.records import CounterId


@dataclass
class Snapshot:
    counters: list[tuple[int, int]] = field(default_factory=list)  # cumulative (packets, bytes) this run
    intervals: int = 0
    flows_active: int = 0   # its flows in the (shared) flow table
    flows_evicted: int = 0  # cumulative


@dataclass
class InterfaceCounts:
    attached: int = 0   # attachments made (an interface that comes back counts again)
    detached: int = 0   # interfaces that went away or stopped matching, detached
    skipped: int = 0    # interfaces that matched but could not be watched (a foreign XDP program…)


class ProducerMetrics:
    def __init__(self, flow_table_size: int, delivery: DeliveryStats):
        self.capacity, self.delivery = flow_table_size, delivery
        self.snapshots: dict[str, Snapshot] = {}  # interface name -> its last interval's figures
        self.interfaces = InterfaceCounts()
        self.flow_path = ""  # compiled | python: who makes the flow events (set by the run loop)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snaps = [(iface, s) for iface, s in sorted(self.snapshots.items()) if s.counters]
        pk = CounterMetricFamily("xdpwatch_packets", "Packets seen by XDP, by class", labels=["interface", "class"])
        by = CounterMetricFamily("xdpwatch_bytes", "Bytes (whole frames) seen by XDP, by class",
                                 labels=["interface", "class"])
        for iface, s in snaps:
            for name, cid in CLASSES.items():
                pk.add_metric([iface, name], s.counters[cid][0])
                by.add_metric([iface, name], s.counters[cid][1])
        yield pk
        yield by
        for name, cid, text in (
                ("ringbuf_drops", CounterId.RINGBUF_DROPS, "Flow events lost in the kernel: ring buffer full"),
                ("flow_events_submitted", CounterId.EVENTS_SUBMITTED, "Flow events put in the ring buffer"),
                ("flows_started", CounterId.FLOWS_STARTED, "SSH flows created in the flow table"),
                ("blocked", CounterId.BLOCKED, "Packets from blocked sources: dropped (--enforce) or would have been"),
                ("syn_limited", CounterId.SYN_LIMITED, "SSH SYNs over their source's rate limit")):
            c = CounterMetricFamily(f"xdpwatch_{name}", text, labels=["interface"])
            for iface, s in snaps:
                c.add_metric([iface], s.counters[cid][0])
            yield c
        for cls, name, text, attr in (
                (CounterMetricFamily, "xdpwatch_intervals", "Packet-count records emitted", "intervals"),
                (CounterMetricFamily, "xdpwatch_flows_evicted", "SSH flows pushed out of a full flow table", "flows_evicted"),
                (GaugeMetricFamily, "xdpwatch_flows_active", "SSH flows in the flow table", "flows_active")):
            c = cls(name, text, labels=["interface"])
            for iface, s in snaps:
                c.add_metric([iface], getattr(s, attr))
            yield c
        yield GaugeMetricFamily("xdpwatch_interfaces_watched", "Interfaces the program is attached to",
                                value=len(self.snapshots))
        n = self.interfaces
        for name, value, text in (("attached", n.attached, "Interfaces attached to (each time one comes)"),
                                  ("detached", n.detached, "Interfaces detached from (gone, or no longer matching)"),
                                  ("skipped", n.skipped, "Matching interfaces not watched (a foreign XDP program…)")):
            yield CounterMetricFamily(f"xdpwatch_interfaces_{name}", text, value=value)
        yield GaugeMetricFamily("xdpwatch_flow_table_capacity", "Most SSH flows tracked at once", value=self.capacity)
        if self.flow_path:
            fp = GaugeMetricFamily("xdpwatch_flow_path", "Which implementation makes the flow events (1: this one)",
                                   labels=["path"])
            fp.add_metric([self.flow_path], 1)
            yield fp
        d = self.delivery
        for name, value, text in (("produced", d.produced, "Events handed to Kafka"),
                                  ("delivered", d.delivered, "Events acknowledged by Kafka"),
                                  ("failed", d.failed, "Events Kafka refused or that timed out"),
                                  ("dropped", d.dropped, "Events lost: Kafka's local queue and the spool were full"),
                                  ("already_in_kafka", d.already_in_kafka,
                                   "Spooled events an earlier run had handed over, found in Kafka: not sent again")):
            yield CounterMetricFamily(f"xdpwatch_events_{name}", text, value=value)
        yield GaugeMetricFamily("xdpwatch_events_spooled", "Events waiting in the on-disk spool", value=d.spooled)
