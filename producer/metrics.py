"""Prometheus view of the producer. The run loop hands it a snapshot once per interval
(the same numbers as the interval record); a scrape only reads that snapshot and the
exporter's delivery counters, so it never touches the kernel maps."""

from __future__ import annotations

from dataclasses import dataclass, field

from xdpwatch.producer.events import CLASSES
from xdpwatch.producer.exporter import DeliveryStats
from xdpwatch.producer.records import CounterId


@dataclass
class Snapshot:
    counters: list[tuple[int, int]] = field(default_factory=list)  # cumulative (packets, bytes)
    flows_active: int = 0
    flows_evicted: int = 0
    intervals: int = 0


class ProducerMetrics:
    def __init__(self, interface: str, flow_table_size: int, delivery: DeliveryStats):
        self.interface, self.capacity, self.delivery = interface, flow_table_size, delivery
        self.snapshot = Snapshot()

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s, iface = self.snapshot, self.interface
        if s.counters:
            pk = CounterMetricFamily("xdpwatch_packets", "Packets seen by XDP, by class", labels=["interface", "class"])
            by = CounterMetricFamily("xdpwatch_bytes", "Bytes (whole frames) seen by XDP, by class",
                                     labels=["interface", "class"])
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
                c.add_metric([iface], s.counters[cid][0])
                yield c
        yield _one(CounterMetricFamily, "xdpwatch_flows_evicted", "SSH flows pushed out of a full flow table",
                   iface, s.flows_evicted)
        yield _one(GaugeMetricFamily, "xdpwatch_flows_active", "SSH flows in the flow table", iface, s.flows_active)
        yield _one(GaugeMetricFamily, "xdpwatch_flow_table_capacity", "Most SSH flows tracked at once",
                   iface, self.capacity)
        yield _one(CounterMetricFamily, "xdpwatch_intervals", "Packet-count records emitted", iface, s.intervals)
        d = self.delivery
        for name, value, text in (("produced", d.produced, "Events handed to Kafka"),
                                  ("delivered", d.delivered, "Events acknowledged by Kafka"),
                                  ("failed", d.failed, "Events Kafka refused or that timed out"),
                                  ("dropped", d.dropped, "Events lost: Kafka's local queue and the spool were full"),
                                  ("already_in_kafka", d.already_in_kafka,
                                   "Spooled events an earlier run had handed over, found in Kafka: not sent again")):
            yield _one(CounterMetricFamily, f"xdpwatch_events_{name}", text, iface, value)
        yield _one(GaugeMetricFamily, "xdpwatch_events_spooled", "Events waiting in the on-disk spool", iface, d.spooled)


def _one(cls, name: str, text: str, iface: str, value: float):
    m = cls(name, text, labels=["interface"])
    m.add_metric([iface], value)
    return m
