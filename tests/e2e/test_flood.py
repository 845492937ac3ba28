"""A SYN flood to the SSH port over the veth (bounded: 20,000 frames, to the test's own
addresses) with a one-page ring buffer, through `xdpwatch produce` and a real broker:
every flow and every dropped or evicted event is accounted for."""

from __future__ import annotations

import collections
import time

import pytest

from .env import SOAK, documents
from .procs import ProducerProc

pytestmark = pytest.mark.e2e

COUNTS, FLOWS = "xdpwatch.packet-counts", "xdpwatch.ssh-flows"
N = 60_000 if SOAK else 20_000


def flood(net, producer_args: list[str]):
    """N SYNs of distinct flows as fast as one sender goes; returns the producer's final
    counts (its --summary-file: the kernel's totals and the delivery) and the send rate."""
    frames = net.ssh_syns(range(1024, 1024 + N))
    args = ["--iface", net.iface, "--interval", "0.5", "--ringbuf-pages", "1", "--flow-idle-timeout", "2",
            "--flow-fin-linger", "0", *producer_args]
    with ProducerProc(*args) as producer:
        producer.wait_attached()
        t0 = time.monotonic()
        net.send_frames(frames)
        rate = N / (time.monotonic() - t0)
        time.sleep(4)  # idle timeout + sweeps
        rc = producer.stop()
    assert rc == 0, producer.stderr
    return producer.summary(), rate


def test_syn_flood_with_a_one_page_ring_buffer_loses_no_flow(testnet, broker_factory):
    """The flow table holds every flow: the ring buffer drops most start events, each one
    counted, and the sweep still reports every flow, exactly once, start and end."""
    broker = broker_factory()
    summary, rate = flood(testnet, ["--bootstrap-servers", broker.bootstrap, "--flow-table-size", "65536"])
    counts = [d for _, d in documents(broker, COUNTS)]
    # The counters add up: the intervals' deltas sum to the kernel's totals, and to what was sent.
    assert sum(d["packets"]["total"] for d in counts) == sum(d["packets"]["ssh"] for d in counts) == summary["packets"] == N
    assert sum(d["flows"]["started"] for d in counts) == summary["ssh_flows"] == N
    drops = sum(d["drops"]["ringbuf"] for d in counts)
    assert drops == summary["ringbuf_drops"] > 0, "a one-page ring buffer must overflow under this flood"
    assert sum(d["flows"]["evicted"] for d in counts) == summary["flows_evicted"] == 0
    flows = documents(broker, FLOWS, min_messages=2 * N, timeout=120)
    per_flow = collections.defaultdict(list)
    for _, d in flows:
        per_flow[d["source"]["port"]].append(d["event"]["action"])
    assert len(per_flow) == N and all(a == ["flow_start", "flow_end"] for a in per_flow.values())
    assert summary["events"]["delivered"] == summary["events"]["produced"] == 2 * N + len(counts)
    print(f"\n[flood] {N} SYNs at {rate:,.0f}/s: {drops} ring-buffer drops counted; {N} flows started "
          f"and ended in Kafka, none lost")


def test_syn_flood_past_a_small_flow_table_counts_every_eviction(testnet, broker_factory):
    """1,024 table entries for 20,000 flows: the kernel evicts; every flow user space
    knew of ends as flow_end(evicted), counted in the intervals. A flow is missing from
    Kafka only when both its start event was dropped (counted) and it was evicted before a
    sweep could see it."""
    broker = broker_factory()
    summary, rate = flood(testnet, ["--bootstrap-servers", broker.bootstrap, "--flow-table-size", "1024"])
    counts = [d for _, d in documents(broker, COUNTS)]
    assert sum(d["flows"]["started"] for d in counts) == summary["ssh_flows"] == N
    drops = sum(d["drops"]["ringbuf"] for d in counts)
    evicted = sum(d["flows"]["evicted"] for d in counts)
    assert drops == summary["ringbuf_drops"] and evicted == summary["flows_evicted"] > 0
    flows = documents(broker, FLOWS, min_messages=2 * (N - drops), timeout=120)
    actions = collections.Counter(d["event"]["action"] for _, d in flows)
    ends = collections.Counter(d["event"]["reason"] for _, d in flows if d["event"]["action"] == "flow_end")
    assert actions["flow_start"] == actions["flow_end"]  # every flow reported started also ended
    assert ends["evicted"] == evicted
    assert N - drops <= actions["flow_start"] <= N
    assert len({d["event"]["id"] for _, d in flows}) == len(flows)
    assert summary["events"]["delivered"] == summary["events"]["produced"] == len(flows) + len(counts)
    print(f"\n[flood, 1024-entry table] {N} SYNs at {rate:,.0f}/s: {evicted} evicted (each a flow_end), "
          f"{drops} ring drops counted, {actions['flow_start']} flows in Kafka")
