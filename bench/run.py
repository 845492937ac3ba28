"""xdpwatch benchmarks: every figure measured in one run on this machine, next to the
baseline it is divided by. Prints a table, writes bench/results/latest.json (and a
timestamped copy) and bench/results/scaling.png. Never asserts on speed.

    sudo .venv/bin/python bench/run.py            # full run: all of it 3 times, each figure's median and min-max
    sudo .venv/bin/python bench/run.py --runs 5   # each figure 5 times
    sudo .venv/bin/python bench/run.py --quick    # smoke run (a few minutes): every figure once, small counts

Each run is the whole suite on a broker of its own. A ratio is taken within one run (figure
and baseline measured side by side), then its median over the runs. Last, the targets (TARGETS): each is met only when its worst run meets it.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import ctypes as ct
import datetime as dt
import os
import platform
import pstats
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from xdpwatch import __version__, schemas
from xdpwatch.consumers.archive import Archiver
from xdpwatch.consumers.base import LoopStats, consumer_conf, run_loop
from xdpwatch.consumers.replay import Filters, ReplayStats, replay, select_inputs
from xdpwatch.kafka.read import Reader
from xdpwatch.demo.lab import Broker, Net, free_port, scrape, sh, wait_for
from xdpwatch.producer import libbpf
from xdpwatch.producer.exporter import KAFKA_DEFAULTS, KafkaExporter
from xdpwatch.producer.flows import FlowTimeouts
from xdpwatch.producer.interfaces import Selection
from xdpwatch.producer.loader import BPF_DIR, BpfConfig, XdpProgram
from xdpwatch.producer.events import Clock
from xdpwatch.producer.pipeline import Pipeline, ProduceConfig
from xdpwatch.producer.spool import Spool
from xdpwatch.producer.records import CounterId


def test_program(cfg: BpfConfig) -> XdpProgram:
    """The program loaded as the producer loads it, with lo (ifindex 1, where
    BPF_PROG_TEST_RUN's frames arrive) watched: counted in slot 0, as an attached interface."""
    prog = XdpProgram(cfg)
    prog.add_iface(1)
    return prog


RESULTS = Path(__file__).resolve().parent / "results"
XDPWATCH = str(Path(sys.executable).with_name("xdpwatch"))
SRV_MAC, CLI_MAC, NOBODY_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002"), bytes.fromhex("020000000099")
SERVER_IP = bytes([192, 0, 2, 1])
SYN, RST, ACK = 0x02, 0x04, 0x10

BARE_SOURCE = r"""
struct cnt { u64 packets; u64 bytes; };
BPF_PERCPU_ARRAY(c, struct cnt, 1);
int bare(struct xdp_md *ctx) { return XDP_PASS; }
int count_only(struct xdp_md *ctx) {
    u32 k = 0;
    struct cnt *v = c.lookup(&k);
    if (v) { v->packets++; v->bytes += ctx->data_end - ctx->data; }
    return XDP_PASS;
}
"""


# ----------------------------------------------------------------------------- frames
def tcp_frame(client: int, sport: int, dport: int, flags: int, payload: bytes = b"", dst_mac=NOBODY_MAC) -> bytes:
    """Ethernet + IPv4 + TCP from 10.x.y.z (`client` as a 24-bit number) to 192.0.2.1."""
    src = bytes([10, (client >> 16) & 255, (client >> 8) & 255, client & 255])
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0, 64, 6, 0, src, SERVER_IP)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    return dst_mac + CLI_MAC + b"\x08\x00" + ip + tcp + payload


def udp_frame(size: int = 64) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]), SERVER_IP)
    udp = struct.pack("!HHHH", 5353, 9999, size - 34, 0)
    return NOBODY_MAC + CLI_MAC + b"\x08\x00" + ip + udp + b"u" * (size - 42)


def flow_syn(i: int) -> bytes:
    """SYN number i of distinct flows (distinct client address and port)."""
    return tcp_frame(i // 60000 + 1, 1024 + i % 60000, 22, SYN)


def ring_pages(events: int) -> int:
    """Ring-buffer pages that hold `events` records (each with its 8-byte header)."""
    from xdpwatch.producer.records import FlowEvent

    need = events * (ct.sizeof(FlowEvent) + 8) // 4096 + 1
    pages = 1
    while pages < need:
        pages *= 2
    return max(pages, 64)


# ----------------------------------------------------------------------------- 1. XDP cost
# The frames whose cost is measured (bench/xdp_ab.py measures the same ones); the ACKs belong
# to a flow that a SYN opened first.
XDP_PACKETS = {
    "UDP, not SSH": udp_frame(),
    "SSH, packet of an existing flow": tcp_frame(1, 40000, 22, ACK, b"x" * 32),
    "SSH, new flow + ring-buffer events": tcp_frame(2, 40001, 22, SYN | RST),
    "malformed (truncated IPv4)": udp_frame()[:14 + 12],
}


# The design floor of an SSH packet of a known flow (bench/floor.bpf.c): the real key and
# value in an LRU hash of the real size, the two atomic adds, the cached coarse clock.
FLOOR = "design floor: 44-byte key LRU lookup, 2 atomic adds, clock"
FLOOR_SOURCE = Path(__file__).resolve().parent / "floor.bpf.c"


def run_ns(fd: int, pkt: bytes, repeat: int) -> float:
    """ns per run of program `fd` on `pkt` (BPF_PROG_TEST_RUN), to a tenth: the kernel
    reports whole ns only, so this is the thread's CPU time, for `repeat` runs minus that for
    a tenth of them (which cancels the syscall's fixed cost, about 0.9 ms), per run."""
    def cpu_ns(n: int) -> int:
        t0 = time.thread_time_ns()
        libbpf.prog_test_run(fd, pkt, n)
        return time.thread_time_ns() - t0

    small = repeat // 10
    return (cpu_ns(repeat) - cpu_ns(small)) / (repeat - small)


def xdp_cost(quick: bool) -> dict:
    from bcc import BPF

    repeat = 10_000 if quick else 1_000_000
    rounds = 3 if quick else 5
    bare = BPF(text=BARE_SOURCE)
    fds = {"bare XDP_PASS": bare.load_func(b"bare", BPF.XDP).fd,
           "per-CPU counter increment only": bare.load_func(b"count_only", BPF.XDP).fd}
    batch = 5_000 if quick else 50_000  # SYN+RST batches: 2 ring-buffer events each, drained between
    prog = test_program(BpfConfig(ssh_ports=(22,), flow_table_size=65536, ringbuf_pages=ring_pages(2 * batch)))
    prog.open_events(lambda ev: None)
    prog.test_run(tcp_frame(1, 40000, 22, SYN))  # the flow that ACKs below belong to
    floor = BPF(src_file=str(FLOOR_SOURCE).encode(), cflags=[f"-I{BPF_DIR}", "-DFLOW_TABLE_SIZE=65536"])
    floor_fd = floor.load_func(b"floor_prog", BPF.XDP).fd
    known = XDP_PACKETS["SSH, packet of an existing flow"]
    libbpf.prog_test_run(floor_fd, known)  # its first run inserts the flow; the timed runs find it

    def ns(fd: int, pkt: bytes, n: int) -> float:
        return statistics.median(run_ns(fd, pkt, n) for _ in range(rounds))

    out = {name: {"ns": ns(fd, udp_frame(), repeat)} for name, fd in fds.items()}
    out[FLOOR] = {"ns": ns(floor_fd, known, repeat)}
    base = out["bare XDP_PASS"]["ns"]
    for name, pkt in XDP_PACKETS.items():
        if "new flow" in name:  # every repetition re-creates the flow (SYN after RST) and emits start + end
            runs = []
            for _ in range(max(rounds, repeat // batch)):
                runs.append(prog.test_run(pkt, batch)[1])
                prog.poll_events(0)
            out[name] = {"ns": statistics.median(runs)}
        else:
            out[name] = {"ns": ns(prog.fd, pkt, repeat)}
    for v in out.values():
        v["ratio_to_bare"] = round(v["ns"] / base, 2) if base else None
    out["SSH, packet of an existing flow"]["ratio_to_floor"] = round(
        out["SSH, packet of an existing flow"]["ns"] / out[FLOOR]["ns"], 2)
    for v in out.values():
        v["ns"] = round(v["ns"], 1)
    out["_repeat"] = repeat
    prog.close()
    floor.cleanup()
    bare.cleanup()
    return out


# ----------------------------------------------------------------------------- 2. events to Kafka
def inject(prog: XdpProgram, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        prog.test_run(flow_syn(i))


WARMUP_TOPIC = "bench-warmup"


def warm(producer) -> None:
    """Connect and get the idempotent producer id before the clock starts, for every client
    alike: the first message of a new producer waits for both."""
    producer.produce(WARMUP_TOPIC, b"{}")
    producer.flush(30)


_SPOOLS = tempfile.TemporaryDirectory(prefix="xw-bench-spools-")  # removed when the bench exits


def spooled_exporter(bootstrap: str, prefix: str) -> KafkaExporter:
    """The exporter as `xdpwatch produce` sets it up: librdkafka's default queue, and a
    spool (in a temporary directory) that takes what overflows it."""
    exporter = KafkaExporter({"bootstrap.servers": bootstrap}, prefix)
    exporter.use_spool(Spool(Path(tempfile.mkdtemp(dir=_SPOOLS.name)), 1 << 30))
    return exporter


def pipeline_run(bootstrap: str, prefix: str, n: int, prefill: int = 0, profile: bool = False,
                 flow_path: str = "auto") -> dict:
    """The producer's own code path (ring buffer → decode → flow tracker → shape → orjson →
    confluent-kafka, with its settings and a sweep every second) on `n` flow_start events
    queued in the ring buffer; timed until the broker acknowledged all of them. `flow_path`:
    the compiled one when built (auto), or the Python reference (python)."""
    table = max(65536, 2 * (n + prefill))
    prog = test_program(BpfConfig(ssh_ports=(22,), flow_table_size=table, ringbuf_pages=ring_pages(n + prefill)))
    exporter = spooled_exporter(bootstrap, prefix)
    exporter.ensure_topics(3, 1)
    cfg = ProduceConfig(bpf=prog.cfg, interval_s=3600,  # no packet-counts records in the count
                        timeouts=FlowTimeouts(idle_ns=3600 * 10**9, active_ns=3600 * 10**9), flow_path=flow_path)
    run = Pipeline(cfg, prog, exporter)
    if prefill:  # flows already in the table (their events are consumed and acknowledged before timing)
        inject(prog, prefill, start=10_000_000)
        while exporter.stats.delivered < prefill:
            run.tracker.poll_events(10)
            exporter.poll()
    before = exporter.stats.produced  # the flow path keeps this exporter: count from here
    warm(exporter._producer)
    inject(prog, n)
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    run.start()
    if profiler:
        profiler.enable()
    while exporter.stats.produced - before + len(exporter.spool) < n and time.perf_counter() - t0 < 300:
        run.step()  # the producer's own loop body: ring buffer, Kafka, sweeps
    if profiler:
        profiler.disable()
    # All handed to the exporter: its shutdown flush waits for the last acknowledgements,
    # as the bare loop's flush() does (step() would idle on the empty ring buffer).
    stats = exporter.close(60)
    elapsed = time.perf_counter() - t0
    prog.close()
    out = {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed),
           "delivered": stats.delivered - before, "failed": stats.failed, "flow_path": run.tracker.path}
    if profiler:
        out["profile"] = stage_profile(profiler)
    return out


STAGES = [  # (stage, substrings of "file:function" that belong to it), first match wins
    ("compiled flow path (ring buffer, tracking, shaping)", ["_fastpath", "flowpath.py"]),
    ("ring buffer poll", ["ring_buffer_poll", "ring_buffer_consume", "poll_events", "ringbuf_cb"]),
    ("decode", ["decode_event", "on_record", "records.py"]),
    ("flow tracking", ["flows.py"]),
    ("shape", ["events.py", "community_id", "schemas/__init__"]),
    ("serialize", ["orjson"]),
    ("produce", ["exporter.py", "produce", "poll", "cimpl"]),
]


def stage_profile(profiler: cProfile.Profile) -> dict:
    """Own time (tottime) per pipeline stage, in % of the profiled loop."""
    st = pstats.Stats(profiler)
    by_stage: dict[str, float] = {}
    total = 0.0
    for (file, _line, func), (_cc, _nc, tottime, _ct, _callers) in st.stats.items():
        where = f"{file}:{func}"
        stage = next((s for s, keys in STAGES if any(k in where for k in keys)), "other")
        by_stage[stage] = by_stage.get(stage, 0.0) + tottime
        total += tottime
    return {k: round(100 * v / total, 1) for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1])}


def bare_producer(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]],
                  headers: list[tuple[str, bytes]] | None = None) -> dict:
    """The ceiling: confluent-kafka producing the same, already serialized lines with the
    same settings (and `headers` on each, when given), nothing else."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(15)
    p = Producer({"bootstrap.servers": bootstrap, **KAFKA_DEFAULTS})
    warm(p)
    failed = [0]

    def cb(err, _msg):  # delivery.report.only.error: called for failures only
        failed[0] += 1

    t0 = time.perf_counter()
    for key, value in values:
        while True:
            try:
                p.produce(topic, value, key, headers=headers, on_delivery=cb)
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    remaining = p.flush(60)
    elapsed = time.perf_counter() - t0
    return {"events": len(values), "seconds": round(elapsed, 3), "events_per_s": round(len(values) / elapsed),
            "delivered": len(values) - remaining - failed[0], "failed": failed[0]}


def naive_pipeline(bootstrap: str, topic: str, n: int) -> dict:
    """What a user might write first for the same output: bcc's ring-buffer callback, a ctypes
    cast, the same flow_start document built with the standard library (ipaddress, datetime,
    json.dumps), one produce and one poll per event with a delivery callback; the same Kafka
    settings and headers as the producer, so only the code differs."""
    import base64
    import hashlib
    import ipaddress
    import json as stdjson

    from confluent_kafka import Producer

    from xdpwatch import schemas
    from xdpwatch.producer.records import FlowEvent

    prog = test_program(BpfConfig(ssh_ports=(22,), flow_table_size=max(65536, 2 * n), ringbuf_pages=ring_pages(n)))
    p = Producer({"bootstrap.servers": bootstrap, **KAFKA_DEFAULTS, "delivery.report.only.error": False})
    warm(p)
    headers = schemas.headers("ssh-flows")
    host = socket.gethostname()
    done = [0]

    def delivered(err, _msg):
        done[0] += 1

    def cb(_ctx, data, _size):
        ev = ct.cast(data, ct.POINTER(FlowEvent)).contents
        k, v = ev.key, ev.val
        n_addr = 4 if k.family == 4 else 16
        src, dst = bytes(k.client_addr[:n_addr]), bytes(k.server_addr[:n_addr])
        ends = sorted([(src, k.client_port), (dst, k.server_port)])
        cid = "1:" + base64.b64encode(hashlib.sha1(
            struct.pack("!H", 0) + ends[0][0] + ends[1][0] + struct.pack("!BBHH", 6, 0, ends[0][1], ends[1][1])).digest()).decode()
        when = dt.datetime.fromtimestamp(time.time() - time.monotonic() + v.first_ns / 1e9, dt.timezone.utc)
        ts = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        done_ts = dt.datetime.fromtimestamp(time.time() - time.monotonic() + v.last_ns / 1e9, dt.timezone.utc)
        doc = {"@timestamp": ts,
               "event": {"id": f"{host}-naive-{v.first_ns}", "kind": "event", "module": "xdpwatch",
                         "dataset": "xdpwatch.ssh_flows", "category": ["network"], "type": ["connection", "start"],
                         "action": "flow_start", "start": ts, "end": done_ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                         "duration": v.last_ns - v.first_ns},
               "flow": {"id": f"{host}-f{v.first_ns:x}-{cid[2:10]}", "midstream": bool(v.midstream)},
               "source": {"ip": str(ipaddress.ip_address(src)), "port": k.client_port,
                          "packets": v.packets - v.to_client_packets, "bytes": v.bytes - v.to_client_bytes},
               "destination": {"ip": str(ipaddress.ip_address(dst)), "port": k.server_port,
                               "packets": v.to_client_packets, "bytes": v.to_client_bytes},
               "network": {"transport": "tcp", "type": "ipv4" if k.family == 4 else "ipv6", "packets": v.packets,
                           "bytes": v.bytes, "direction": "inbound", "community_id": cid},
               "tcp": {"flags": [f for i, f in enumerate(("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"))
                                 if v.tcp_flags & (1 << i)]},
               "observer": {"hostname": host, "ingress": {"interface": {"name": "bench"}}}}
        while True:
            try:
                p.produce(topic, stdjson.dumps(doc).encode(), doc["source"]["ip"].encode(), headers=headers,
                          on_delivery=delivered)
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)

    prog.bpf[b"events"].open_ring_buffer(cb)
    inject(prog, n)
    t0 = time.perf_counter()
    while done[0] < n and time.perf_counter() - t0 < 300:
        prog.bpf.ring_buffer_poll(1)
        p.poll(0)
    p.flush(60)
    elapsed = time.perf_counter() - t0
    prog.close()
    return {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed), "delivered": done[0]}


def loss_at_max_rate(bootstrap: str, n: int, flow_path: str = "auto") -> dict:
    """Flows created as fast as one injecting thread can while the producer code drains a
    default-size (64-page) ring buffer: every flow is either an event or a counted drop,
    and the sweep still reports the dropped ones from the table."""
    prog = test_program(BpfConfig(ssh_ports=(22,), flow_table_size=max(65536, 2 * n), ringbuf_pages=64))
    exporter = spooled_exporter(bootstrap, "bench-loss")
    exporter.ensure_topics(3, 1)
    cfg = ProduceConfig(bpf=prog.cfg, interval_s=3600,
                        timeouts=FlowTimeouts(idle_ns=3600 * 10**9, active_ns=3600 * 10**9), flow_path=flow_path)
    run = Pipeline(cfg, prog, exporter)
    injector = threading.Thread(target=inject, args=(prog, n))
    t0 = time.perf_counter()
    run.start()
    injector.start()
    while injector.is_alive():
        run.step()
    injected_s = time.perf_counter() - t0
    run.tracker.poll_events(0)
    run.tracker.sweep(time.monotonic_ns())  # adopts flows whose start event was dropped
    stats = exporter.close(60)
    c = prog.read_counters()
    prog.close()
    generated, submitted, drops = c[CounterId.FLOWS_STARTED][0], c[CounterId.EVENTS_SUBMITTED][0], c[CounterId.RINGBUF_DROPS][0]
    return {"flows_generated": generated, "generation_rate_per_s": round(n / injected_s),
            "ring_events_submitted": submitted, "ring_drops_counted": drops,
            "flow_starts_delivered": stats.delivered, "delivery_failed": stats.failed,
            "ring_identity_holds": generated == submitted + drops,
            "nothing_lost": stats.delivered == generated and stats.failed == 0, "flow_path": run.tracker.path}


def events_to_kafka(broker: Broker, quick: bool) -> dict:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(WARMUP_TOPIC, 1, 1)])[WARMUP_TOPIC].result(15)
    n = 5_000 if quick else 300_000
    ours = pipeline_run(broker.bootstrap, "bench", n)
    prof = pipeline_run(broker.bootstrap, "bench-prof", max(n // 5, 2000), profile=True)
    # the same lines, already serialized, for the bare loop: read back what we produced
    values = read_back(broker.bootstrap, "bench.ssh-flows", n)
    bare = bare_producer(broker.bootstrap, "bench-bare.ssh-flows", values)
    bare_h = bare_producer(broker.bootstrap, "bench-bareh.ssh-flows", values, schemas.headers("ssh-flows"))
    naive = naive_pipeline(broker.bootstrap, "bench-naive.ssh-flows", n)
    loss = loss_at_max_rate(broker.bootstrap, 2_000 if quick else 100_000)
    return {"xdpwatch": ours, "bare_confluent_kafka": bare, "bare_with_headers": bare_h, "naive_pipeline": naive,
            "ratio_to_bare": round(ours["events_per_s"] / bare["events_per_s"], 2),
            "ratio_to_bare_with_headers": round(ours["events_per_s"] / bare_h["events_per_s"], 2),
            "ratio_to_naive": round(ours["events_per_s"] / naive["events_per_s"], 2),
            "mean_value_bytes": round(sum(len(v) for _, v in values) / len(values)),
            "profile_pct_of_loop": prof["profile"], "loss_at_max_rate": loss}


def read_back(bootstrap: str, topic: str, n: int) -> list[tuple[bytes, bytes]]:
    """The first `n` (key, value) of `topic`, read to its end."""
    reader = Reader({"bootstrap.servers": bootstrap}, "bench-read")
    try:
        return [(m.key(), m.value()) for m in reader.tail(topic)][:n]
    finally:
        reader.close()


def produce_all(bootstrap: str, topic: str, messages, conf: dict | None = None, partitions: int = 3) -> None:
    """Create `topic` and put every (key, value) of `messages` in it, with the producer's Kafka
    settings (`conf` overrides some); RuntimeError unless the broker acknowledged them all."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(15)
    p = Producer({"bootstrap.servers": bootstrap, **KAFKA_DEFAULTS, **(conf or {})})
    for i, (key, value) in enumerate(messages):
        while True:
            try:
                p.produce(topic, value, key)
                break
            except BufferError:
                p.poll(0.01)
        if i % 1000 == 0:
            p.poll(0)
    if p.flush(120):
        raise RuntimeError(f"bench: the broker did not take every message of {topic}")


def bare_consume(bootstrap: str, topic: str, each=None) -> dict:
    """The ceiling of a consumer: confluent-kafka reading every partition of `topic` from its
    beginning to its end (assign, enable.partition.eof; fetch.wait.max.ms 50 as the read backs
    use), calling `each(value)` on every message and nothing else. `seconds`: from the
    consumer's creation to the last end of partition; `events_per_s`: from the first message."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    t0 = time.perf_counter()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-bare-consume", "enable.auto.commit": False,
                  "enable.partition.eof": True, "fetch.wait.max.ms": 50})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    behind, n, first = set(parts), 0, None
    deadline = time.monotonic() + 600
    while behind and time.monotonic() < deadline:
        for m in c.consume(1000, 0.2):
            if m.error() is None:
                first = first or time.perf_counter()
                if each is not None:
                    each(m.value())
                n += 1
            elif m.error().code() == KafkaError._PARTITION_EOF:
                behind.discard(m.partition())
    end = time.perf_counter()
    c.close()
    if behind:
        raise RuntimeError(f"bench: {topic} was not read to its end in 600 s")
    return {"messages": n, "seconds": round(end - t0, 3), "events_per_s": round(n / (end - (first or t0)))}


# ----------------------------------------------------------------------------- 3. counters, CPU
def counters_and_cpu(broker: Broker, quick: bool) -> dict:
    prog = test_program(BpfConfig())
    reads = 200 if quick else 2000
    t0 = time.perf_counter()
    for _ in range(reads):
        prog.read_counters()
    read_us = (time.perf_counter() - t0) / reads * 1e6
    prog.close()
    window = 2.0 if quick else 10.0
    net = Net()
    try:
        with ProducerUnderTest(net, broker) as prod:
            idle = prod.cpu_share(window)
            sender = TrafficSender(net, udp_frame(64, ), pps=100_000, seconds=window + 2)
            time.sleep(0.5)
            before = net.link_stats(net.iface)
            loaded = prod.cpu_share(window)
            after = net.link_stats(net.iface)
            sender.wait()
    finally:
        net.cleanup()
    return {"read_all_counters_us": round(read_us, 1), "cpus": os.cpu_count(),
            "producer_cpu_pct_idle": idle, "producer_cpu_pct_under_load": loaded,
            "load_pps_measured": round((after["rx_packets"] - before["rx_packets"]) / window)}


class ProducerUnderTest:
    """`xdpwatch produce` on the lab's veth, as a user runs it."""

    def __init__(self, net: Net, broker: Broker, *extra: str):
        self.spool = tempfile.TemporaryDirectory(prefix="xw-bench-spool-")
        self.proc = subprocess.Popen([XDPWATCH, "produce", "--iface", net.iface, "--bootstrap-servers", broker.bootstrap,
                                      "--spool-dir", self.spool.name, *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.arrived: list[float] = []  # the monotonic time each line of `log` was read
        threading.Thread(target=self._read_log, daemon=True).start()
        wait_for(lambda: any("attached XDP program" in line for line in self.log) or self.proc.poll() is not None,
                 60, "the producer to attach")
        if self.proc.poll() is not None:
            raise RuntimeError("producer failed:\n" + "".join(self.log))

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.arrived.append(time.monotonic())
            self.log.append(line)

    def line_time(self, text: str) -> float | None:
        """When the first stderr line containing `text` was read, if one was."""
        return next((t for t, line in zip(self.arrived, self.log) if text in line), None)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_share(self, seconds: float) -> float:
        c0, t0 = self.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        return round(100 * (self.cpu_seconds() - c0) / (time.monotonic() - t0), 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.spool.cleanup()


SENDER = r"""
import socket, sys, time
frames = [bytes.fromhex(h) for h in sys.stdin.read().split(",")]
pps, seconds = float(sys.argv[1]), float(sys.argv[2])
once = len(sys.argv) > 3  # each frame once, however long that takes
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
batch = max(1, int(pps / 100))
start, sent = time.monotonic(), 0
while (sent < len(frames)) if once else (time.monotonic() - start < seconds):
    for i in range(min(batch, len(frames) - sent) if once else batch):
        s.send(frames[(sent + i) % len(frames)])
    sent += batch
    ahead = sent / pps - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
print(min(sent, len(frames)) if once else sent, time.monotonic() - start)
"""


class TrafficSender:
    """Frames at a bounded rate for a bounded time, from the lab's client namespace to the
    bridge (dropped there: the destination MAC is nobody's)."""

    def __init__(self, net: Net, *frames: bytes, pps: float, seconds: float = 0.0, once: bool = False):
        """`once`: each frame once, then stop (`seconds` is not used); otherwise the frames
        over and over for `seconds`."""
        self.proc = subprocess.Popen(["ip", "netns", "exec", net.cli_ns, sys.executable, "-c", SENDER,
                                      str(pps), str(seconds), *(["once"] if once else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(",".join(f.hex() for f in frames))
        self.proc.stdin.close()
        self.seconds = 0.0  # how long sending took

    def wait(self) -> int:
        """The frames sent."""
        out = self.proc.stdout.read().split()
        self.proc.wait(600)
        self.seconds = float(out[1]) if len(out) > 1 else 0.0
        return int(out[0]) if out else 0


# ----------------------------------------------------------------------------- 12. latency
def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of `xs`, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * len(xs) + 0.5) - 1))]


class AckTimedExporter(KafkaExporter):
    """The producer's exporter, also told of every acknowledgement (delivery.report.only.error
    off: one more Python callback per event): `acked` gets (time.time(), value) for each."""

    def __init__(self, bootstrap: str, prefix: str):
        super().__init__({"bootstrap.servers": bootstrap, "delivery.report.only.error": False}, prefix)
        self.acked: collections.deque[tuple[float, bytes]] = collections.deque()

    def _on_delivery(self, err, msg) -> None:
        if err is None:
            self.acked.append((time.time(), msg.value()))
        else:
            super()._on_delivery(err, msg)


def flow_index(doc: dict) -> int:
    """The i of flow_syn(i) that opened the flow of `doc`."""
    a = [int(x) for x in doc["source"]["ip"].split(".")]
    return ((a[1] << 16 | a[2] << 8 | a[3]) - 1) * 60000 + doc["source"]["port"] - 1024


def packet_to_kafka(broker: Broker, quick: bool) -> dict:
    """From a packet on the veth to its flow_start acknowledged by Kafka, at a steady rate of
    new flows: the producer's run loop (Pipeline, its defaults; in this process, so that its
    acknowledgements can be timed) attached to the lab's veth, SYNs of distinct flows sent from
    the client namespace at the rate.

    Per flow_start: t0 = event.start, the XDP program's bpf_ktime_get_ns() on the SYN, turned
    into wall time by the producer (Clock: CLOCK_MONOTONIC plus the CLOCK_REALTIME offset read
    at start, to the microsecond); t1 = time.time() in the producer's delivery report for it
    (acks=all), served by its run loop (the ring-buffer wait ends with the next event: the
    flows sent after the measured ones keep it short to the end)."""
    plan = ((1000, 1.0), (50_000, 0.2)) if quick else ((1000, 5.0), (50_000, 1.0))  # (flows/s, seconds)
    prefix = f"bench-lat{time.monotonic_ns()}"
    net = Net()
    out = {}
    try:
        prog = XdpProgram(BpfConfig(ssh_ports=(22,)))
        exporter = AckTimedExporter(broker.bootstrap, prefix)
        exporter.ensure_topics(3, 1)
        run = Pipeline(ProduceConfig(selection=Selection(names=(net.iface,))), prog, exporter)
        stop = threading.Event()
        loop = threading.Thread(target=run.run, args=(stop,), daemon=True)
        loop.start()
        try:
            wait_for(lambda: "xdp" in sh("ip", "link", "show", "dev", net.iface).stdout or not loop.is_alive(), 60,
                     "the program to attach")
            first = 0
            for rate, seconds in ((100, 0.5), *plan):  # first a warm-up: connections, topic metadata
                n, tail = int(rate * seconds), int(rate * 0.1)  # flows measured; flows sent after them
                frames = [flow_syn(i) for i in range(first, first + n + tail)]
                measured = range(first, first + n)
                first += n + tail
                sender = TrafficSender(net, *frames, pps=rate, once=True)
                sent = sender.wait()
                acked = []  # parsed only when all are in: this thread stays out of the producer's way
                deadline = time.monotonic() + 60
                while len(acked) < min(sent, n + tail) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    while exporter.acked:
                        t, v = exporter.acked.popleft()
                        if b'"flow_start"' in v:
                            acked.append((t, v))
                if rate == 100:
                    continue
                lat = {}
                for t, v in acked:
                    d = orjson.loads(v)
                    if flow_index(d) in measured:
                        lat[flow_index(d)] = 1000 * (t - schemas.parse_time(d["event"]["start"]))
                ms = list(lat.values())
                out[f"{rate}_per_s"] = {"flows": n, "frames_sent": sent, "flow_starts": len(ms),
                                        "sent_per_s": round(sent / sender.seconds),
                                        "p50_ms": round(percentile(ms, 0.5), 1) if ms else None,
                                        "p99_ms": round(percentile(ms, 0.99), 1) if ms else None,
                                        "max_ms": round(max(ms), 1) if ms else None}
        finally:
            stop.set()
            loop.join(60)
            exporter.close(10)  # the pipeline closes what it attached; its exporter is ours
    finally:
        net.cleanup()
    return out


BRUTE_FORCE_ALLOW = "10.0.0.0/8"  # the management network: never blocked; the lab's client is 198.18.N.2


def bruteforce_to_block(broker: Broker, quick: bool) -> dict:
    """From a brute force to the block in the kernel, for each rule that can block: a real
    sshd in the lab's server namespace, `xdpwatch produce --enforce` (otherwise its defaults,
    the 2 s FIN linger included), `xdpwatch alert --block-on RULE` (the default rules) and the
    control topic between them. Both consumers are consuming before the attack (the alert
    consumer has handled packet-counts records, its group joined).

    ssh_auth_failures (5 refused logins within 60 s; counted on each flow_end): t0 =
    time.monotonic() when the client (sshpass + ssh, in the client namespace) of the 5th
    failed password login returned, refused. ssh_bruteforce (10 connections with a completed
    handshake within 60 s; counted on each flow_established): 9 failed logins, then t0 = when
    the 10th client is started. t1 = time.monotonic() when this process read the producer's
    "blocking <source>/32 until" log line, written right after the source went into the
    kernel's blocklist map."""
    return {**_attack_to_block(broker, "ssh_auth_failures", 5), "fin_linger_s": 2.0,
            "by_connections": _attack_to_block(broker, "ssh_bruteforce", 10)}


def _attack_to_block(broker: Broker, rule: str, attempts: int) -> dict:
    from xdpwatch.demo.lab import Sshd

    prefix = f"bench-brute{time.monotonic_ns()}"
    net = Net()
    sshd = Sshd(net)
    d = tempfile.mkdtemp(prefix="xw-bench-brute-")
    marker = f"blocking {net.cli_ip}/32 until "
    try:
        with ProducerUnderTest(net, broker, "--topic-prefix", prefix, "--enforce", "--allow", BRUTE_FORCE_ALLOW) as prod:
            alert = AlertUnderTest(broker, prefix, f"{prefix}-alert", d, "--block-on", rule)
            try:
                wait_for(lambda: alert.metrics().get(alert.HANDLED, 0) > 0 or alert.proc.poll() is not None, 120,
                         "the alert consumer to handle its first records")
                last = attempts if rule == "ssh_auth_failures" else attempts - 1  # refused before t0
                for _ in range(last):
                    if prod.line_time(marker) is not None:
                        raise RuntimeError(f"{rule}: blocked before attempt {attempts}")
                    r = net.exec(net.cli_ns, sshd.failed_login_cmd(connect_timeout=3), capture_output=True,
                                 text=True, timeout=30)
                    t0 = time.monotonic()
                    if r.returncode != 255 or "denied" not in r.stderr:
                        raise RuntimeError(f"a failed login did not fail as expected: {r.returncode} {r.stderr}")
                client = None
                if last < attempts:  # the attempt that crosses the threshold: its handshake is enough
                    t0 = time.monotonic()
                    client = subprocess.Popen(["ip", "netns", "exec", net.cli_ns,
                                               *sshd.failed_login_cmd(connect_timeout=3)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    wait_for(lambda: prod.line_time(marker) is not None, 60, f"the block ({rule})")
                finally:
                    if client is not None:
                        client.kill()
                        client.wait()
                t1 = prod.line_time(marker)
                sent = next((t for t, line in alert.log if f"sent block {net.cli_ip}" in line), None)
            finally:
                alert.stop()
    finally:
        sshd.stop()
        net.cleanup()
    # where the time goes: the alert consumer logs "sent block ..." once the broker acknowledged the command
    key = "refused_logins" if rule == "ssh_auth_failures" else "connections"
    return {"rule": rule, key: attempts, "seconds": round(t1 - t0, 3),
            "to_command_acked_s": round(sent - t0, 3) if sent is not None else None}


# ----------------------------------------------------------------------------- 4. archive, replay
def archive_and_replay(broker: Broker, n: int) -> dict:
    """`n`: how many messages the events benchmark wrote to bench.ssh-flows (counted from
    its acknowledgements: this broker's watermarks were seen to lag)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    topic = "bench.ssh-flows"
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench-bare-archive", "enable.auto.commit": False})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    with tempfile.TemporaryDirectory() as d:
        got = nbytes = 0
        t0 = None
        with open(Path(d) / "bare.jsonl", "wb") as f:
            deadline = time.monotonic() + 120
            while got < n and time.monotonic() < deadline:
                for m in c.consume(10_000, 1.0):
                    if m.error() is None:
                        t0 = t0 or time.perf_counter()
                        f.write(m.value() + b"\n")
                        got += 1
                        nbytes += len(m.value())
            f.flush()
            os.fsync(f.fileno())
        bare_s = time.perf_counter() - t0
        c.close()

        arch_dir = Path(d) / "archive"
        arch = TimedArchiver(arch_dir, 64_000_000, 300)
        stop = threading.Event()
        conf = consumer_conf({"bootstrap.servers": broker.bootstrap, "session.timeout.ms": "6000"}, "bench-archive", True)
        run_loop(conf, [topic], arch, NullDeadLetter(), stop, idle_exit_s=2.0, stats=LoopStats())
        arch_s = arch.last - arch.first

        rstats = ReplayStats()
        t1 = time.perf_counter()
        replay(select_inputs(arch_dir, [], rstats), Filters(), lambda *a: None, 0, rstats)
        replay_s = time.perf_counter() - t1
    mb = nbytes / 1e6
    return {"messages": n, "mb": round(mb, 1),
            "archiver": {"events_per_s": round(arch.lines / arch_s), "mb_per_s": round(mb / arch_s, 1),
                         "lines": arch.lines},
            "bare_consume_to_file": {"events_per_s": round(got / bare_s), "mb_per_s": round(mb / bare_s, 1)},
            "ratio_to_bare": round((arch.lines / arch_s) / (got / bare_s), 2),
            "replay_to_null_events_per_s": round(rstats.replayed / replay_s)}


class TimedArchiver(Archiver):
    """The real archiver, timed from its first message to its last segment on disk."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.first = self.last = 0.0
        self.lines = 0

    def handle(self, ev) -> None:
        if not self.first:
            self.first = time.perf_counter()
        super().handle(ev)
        self.lines += 1
        self.last = time.perf_counter()

    def close(self) -> None:  # the last segments' fsync counts; the idle wait before it does not
        t = time.perf_counter()
        super().close()
        self.last += time.perf_counter() - t


class NullDeadLetter:
    def put(self, record: dict) -> None:
        raise RuntimeError(f"unexpected dead letter in the benchmark: {record['reason']}")

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- 5. memory
def memory(broker: Broker, quick: bool) -> dict:
    seconds = 10 if quick else 90
    net = Net()
    samples = []
    try:
        with ProducerUnderTest(net, broker, "--flow-idle-timeout", "5", "--flow-fin-linger", "0.5") as prod:
            # steady SSH load: 1000 new flows/s (SYN then FIN), so flows start and end all along
            frames = [tcp_frame(i % 250 + 1, 20000 + i, 22, f, dst_mac=NOBODY_MAC)
                      for i in range(2000) for f in (SYN, 0x11)]
            sender = TrafficSender(net, *frames, pps=2000, seconds=seconds)
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                samples.append(prod.rss_mb())
                time.sleep(1)
            sender.wait()
    finally:
        net.cleanup()
    # the flow table at its configured maximum: what the kernel charges for the map
    sizes = {}
    for size in (65536, 1 << 20):
        prog = test_program(BpfConfig(flow_table_size=size))
        sizes[size] = map_memlock(prog.bpf[b"flows"].map_fd)
        prog.close()
    warm = samples[min(5, len(samples) - 1)]
    return {"seconds": seconds, "rss_mb_start": round(samples[0], 1), "rss_mb_after_warmup": round(warm, 1),
            "rss_mb_end": round(samples[-1], 1), "rss_mb_max": round(max(samples), 1),
            "growth_after_warmup_pct": round(100 * (samples[-1] - warm) / warm, 1),
            "flow_table_mb": {str(k): round(v / 1e6, 1) for k, v in sizes.items()},
            "flow_table_bytes_per_entry": round(sizes[65536] / 65536)}


def map_memlock(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------- 7. alert consumer state
def handshake_flows(n: int) -> tuple[list[tuple[bytes, bytes, bytes]], list[bytes]]:
    """Templates of one connection's flow_start and flow_established, serialized once and cut
    around the event id and the source IP, and the n distinct source IPs to put in them."""
    from xdpwatch.producer.events import EventShaper
    from xdpwatch.producer.flows import FlowReport
    from xdpwatch.producer.records import FlowKey, FlowValue

    k = FlowKey(family=4, proto=6, client_port=40000, server_port=22)
    k.client_addr[:4], k.server_addr[:4] = [10, 0, 0, 1], list(SERVER_IP)
    start = EventShaper("bench", hostname="bench").flow(
        FlowReport("flow_start", None, k, FlowValue(first_ns=1, last_ns=1, packets=1, bytes=74, tcp_flags=SYN, directions=1)))
    est = {**start, "event": {**start["event"], "action": "flow_established", "type": ["connection", "info"]},
           "tcp": {**start["tcp"], "handshake": "complete"}}
    parts = []
    for doc in (start, est):
        raw = orjson.dumps({**doc, "event": {**doc["event"], "id": "@ID@"}, "source": {**doc["source"], "ip": "@IP@"}})
        head, rest = raw.split(b"@ID@")
        parts.append((head, *rest.split(b"@IP@")))
    return parts, [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}".encode() for i in range(1, n + 1)]


def alert_sources(broker: Broker, quick: bool, n: int | None = None, extra: tuple[str, ...] = ()) -> dict:
    """`xdpwatch alert` (a subprocess, default rules and limits) on n sources that each complete
    one SSH connection (flow_start + flow_established) at one instant: every source in every
    rule's window at once, n/100,000 times the default cap on tracked sources. The events wait
    in Kafka before it starts; events/s from its first to its last message handled (metrics,
    every 0.2 s), RSS from /proc before its first message and at its highest."""
    n = n or (20_000 if quick else 1_000_000)
    parts, ips = handshake_flows(n)
    # Uncompressed: these differ only in IP and id and compress 140x (real flow events: 12x),
    # and librdkafka's prefetch limit counts compressed bytes (README: Raise alerts).
    produce_all(broker.bootstrap, "bench-alert.ssh-flows",
                ((ip, b"".join((head, b"b%d" % i, middle, ip, tail))) for i, ip in enumerate(ips)
                 for head, middle, tail in parts), {"compression.type": "none"})
    with tempfile.TemporaryDirectory(prefix="xw-bench-alert-") as d:
        alert = AlertUnderTest(broker, "bench-alert", "bench-alert", d, "--output", f"{d}/alerts.jsonl", *extra)
        try:
            m = alert.wait_metrics()
            rss_start = proc_rss_mb(alert.proc.pid)  # joining the group takes seconds: nothing handled yet
            if m.get(alert.HANDLED, 0):
                raise RuntimeError("the alert consumer had started consuming before its first RSS sample")
            samples = alert.watch(2 * n)
            evicted = alert.metrics().get('xdpwatch_alert_sources_evicted_total{command="alert"}')
        finally:
            alert.stop()
    last = samples[-1]
    return {"sources": n, "events": 2 * n, "events_per_s": handled_rate(samples),
            "rss_mb_start": round(rss_start, 1), "rss_mb_max": round(max(s[2] for s in samples), 1),
            "rss_mb_end": round(last[2], 1), "sources_evicted": evicted}


class AlertUnderTest:
    """`xdpwatch alert` as a user runs it, on PREFIX's topics from their beginning in `group`
    (a subprocess, dead letters to a file in `d`, a short session timeout: the group join takes
    half of it), with its metrics port; its stderr lines, each with the monotonic time it
    arrived, in `log`."""

    HANDLED = 'xdpwatch_consumer_messages_total{command="alert",outcome="handled"}'

    def __init__(self, broker: Broker, prefix: str, group: str, d: str, *extra: str):
        self.port = free_port()
        self.started = time.monotonic()
        self.proc = subprocess.Popen([XDPWATCH, "alert", "--bootstrap-servers", broker.bootstrap, "--topic-prefix", prefix,
                                      "--from-beginning", "--group-id", group, "--dead-letter", f"{d}/dead.jsonl",
                                      "--metrics-port", str(self.port), "-X", "session.timeout.ms=6000", *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[tuple[float, str]] = []
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append((time.monotonic(), line))

    def metrics(self) -> dict:
        return scrape(self.port)

    def wait_metrics(self) -> dict:
        m = wait_for(lambda: self.metrics() or self.proc.poll() is not None, 60, "the alert consumer's metrics")
        if m is True:
            raise RuntimeError(f"the alert consumer exited:\n{self.stderr()[-2000:]}")
        return m

    def watch(self, n: int, timeout: float = 900) -> list[tuple[float, float, float]]:
        """(monotonic time, messages handled, RSS MB) every 0.2 s until `n` are handled."""
        samples = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            samples.append((time.monotonic(), self.metrics().get(self.HANDLED, 0), proc_rss_mb(self.proc.pid)))
            if samples[-1][1] >= n:
                return samples
            time.sleep(0.2)
        raise RuntimeError(f"the alert consumer handled {samples[-1][1] if samples else 0:.0f} of {n} events:\n"
                           f"{self.stderr()[-2000:]}")

    def wait_line(self, pattern: re.Pattern, timeout: float) -> tuple[float, re.Match]:
        """When the first stderr line matching `pattern` arrived, and its match."""
        def seen():
            found = next(((t, m) for t, line in self.log if (m := pattern.search(line))), None)
            return found or self.proc.poll() is not None

        found = wait_for(seen, timeout, f"a log line matching {pattern.pattern!r}")
        if found is True:
            raise RuntimeError(f"the alert consumer exited:\n{self.stderr()[-2000:]}")
        return found

    def stderr(self) -> str:
        return "".join(line for _, line in self.log)

    def stop(self) -> None:
        """SIGTERM: it commits what it handled and exits."""
        self.proc.terminate()
        self.proc.wait(120)


def handled_rate(samples: list[tuple[float, float, float]]) -> int:
    """Messages handled per second, from the first sample that saw any handled to the last."""
    first, last = next(s for s in samples if s[1] > 0), samples[-1]
    return round((last[1] - first[1]) / max(last[0] - first[0], 0.2))


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- 6. scaling
def scaling(broker: Broker, quick: bool) -> dict:
    fills = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    repeat = 10_000 if quick else 200_000
    out = []
    for fill in fills:
        prog = test_program(BpfConfig(ssh_ports=(22,), flow_table_size=262144, ringbuf_pages=ring_pages(2 * fill)))
        prog.open_events(lambda ev: None)
        inject(prog, fill)
        prog.poll_events(0)
        existing = round(statistics.median(run_ns(prog.fd, tcp_frame(1, 1024, 22, ACK), repeat) for _ in range(3)), 1)
        new = statistics.median(prog.test_run(tcp_frame(9999, 9, 22, SYN | RST), 2_000)[1] for _ in range(3))
        prog.poll_events(0)
        t0 = time.perf_counter()
        entries = sum(1 for _ in prog.flow_entries())
        sweep_ms = (time.perf_counter() - t0) * 1000
        prog.close()
        ev = pipeline_run(broker.bootstrap, f"bench-fill{fill}", 2_000 if quick else 50_000, prefill=fill)
        out.append({"flows_in_table": fill, "entries_read": entries, "ns_existing_flow_packet": existing,
                    "ns_new_flow": new, "read_table_ms": round(sweep_ms, 1), "events_per_s": ev["events_per_s"]})
    return {"points": out}


def plot(scale: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = scale["points"]
    x = [p["flows_in_table"] for p in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [p["ns_existing_flow_packet"] for p in pts], "o-", label="SSH packet, existing flow")
    a.plot(x, [p["ns_new_flow"] for p in pts], "s-", label="new flow + ring-buffer events")
    a.set(xscale="log", xlabel="flows in table", ylabel="ns per packet (BPF_PROG_TEST_RUN)", title="XDP cost")
    a.legend()
    b.plot(x, [p["events_per_s"] for p in pts], "o-", color="tab:green")
    b.set(xscale="log", xlabel="flows in table", ylabel="flow events/s acknowledged by Kafka",
          title="Producer throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- 7. restore
def control_history(n: int):
    """`n` commands an attacker could have written: blocks of distinct addresses (far more
    than the blocklist holds) with an unblock of the previous one every 4th command."""
    at = schemas.format_time(time.time())
    for i in range(n):
        action, addr = ("unblock", 0x64400000 + i - 1) if i % 4 == 3 else ("block", 0x64400000 + i)  # 100.64/10
        c = {"id": f"r-{i}", "action": action, "prefix": socket.inet_ntoa(struct.pack("!I", addr)),
             "issued_by": "operator:bench"}
        if action == "block":
            c["ttl_s"] = 3600
        yield c["prefix"].encode(), orjson.dumps({"@timestamp": at, "command": c})


def restore_at_start(broker: Broker, quick: bool) -> dict:
    """What a producer does at start with a long control topic: read it through the real
    ControlReader and restore it into the real program's maps (in a child process, so that
    its peak RSS is its own)."""
    n = 20_000 if quick else 1_000_000
    topic = f"bench-restore-{n}.control"
    produce_all(broker.bootstrap, topic, control_history(n), {"linger.ms": 50}, partitions=1)
    r = subprocess.run([sys.executable, __file__, "--restore-child", broker.bootstrap, topic],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"bench: restore child failed: {r.stderr[-2000:]}")
    return {"commands": n, **orjson.loads(r.stdout)}


def restore_child(bootstrap: str, topic: str) -> dict:
    import logging

    from xdpwatch.producer.enforcement import Enforcer, Policy
    from xdpwatch.producer.events import EventShaper
    from xdpwatch.kafka.read import ControlReader
    from xdpwatch.producer.hostnet import host_protected

    logging.disable(logging.ERROR)  # one "blocking ..." line per restored block otherwise
    prog = test_program(BpfConfig(enforce_mode="enforce"))
    loaded_mb = proc_hwm_mb()  # bcc and LLVM, before any command
    reader = ControlReader({"bootstrap.servers": bootstrap}, topic)
    t0 = time.perf_counter()
    read = sum(1 for _ in reader.catch_up())
    read_s = time.perf_counter() - t0
    reader.close()
    published = []
    enf = Enforcer(prog, "enforce", Policy(), lambda doc: published.append(len(doc)), EventShaper("bench0"))
    enf.protect(host_protected())
    reader = ControlReader({"bootstrap.servers": bootstrap}, topic)
    t0 = time.perf_counter()
    stats = enf.restore(reader.catch_up())
    restore_s = time.perf_counter() - t0
    reader.close()
    prog.close()
    return {"read_only_s": round(read_s, 2), "read_per_s": round(read / read_s), "restore_s": round(restore_s, 2),
            "restore_per_s": round(stats.commands / restore_s), "blocks_applied": stats.applied,
            "refused": stats.refused, "rss_mb_program_loaded": round(loaded_mb),
            "peak_rss_mb": round(proc_hwm_mb())}


def proc_hwm_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not ru_maxrss: Linux carries that over
    exec from the forked image, so a child of a large bench process would report the parent."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


# ----------------------------------------------------------------------------- 9-11. exactly once
# The server's payload sizes in a key login and in 3 refused passwords (OpenSSH 9.2, measured in
# the lab: tests/unit/test_events.py).
KEY_LOGIN = [41, 1088, 1564, 44, 52, 100, 28, 264, 192, 72, 124]
WRONG_PASSWORDS = [41, 1088, 1564, 44, 52, 52, 52, 52]


class WallClock(Clock):
    """For shaping made-up flows: their times are wall-clock ns already."""

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns


def flow_traffic(n: int, sources: int = 1000, attackers: int = 10) -> list[tuple[bytes, bytes]]:
    """n (key, value) messages of an ssh-flows topic, shaped by the producer's EventShaper (one
    run: one event-id prefix): connections, each a flow_start, a flow_established and a
    flow_end (fin, both banners, ssh.auth), from `sources` client addresses in turn, each
    connecting every 10 s of event time, the last one ending now. `attackers` of the sources
    get 3 passwords refused per connection (one ssh_auth_failures alert per source and
    cooldown); the others log in with a key. No other rule fires."""
    from xdpwatch.producer.events import EventShaper
    from xdpwatch.producer.flows import FlowReport
    from xdpwatch.producer.records import DIR_TO_CLIENT, DIR_TO_SERVER, FlowKey, FlowValue, Handshake

    shaper = EventShaper("bench", WallClock(), hostname="bench")
    banners = {DIR_TO_SERVER: b"SSH-2.0-OpenSSH_9.6\r\n", DIR_TO_CLIENT: b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"}
    connections, step = n // 3 + 1, 10 * 10**9 // sources
    t0 = time.time_ns() - connections * step - 2 * 10**9
    out = []
    for i in range(connections):
        s, t = i % sources, t0 + i * step
        k = FlowKey(family=4, proto=6, client_port=1024 + i % 60000, server_port=22)
        k.client_addr[:4], k.server_addr[:4] = [10, 1, s >> 8, s & 255], list(SERVER_IP)
        sizes = WRONG_PASSWORDS if s < attackers else KEY_LOGIN
        end = FlowValue(first_ns=t, last_ns=t + 2 * 10**9, packets=40, bytes=7000, to_client_packets=18,
                        to_client_bytes=4200, tcp_flags=0x1B, directions=1, handshake=Handshake.COMPLETE,
                        nsizes=len(sizes))
        end.server_sizes[:len(sizes)] = sizes
        for r in (FlowReport("flow_start", None, k, FlowValue(first_ns=t, last_ns=t, packets=1, bytes=74, tcp_flags=SYN,
                                                              directions=1, handshake=Handshake.SYN)),
                  FlowReport("flow_established", None, k, FlowValue(first_ns=t, last_ns=t + 10**6, packets=3, bytes=206,
                                                                    tcp_flags=SYN | ACK, directions=1,
                                                                    handshake=Handshake.COMPLETE)),
                  FlowReport("flow_end", "fin", k, end, banners)):
            doc = shaper.flow(r)
            out.append((schemas.key_of("ssh-flows", doc), orjson.dumps(doc)))
    return out[:n]


def spool_check(broker: Broker, quick: bool) -> dict:
    """Issue 14's start check of the producer: a spool whose first segment holds n events (as a
    stop writes back what Kafka had not acknowledged), half of them the last n/2 messages of a
    3-partition topic of m: `KafkaExporter.use_spool` reads the topic back and must find
    exactly those. Against a bare consumer reading the same m messages."""
    n, m = (2_000, 20_000) if quick else (30_000, 300_000)
    prefix = f"bench-spool-{m}"
    messages = flow_traffic(m + n // 2)
    produce_all(broker.bootstrap, f"{prefix}.ssh-flows", messages[:m])
    with tempfile.TemporaryDirectory(prefix="xw-bench-spool-") as d:
        Spool(Path(d), 1 << 30).prepend([("ssh-flows", k, v) for k, v in messages[m - n // 2:]])
        spool = Spool(Path(d), 1 << 30)  # as the next run opens it
        exporter = KafkaExporter({"bootstrap.servers": broker.bootstrap}, prefix)
        t0 = time.perf_counter()
        exporter.use_spool(spool)
        check_s = time.perf_counter() - t0
        found = len(exporter._in_kafka)
        spool.close()
    bare = bare_consume(broker.bootstrap, f"{prefix}.ssh-flows")
    return {"spooled_events": n, "topic_messages": m, "partitions": 3,
            "check": {"seconds": round(check_s, 3), "events_checked": n, "found": found,
                      "messages_read_per_s": round(m / check_s)},
            "bare_read": {"seconds": bare["seconds"], "messages": bare["messages"],
                          "messages_per_s": round(bare["messages"] / bare["seconds"])},
            "ratio_to_bare": round(check_s / bare["seconds"], 2),
            "note": "Tansu ignores timestamps in offsets_for_times: the read back starts at the beginning of each "
                    "partition here (on Apache Kafka, at the oldest spooled @timestamp minus 60 s), so both read all "
                    "messages. Every message is of the spool's producer run (its event-id prefix), so each is parsed: "
                    "the worst case. Timed: use_spool (reading the spool's first segment, the read back) against a "
                    "bare consumer from its creation to the last end of partition."}


def flow_topic(broker: Broker, quick: bool) -> tuple[str, int]:
    """The topic of figures 10 and 11 (filled once): PREFIX.ssh-flows with n flow events
    (flow_traffic), and n."""
    from confluent_kafka.admin import AdminClient

    n = 20_000 if quick else 300_000
    topic = f"bench-flows-{n}.ssh-flows"
    if topic not in AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics:
        produce_all(broker.bootstrap, topic, flow_traffic(n))
    return topic, n


def alert_vs_bare(broker: Broker, quick: bool) -> dict:
    """Issue 16's consumer target: `xdpwatch alert` (default rules, alerts to a file, events
    waiting in Kafka before it starts; events/s from its first to its last message handled,
    metrics every 0.2 s) against bare loops over the same topic that only parse each message
    (orjson), or parse and validate it (schemas.is_valid)."""
    topic, n = flow_topic(broker, quick)
    with tempfile.TemporaryDirectory(prefix="xw-bench-alert-") as d:
        alert = AlertUnderTest(broker, topic.removesuffix(".ssh-flows"), f"bench-alert-rate-{n}", d,
                               "--output", f"{d}/alerts.jsonl")
        try:
            samples = alert.watch(n)
            m = alert.metrics()
        finally:
            alert.stop()
        alerts = len(Path(d, "alerts.jsonl").read_bytes().splitlines())
    valid = [0]

    def validate(value: bytes) -> None:
        valid[0] += schemas.is_valid("ssh-flows", orjson.loads(value))

    bare = bare_consume(broker.bootstrap, topic, orjson.loads)
    checked = bare_consume(broker.bootstrap, topic, validate)
    ours = handled_rate(samples)
    return {"events": n,
            "alert": {"events_per_s": ours, "handled": m.get(alert.HANDLED),
                      "dead_lettered": m.get('xdpwatch_consumer_messages_total{command="alert",outcome="dead_lettered"}'),
                      "alerts": alerts},
            "bare_parse": {"events_per_s": bare["events_per_s"], "messages": bare["messages"]},
            "bare_parse_validate": {"events_per_s": checked["events_per_s"], "messages": checked["messages"],
                                    "valid": valid[0]},
            "ratio_to_bare": round(ours / bare["events_per_s"], 2),
            "ratio_to_bare_validated": round(ours / checked["events_per_s"], 2)}


REBUILT = re.compile(r"rebuilt the state of (.+) from (\d+) events before the committed offsets, "
                     r"and read back (\d+) alerts")


def alert_restart(broker: Broker, quick: bool) -> dict:
    """Issue 14's rebuild: `xdpwatch alert` (default rules, alerts to Kafka) handles the whole
    topic of figure 10 in a group, is stopped with SIGTERM (offsets committed), and starts
    again in the same group: the rebuild's own figures (metrics, log), and the time from the
    process start to its rebuild log line (start-up, group join, rebuild)."""
    topic, n = flow_topic(broker, quick)
    prefix, group = topic.removesuffix(".ssh-flows"), f"bench-alert-restart-{n}"
    with tempfile.TemporaryDirectory(prefix="xw-bench-restart-") as d:
        first = AlertUnderTest(broker, prefix, group, d)
        try:
            first.watch(n)
            alerts = first.metrics().get('xdpwatch_alerts_total{command="alert"}')
        finally:
            first.stop()
        again = AlertUnderTest(broker, prefix, group, d)
        try:
            at, rebuilt = again.wait_line(REBUILT, 300)
            m = again.metrics()
        finally:
            again.stop()
    resumed = sum(int(x.rsplit("@", 1)[1]) for x in rebuilt[1].split(", "))  # "topic[p]@offset, ..."
    return {"events": n, "alerts_first_run": alerts, "resumed_at_offsets_sum": resumed,
            "rebuild_seconds": m.get('xdpwatch_alert_state_rebuild_seconds{command="alert"}'),
            "events_reread": m.get('xdpwatch_alert_events_reread_total{command="alert"}'),
            "alerts_read_back": int(rebuilt[3]), "alerts_published_again": m.get('xdpwatch_alerts_total{command="alert"}'),
            "start_to_rebuild_line_s": round(at - again.started, 2),
            "note": "Tansu ignores timestamps in offsets_for_times: the rebuild reads each partition from its "
                    "beginning to the committed offset and feeds the events within the longest horizon (600 s, the "
                    "traffic baseline's history) before the last one handled; events_reread counts those fed."}


# ----------------------------------------------------------------------------- 12. interfaces
def interfaces(quick: bool) -> dict:
    """`xdpwatch produce --iface-pattern` over 1 and over 16 veths (quick: 1 and 4): the time
    from the process's start to its "watching N interface(s)" line (compile, load, attach
    each), and its RSS then (one start each: the suite's runs give the median). --output stdout:
    no Kafka."""
    counts, runs = ((1, 4), 1) if quick else ((1, 16), 1)
    tag = f"xwb{os.getpid() % 90 + 10}"
    names = [f"{tag}i{i}" for i in range(max(counts))]

    def delete() -> None:
        for n in names:
            sh("ip", "link", "del", n, check=False)

    delete()
    out = {}
    try:
        for n in names:  # veth pairs with both ends here and no traffic: only attaching matters
            sh("ip", "link", "add", n, "type", "veth", "peer", "name", f"{n}p")
            sh("ip", "link", "set", n, "up")
        for count in counts:
            starts, rss = [], []
            pattern = f"{tag}i({'|'.join(str(i) for i in range(count))})"
            for _ in range(runs):
                t0 = time.monotonic()
                proc = subprocess.Popen([XDPWATCH, "produce", "--iface-pattern", pattern, "--output", "stdout",
                                         "--spool-max-mb", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
                try:
                    for line in proc.stderr:
                        if f"watching {count} interface(s)" in line:
                            break
                    else:
                        raise RuntimeError(f"producer exited {proc.wait()} before watching {count} interfaces")
                    starts.append(time.monotonic() - t0)
                    time.sleep(1)
                    rss.append(int(next(line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text()
                                        .splitlines() if line.startswith("VmRSS:"))) / 1024)
                finally:
                    proc.terminate()
                    proc.wait(60)
            out[str(count)] = {"start_s": round(statistics.median(starts), 2), "rss_mb": round(statistics.median(rss), 1)}
    finally:
        delete()
    return {"runs": runs, "by_count": out}


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    import confluent_kafka

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"host": socket.gethostname(), "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "xdpwatch": __version__,
            "confluent_kafka": confluent_kafka.version()[0], "librdkafka": confluent_kafka.libversion()[0],
            "bcc": sh("dpkg-query", "-W", "-f", "${Version}", "python3-bpfcc", check=False).stdout,
            "broker": "Tansu (embedded, in memory)"}


# ----------------------------------------------------------------------------- runs, medians, targets
class _Spread:
    """A figure's median over the runs, formatted with their min-max when they differ:
    f"{x:,}" -> "73,057 (70,112-75,900)"."""

    lo: float
    hi: float

    def __format__(self, spec: str) -> str:
        text = super().__format__(spec)
        if self.lo == self.hi:
            return text
        base = type(self).__mro__[2]  # int or float: the bounds without a spread of their own
        return f"{text} ({format(base(self.lo), spec)}-{format(base(self.hi), spec)})"


class IntFigure(_Spread, int):
    pass


class FloatFigure(_Spread, float):
    pass


def figure(values: list[float]):
    """The median of `values` (to their own precision: an even count averages two) and their
    min-max."""
    places = max(len(repr(v).partition(".")[2]) if isinstance(v, float) else 0 for v in values)
    m = round(statistics.median(values), places)
    x = IntFigure(m) if places == 0 else FloatFigure(m)
    x.lo, x.hi = min(values), max(values)
    return x


def median_of(runs: list):
    """The runs of one section as one result of the same shape: each number the median of
    the runs' (with their min and max, see _Spread), everything else as the first run had it.
    A ratio is taken within each run, then its median across the runs."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_of([r.get(k) for r in runs]) for k in first}
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in runs):
        return [median_of(list(col)) for col in zip(*runs)]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in runs):
        return figure(runs) if len(runs) > 1 else first
    return first


# (what, section, path to the figure, "<=" or ">=", bound): met only if the worst run meets it
TARGETS = [
    ("UDP (not SSH) ÷ bare XDP_PASS", "xdp_cost", ("UDP, not SSH", "ratio_to_bare"), "<=", 1.5),
    ("SSH known-flow packet ÷ design floor", "xdp_cost", ("SSH, packet of an existing flow", "ratio_to_floor"), "<=", 1.2),
    ("flow events to Kafka ÷ bare confluent-kafka", "events_to_kafka", ("ratio_to_bare",), ">=", 0.5),
    ("archiver ÷ bare consume-to-file", "archive_replay", ("ratio_to_bare",), ">=", 0.5),
    ("alert consumer ÷ bare consume loop", "alert_vs_bare", ("ratio_to_bare",), ">=", 0.5),
    ("alert consumer ÷ bare loop with validation", "alert_vs_bare", ("ratio_to_bare_validated",), ">=", 0.5),
    ("producer RSS growth after warm-up, %", "memory", ("growth_after_warmup_pct",), "<=", 10.0),
    ("packet -> flow_start acked, p99 at 1,000/s, ms", "packet_to_kafka", ("1000_per_s", "p99_ms"), "<=", 50.0),
    ("last failed login -> block (ssh_auth_failures), s", "bruteforce_to_block", ("seconds",), "<=", 2.0),
    ("10th connection -> block (ssh_bruteforce), s", "bruteforce_to_block", ("by_connections", "seconds"), "<=", 2.0),
]


def targets(runs: dict[str, list[dict]]) -> list[dict]:
    """Each target against every run of its section: the worst run, the median, met or not."""
    out = []
    for what, section, path, op, bound in TARGETS:
        values = []
        for r in runs.get(section, []):
            for k in path:
                r = r.get(k) if isinstance(r, dict) else None
            if r is not None:
                values.append(r)
        worst = (max if op == "<=" else min)(values) if values else None
        met = worst is not None and (worst <= bound if op == "<=" else worst >= bound)
        out.append({"target": f"{what} {op} {bound:g}", "runs": len(values), "worst_run": worst,
                    "median": statistics.median(values) if values else None, "met": met})
    return out


def targets_table(ts: list[dict]) -> str:
    rows = [("Targets (met only when the worst run meets it)", "worst run", "median", "")]
    rows += [(f"   {t['target']}", f"{t['worst_run']:g}" if t["worst_run"] is not None else "-",
              f"{t['median']:g}" if t["median"] is not None else "-", "met" if t["met"] else "NOT MET")
             for t in ts]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows)


def table(r: dict) -> str:
    x, e, c, a, m = r["xdp_cost"], r["events_to_kafka"], r["counters"], r["archive_replay"], r["memory"]
    rows = [("1. XDP cost per packet", "ns", "÷ bare XDP_PASS")]
    rows += [(f"   {k}", f"{v['ns']:.1f}", f"{v['ratio_to_bare']:.2f}×"
              + (f"; ÷ floor {v['ratio_to_floor']:.2f}×" if "ratio_to_floor" in v else ""))
             for k, v in x.items() if not k.startswith("_")]
    rows += [("2. Flow events to Kafka (acked)", "events/s", "ratio"),
             ("   xdpwatch producer code", f"{e['xdpwatch']['events_per_s']:,}", f"{e['xdpwatch']['flow_path']} flow path"),
             ("   bare confluent-kafka, same lines", f"{e['bare_confluent_kafka']['events_per_s']:,}",
              f"xdpwatch ÷ bare {e['ratio_to_bare']:.2f}×"),
             ("   bare, same lines and headers", f"{e['bare_with_headers']['events_per_s']:,}",
              f"xdpwatch ÷ bare {e['ratio_to_bare_with_headers']:.2f}×"),
             ("   naive code, same documents (json.dumps…)", f"{e['naive_pipeline']['events_per_s']:,}",
              f"xdpwatch ÷ naive {e['ratio_to_naive']:.2f}×"),
             ("   where the time goes (% of loop)", "", ", ".join(f"{k} {v}" for k, v in e["profile_pct_of_loop"].items())),
             ("   at max rate, 64-page ring buffer", f"{e['loss_at_max_rate']['flows_generated']:,} flows",
              f"= {e['loss_at_max_rate']['ring_events_submitted']:,} events + "
              f"{e['loss_at_max_rate']['ring_drops_counted']:,} counted drops: "
              + ("exact" if e["loss_at_max_rate"]["ring_identity_holds"] else "MISMATCH")),
             ("   flow_start delivered (sweep recovers drops)", f"{e['loss_at_max_rate']['flow_starts_delivered']:,}",
              "nothing lost" if e["loss_at_max_rate"]["nothing_lost"] else "LOSS"),
             ("3. Counters", "", ""),
             ("   read all per-CPU counters", f"{c['read_all_counters_us']} µs", ""),
             ("   producer CPU, idle / at load", f"{c['producer_cpu_pct_idle']}% / {c['producer_cpu_pct_under_load']}%",
              f"load {c['load_pps_measured']:,} pps non-SSH"),
             ("4. Archive and replay", "events/s", ""),
             ("   archiver", f"{a['archiver']['events_per_s']:,}",
              f"{a['archiver']['mb_per_s']} MB/s; ÷ bare consume-to-file {a['ratio_to_bare']:.2f}×"),
             ("   bare consume-to-file", f"{a['bare_consume_to_file']['events_per_s']:,}",
              f"{a['bare_consume_to_file']['mb_per_s']} MB/s"),
             ("   replay to a null sink", f"{a['replay_to_null_events_per_s']:,}", ""),
             ("5. Memory", "", ""),
             (f"   producer RSS over {m['seconds']} s", f"{m['rss_mb_after_warmup']} → {m['rss_mb_end']} MB",
              f"{m['growth_after_warmup_pct']:+.1f}% after warm-up"),
             ("   flow table at its maximum", f"{m['flow_table_bytes_per_entry']} B/flow",
              ", ".join(f"{k} flows {v} MB" for k, v in m["flow_table_mb"].items())),
             ("6. Scaling: flows in the table", "events/s", "ns/packet existing flow, new flow; table read")]
    rows += [(f"   {p['flows_in_table']:,}", f"{p['events_per_s']:,}",
              f"{p['ns_existing_flow_packet']} ns, {p['ns_new_flow']} ns; {p['read_table_ms']} ms")
             for p in r["scaling"]["points"]]
    rs = r["restore"]
    rows += [("7. Restore of the control topic at start", "seconds", ""),
             (f"   {rs['commands']:,} commands, read and restored", f"{rs['restore_s']}",
              f"{rs['restore_per_s']:,}/s; {rs['blocks_applied']:,} blocks applied; RSS {rs['rss_mb_program_loaded']} MB "
              f"with the program loaded, peak {rs['peak_rss_mb']} MB"),
             ("   reading the topic alone (a separate pass)", f"{rs['read_only_s']}", f"{rs['read_per_s']:,}/s")]
    al = r["alert_state"]
    rows += [(f"8. Alert consumer, {al['sources']:,} sources in one window", "events/s", "RSS"),
             ("   flow_start + flow_established per source", f"{al['events_per_s']:,}",
              f"{al['rss_mb_start']} → {al['rss_mb_max']} MB (max); {al['sources_evicted']:,.0f} sources evicted "
              "at the 100,000 cap")]
    sc, ab, ar = r["spool_check"], r["alert_vs_bare"], r["alert_restart"]
    rows += [("9. Producer start check of its spool", "seconds", "ratio"),
             (f"   {sc['spooled_events']:,} spooled, read back {sc['topic_messages']:,}", f"{sc['check']['seconds']}",
              f"found {sc['check']['found']:,} of {sc['check']['events_checked']:,} in Kafka; "
              f"{sc['check']['messages_read_per_s']:,} messages/s; ÷ bare read {sc['ratio_to_bare']:.2f}×"),
             (f"   bare consumer reading the {sc['topic_messages']:,}", f"{sc['bare_read']['seconds']}",
              f"{sc['bare_read']['messages_per_s']:,} messages/s"),
             (f"10. Alert consumer vs bare loops, {ab['events']:,} events", "events/s", "ratio"),
             ("   xdpwatch alert (default rules, --output file)", f"{ab['alert']['events_per_s']:,}",
              f"{ab['alert']['alerts']} alerts"),
             ("   bare loop, orjson per message", f"{ab['bare_parse']['events_per_s']:,}",
              f"alert ÷ bare {ab['ratio_to_bare']:.2f}×"),
             ("   bare loop, orjson + schemas.is_valid", f"{ab['bare_parse_validate']['events_per_s']:,}",
              f"alert ÷ bare+validation {ab['ratio_to_bare_validated']:.2f}×"),
             (f"11. Alert consumer restart, {ar['events']:,} events", "seconds", ""),
             ("   state rebuild", f"{ar['rebuild_seconds']}",
              f"{ar['events_reread']:,.0f} events re-read, {ar['alerts_read_back']} alerts read back "
              f"({ar['alerts_first_run']:.0f} raised), {ar['alerts_published_again']:.0f} published again"),
             ("   process start to the rebuild log line", f"{ar['start_to_rebuild_line_s']}",
              "start-up, group join, rebuild")]
    ifs = r["interfaces"]["by_count"]
    rows += [("12. One producer, many interfaces", "start s", "RSS")]
    rows += [(f"   {n} interface{'s' if n != '1' else ''}", f"{v['start_s']}", f"{v['rss_mb']} MB")
             for n, v in ifs.items()]
    pk, bf = r["packet_to_kafka"], r["bruteforce_to_block"]
    rows += [("13. Latency", "p50 / p99 ms", "")]
    rows += [(f"   packet on the veth -> flow_start acked, {k.split('_')[0]}/s new flows",
              f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f}",
              f"max {v['max_ms']:.1f} ms; {v['flow_starts']:,} of {v['flows']:,} flow_starts; "
              f"sent at {v['sent_per_s']:,}/s")
             for k, v in pk.items()]
    bc = bf["by_connections"]
    rows += [("   last failed login -> block (ssh_auth_failures)", f"{bf['seconds']:.3f} s",
              f"{bf['refused_logins']} refused logins, counted at flow_end: producer's FIN linger "
              f"{bf['fin_linger_s']} s; block command acknowledged after {bf['to_command_acked_s']:.3f} s"),
             ("   10th connection -> block (ssh_bruteforce)", f"{bc['seconds']:.3f} s",
              f"counted at flow_established; block command acknowledged after {bc['to_command_acked_s']:.3f} s")]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small counts, every figure")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--restore-child", nargs=2, metavar=("BOOTSTRAP", "TOPIC"), help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=None,
                    help="runs of each figure, the median printed with min-max (default 3; 1 with --quick)")
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    if args.restore_child:
        print(orjson.dumps(restore_child(*args.restore_child)).decode())
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (loads XDP programs, creates namespaces)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
              "runs": runs, "machine": machine()}
    every: dict[str, list[dict]] = {}
    started = time.monotonic()
    for i in range(runs):  # each run on a broker of its own: topics and groups start empty
        one: dict[str, dict] = {}
        broker = Broker()
        try:
            for name, fn in (("xdp_cost", lambda: xdp_cost(args.quick)),
                             ("events_to_kafka", lambda: events_to_kafka(broker, args.quick)),
                             ("archive_replay", lambda: archive_and_replay(broker, one["events_to_kafka"]["xdpwatch"]["delivered"])),
                             ("counters", lambda: counters_and_cpu(broker, args.quick)),
                             ("scaling", lambda: scaling(broker, args.quick)),
                             ("memory", lambda: memory(broker, args.quick)),
                             ("restore", lambda: restore_at_start(broker, args.quick)),
                             ("alert_state", lambda: alert_sources(broker, args.quick)),
                             ("spool_check", lambda: spool_check(broker, args.quick)),
                             ("alert_vs_bare", lambda: alert_vs_bare(broker, args.quick)),
                             ("alert_restart", lambda: alert_restart(broker, args.quick)),
                             ("packet_to_kafka", lambda: packet_to_kafka(broker, args.quick)),
                             ("bruteforce_to_block", lambda: bruteforce_to_block(broker, args.quick)),
                             ("interfaces", lambda: interfaces(args.quick))):
                t0 = time.monotonic()
                print(f"bench: run {i + 1} of {runs}: {name} ...", file=sys.stderr, flush=True)
                one[name] = fn()
                every.setdefault(name, []).append(one[name])
                print(f"bench: run {i + 1} of {runs}: {name} done in {time.monotonic() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        finally:
            broker.stop()
    result["seconds"] = round(time.monotonic() - started)
    result.update({name: median_of(rs) for name, rs in every.items()})
    result["targets"] = targets(every)
    result["every_run"] = every
    plot(result["scaling"], args.out / "scaling.png")
    text = table(result) + "\n\n" + targets_table(result["targets"])
    print(text)
    stamp = result["when"].replace(":", "").replace("-", "")
    for name in ("latest.json", f"{'quick-' if args.quick else ''}{stamp}.json"):
        (args.out / name).write_bytes(orjson.dumps(result, default=float, option=orjson.OPT_INDENT_2))
    (args.out / "latest.txt").write_text(text + "\n")
    print(f"\nresults: {args.out / 'latest.json'}, plot: {args.out / 'scaling.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
