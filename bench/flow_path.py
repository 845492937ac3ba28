"""The per-event cost of the flow path on a recorded corpus, without kernel or broker: N
ring-buffer records (flow_start, as figure 2 queues them, and a mix with handshakes, banners
and RSTs), through the Python reference (decode_event, FlowTracker.on_event, EventShaper.flow,
orjson, key_of) and through the compiled path (CompiledFlows.record), then one sweep of the
N-flow table each. CPU time of this thread, µs per event; never asserts.

    .venv/bin/python bench/flow_path.py [--events 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import orjson

from xdpwatch import schemas
from xdpwatch.producer.events import EventShaper
from xdpwatch.producer.flowpath import CompiledFlows
from xdpwatch.producer.flows import FlowTimeouts, FlowTracker
from xdpwatch.producer.records import BannerEvent, EventType, FlowEvent, FlowKey, FlowValue, decode_event

S = 10**9


class Table:
    def __init__(self, entries: dict[bytes, bytes]):
        self.entries = entries

    def flow_records(self):
        return list(self.entries.items())

    def flow_blobs(self):
        items = list(self.entries.items())
        return [(b"".join(k for k, _ in items[i:i + 4096]), b"".join(v for _, v in items[i:i + 4096]))
                for i in range(0, len(items), 4096)]

    def pop_flow(self, key):
        raw = self.entries.pop(bytes(key), None)
        return None if raw is None else FlowValue.from_buffer_copy(raw)

    def delete_flow(self, key):
        self.entries.pop(bytes(key), None)


def corpus(n: int, mixed: bool) -> tuple[list[bytes], dict[bytes, bytes]]:
    """Records as the kernel writes them, and the table they leave."""
    records, table = [], {}
    for i in range(n):
        k = FlowKey(family=4, proto=6, client_port=1024 + i % 60000, server_port=22)
        k.client_addr[:4] = [10, (i // 60000 + 1) >> 16 & 255, (i // 60000 + 1) >> 8 & 255, (i // 60000 + 1) & 255]
        k.server_addr[:4] = [192, 0, 2, 1]
        v = FlowValue(first_ns=10 * S + i * 1000, last_ns=10 * S + i * 1000, packets=1, bytes=54, tcp_flags=0x02,
                      directions=1, handshake=1)
        records.append(bytes(FlowEvent(val=v, key=k, type=EventType.FLOW_START)))
        if mixed and i % 4 == 0:
            v.handshake, v.packets = 3, 3
            records.append(bytes(FlowEvent(val=v, key=k, type=EventType.FLOW_ESTABLISHED)))
            b = BannerEvent(key=k, first_ns=v.first_ns, type=EventType.BANNER, dir=1, len=24)
            b.data[:24] = list(b"SSH-2.0-OpenSSH_9.2p1\r\n\0")
            records.append(bytes(b))
            if i % 8 == 0:
                v.rst_ns, v.tcp_flags = v.last_ns, 0x16
                records.append(bytes(FlowEvent(val=v, key=k, type=EventType.FLOW_END_RST)))
        table[bytes(k)] = bytes(v)
    return records, table


def python_path(records, table, shaper) -> tuple[float, float, int]:
    out = []

    def report(r):
        doc = shaper.flow(r)
        out.append((schemas.key_of("ssh-flows", doc), orjson.dumps(doc)))

    tracker = FlowTracker(Table(dict(table)), report, FlowTimeouts(idle_ns=3600 * S, active_ns=3600 * S))
    t0 = time.thread_time()
    for raw in records:
        tracker.on_event(decode_event(raw))
    t1 = time.thread_time()
    tracker.sweep(20 * S)
    t2 = time.thread_time()
    return t1 - t0, t2 - t1, len(out)


def compiled_path(records, table, shaper) -> tuple[float, float, int]:
    out = []
    flows = CompiledFlows(Table(dict(table)), shaper, FlowTimeouts(idle_ns=3600 * S, active_ns=3600 * S), out.extend)
    record = flows._t.record  # the C call alone (CompiledFlows.record adds the sequence hand-over)
    flows._t.seq, flows._t.offset = shaper._seq, shaper.clock.wall_ns(0)
    t0 = time.thread_time()
    for raw in records:
        record(raw)
    t1 = time.thread_time()
    flows.sweep(20 * S)
    t2 = time.thread_time()
    return t1 - t0, t2 - t1, len(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)  # as the producer's run loop sets it
    for mixed in (False, True):
        records, table = corpus(args.events, mixed)
        name = "flow_start only" if not mixed else "mixed: + established, banner, RST"
        for label, fn in (("python  ", python_path), ("compiled", compiled_path)):
            runs = [fn(records, table, EventShaper("bench")) for _ in range(args.rounds)]
            ev = statistics.median(r[0] for r in runs) / len(records) * 1e6
            sw = statistics.median(r[1] for r in runs) * 1e3
            print(f"{name:36s} {label} {ev:6.2f} µs/record ({len(records):,} records, {runs[0][2]:,} documents), "
                  f"sweep of {len(table):,} flows {sw:7.1f} ms")


if __name__ == "__main__":
    main()
