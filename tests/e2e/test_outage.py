"""Kafka outages, end to end: the real XDP program on a veth, `xdpwatch produce`, and a
Tansu broker whose storage outlives its process (S3 on a local moto server), so it can be
stopped or killed with SIGKILL and started again. Nothing may be lost or duplicated: events
wait in librdkafka's queue, then in the on-disk spool, and are sent once the broker is back.

The broker stays down 6 s (`make test-soak`: 60 s).
"""

from __future__ import annotations

import collections
import subprocess
import time

import orjson
import pytest

from xdpwatch.producer.exporter import KafkaExporter
from xdpwatch.producer.spool import Spool

from .env import SOAK, consume_all, documents, wait_for
from .procs import XDPWATCH, ProducerProc

pytestmark = pytest.mark.e2e

COUNTS, FLOWS = "xdpwatch.packet-counts", "xdpwatch.ssh-flows"
OUTAGE_S = 10 if SOAK else 6
ROUNDS = range(20 if SOAK else 1)  # `make test-soak`: each outage test 20 times in a row
QUEUE = 40  # librdkafka's local queue, in events: small, so that the outage overflows it


@pytest.mark.parametrize("round_", ROUNDS)
@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_broker_outage_loses_and_duplicates_nothing(testnet, broker_factory, tmp_path, how, round_):
    """The broker goes away mid-request: its answers stop first (a relay in front swallows
    them while its requests still reach it), then it is stopped or killed, with produce
    requests outstanding. (Killing Tansu while it writes a batch to S3 loses that batch after
    acknowledging it, a broker fault no client can repair: the relay makes the requests
    outstanding without that.)"""
    from .env import Front

    front = Front()
    broker = broker_factory(durable=True, advertise=front.port, port=front.target)
    net = testnet
    args = ["--iface", net.iface, "--bootstrap-servers", f"127.0.0.1:{front.port}", "--interval", "0.2",
            "--flow-idle-timeout", "600", "-X", f"queue.buffering.max.messages={QUEUE}",
            "-X", "reconnect.backoff.max.ms=500"]
    sports = iter(range(20000, 30000))
    sent = []

    def send(n: int) -> None:
        batch = [next(sports) for _ in range(n)]
        net.send_frames(net.ssh_syns(batch))
        sent.extend(batch)

    with ProducerProc(*args, spool_dir=tmp_path / "spool") as producer:
        producer.wait_attached()
        send(30)
        time.sleep(1)
        front.mute()
        send(20)  # requests in flight: they reach the broker, their answers do not come back
        time.sleep(0.5)
        broker.kill() if how == "kill -9" else broker.stop_process()
        down_at = time.monotonic()
        while time.monotonic() - down_at < OUTAGE_S:  # flows and intervals keep coming
            send(50)
            time.sleep(1)
        producer.wait_for_log("spooling to", timeout=5)
        assert list((tmp_path / "spool").glob("*.spool")), "the outage overflowed into the spool"
        broker.start()
        front.unmute()
        send(30)
        producer.wait_for_log("spool drained", timeout=60)
        rc = producer.stop()
    assert rc == 0, producer.stderr
    try:
        flows = documents(broker, FLOWS, min_messages=2 * len(sent))  # the broker advertises the relay
        counts = [d for _, d in documents(broker, COUNTS)]
    finally:
        front.close()
    s = producer.summary()["events"]
    assert s["produced"] == s["delivered"] and s["failed"] == s["undelivered"] == s["spooled"] == s["dropped"] == 0, s
    assert not list((tmp_path / "spool").glob("*.spool"))

    ids = [d["event"]["id"] for _, d in flows] + [d["event"]["id"] for d in counts]
    assert len(ids) == len(set(ids)) == s["delivered"], "each event exactly once in Kafka"
    per_flow = collections.defaultdict(list)
    for _, d in flows:  # in partition order; one flow's events share a key, so a partition
        per_flow[d["source"]["port"]].append(d["event"]["action"])
    assert set(per_flow) == set(sent)
    assert all(actions == ["flow_start", "flow_end"] for actions in per_flow.values())
    assert sum(d["packets"]["total"] for d in counts) == sum(d["packets"]["ssh"] for d in counts) == len(sent)
    assert sum(d["flows"]["started"] for d in counts) == len(sent)
    assert sum(d["drops"]["ringbuf"] for d in counts) == 0
    spooled = int(next(line for line in producer.stderr_lines if "spooling to" in line).split("(")[1].split()[0])
    print(f"\n[{how}] broker down {OUTAGE_S:.0f}s: {len(sent)} flows, {s['delivered']} events "
          f"({len(counts)} intervals), spooled after {spooled} queued; each exactly once")


@pytest.mark.parametrize("round_", ROUNDS)
def test_stop_while_the_broker_is_down_spools_for_the_next_start(testnet, broker_factory, tmp_path, round_):
    """The broker goes away; SIGTERM waits at most --shutdown-timeout, writes what Kafka did
    not take to the spool, says so, exits 3. The next start sends it first."""
    spool = tmp_path / "spool"
    broker = broker_factory(durable=True)
    args = ["--iface", testnet.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.3",
            "--shutdown-timeout", "3"]
    with ProducerProc(*args, spool_dir=spool) as producer:
        producer.wait_attached()
        time.sleep(1.0)
        broker.stop_process()
        time.sleep(1.5)  # intervals keep being produced into the local queue
        stopped_at = time.monotonic()
        rc = producer.stop(timeout=30)
    assert time.monotonic() - stopped_at < 15
    assert rc == 3, producer.stderr
    first = producer.summary()["events"]
    assert first["spooled"] > 0 and first["failed"] == first["undelivered"] == first["dropped"] == 0, first
    assert first["produced"] == first["delivered"]  # what Kafka never took is not counted as produced
    assert producer.stderr_lines[-1] == (
        f"xdpwatch: error: Kafka did not take every event before the shutdown timeout: {first['spooled']} wait "
        f"in the spool {spool} and are sent first at the next start")

    broker.start()
    with ProducerProc(*args, spool_dir=spool) as producer:
        producer.wait_attached()
        producer.wait_for_log("spool drained", timeout=30)
        rc = producer.stop()
    assert rc == 0, producer.stderr
    assert f"holds {first['spooled']} events from an earlier run" in producer.stderr
    second = producer.summary()["events"]
    counts = [d for _, d in documents(broker, COUNTS)]
    assert len(counts) == first["delivered"] + second["delivered"]  # the second run sent the spooled ones
    assert len({d["event"]["id"] for d in counts}) == len(counts)
    assert sum(1 for d in counts if d["interval"].get("final")) == 2  # one per run: the first one's was spooled
    assert not list(spool.glob("*.spool"))


def test_without_a_spool_overflow_is_dropped_and_counted(testnet, broker_factory):
    broker = broker_factory()
    args = ["--iface", testnet.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.05",
            "--spool-max-mb", "0", "--shutdown-timeout", "1", "-X", "queue.buffering.max.messages=5"]
    with ProducerProc(*args) as producer:
        producer.wait_attached()
        broker.stop()
        wait_for(lambda: any("event dropped" in line for line in producer.stderr_lines), 10, "a drop")
        rc = producer.stop()
    assert rc == 3, producer.stderr
    s = producer.summary()["events"]
    assert s["dropped"] > 0 and s["spooled"] == 0
    assert "no spool (--spool-max-mb 0)" in producer.stderr
    assert producer.stderr_lines[-1].startswith(
        f"xdpwatch: error: {s['dropped'] + s['undelivered']} of {s['produced'] + s['dropped']} events were not delivered")


def test_an_unusable_spool_directory_is_a_clear_error(testnet, broker_factory):
    broker = broker_factory()
    r = subprocess.run([XDPWATCH, "produce", "--iface", testnet.iface, "--bootstrap-servers", broker.bootstrap,
                        "--spool-dir", "/proc/xdpwatch-spool"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "xdpwatch: error: cannot use spool directory /proc/xdpwatch-spool (No such file or directory): choose "
        "another with --spool-dir, or run without a spool with --spool-max-mb 0")


def test_a_burst_bigger_than_the_local_queue_needs_no_spool_while_the_broker_is_up(broker_factory, tmp_path):
    """One turn of the run loop can hand over a whole ring buffer of events at once. With
    the broker up they go to Kafka, not to disk: the exporter serves acknowledgements as it
    produces, so librdkafka's queue (here 10,000 events) frees up during the burst. Each
    event takes 10 µs, about the producer's own work per event; before, 2/3 of this burst
    went through the spool."""
    broker = broker_factory()
    exporter = KafkaExporter({"bootstrap.servers": broker.bootstrap, "queue.buffering.max.messages": "10000"}, "burst")
    exporter.ensure_topics(3, 1)
    spool = Spool(tmp_path / "spool", 1 << 30)
    exporter.use_spool(spool)
    n = 30_000
    overflowed = 0
    for i in range(n):  # no exporter.poll() in between, as within one turn
        busy_until = time.perf_counter() + 10e-6
        while time.perf_counter() < busy_until:
            pass
        exporter.export("ssh-flows", b"k%d" % (i % 7), b'{"i":%d}' % i)
        overflowed = max(overflowed, len(spool))
    stats = exporter.close(30)
    assert overflowed <= n // 10  # the burst (almost) bypassed the disk...
    assert (stats.delivered, stats.failed, stats.dropped, stats.spooled) == (n, 0, 0, 0)  # ...and all arrived
    values = sorted(int(orjson.loads(m.value)["i"]) for m in consume_all(broker.bootstrap, "burst.ssh-flows"))
    assert values == list(range(n))


def test_a_corrupt_spool_never_fails_the_start(testnet, broker_factory, tmp_path):
    """A spool damaged between runs: a `*.spool` file whose name is not a number, a record
    whose stream name is not UTF-8, a header announcing a 4 GiB value. The producer starts,
    says what it skipped, and delivers every valid spooled event exactly once (the broker
    checks each against its schema); what is not a segment stays where it was."""
    from xdpwatch import schemas
    from xdpwatch.producer import spool as spool_mod

    # Real events to spool: a producer's own interval records, printed on stdout.
    with ProducerProc("--iface", testnet.iface, "--output", "stdout", "--interval", "0.2") as p:
        p.wait_attached()
        time.sleep(1.5)
        assert p.stop() == 0, p.stderr
        values = p.proc.stdout.read().splitlines()
    assert len(values) >= 5
    spooled = [("packet-counts", schemas.key_of("packet-counts", orjson.loads(v)), v) for v in values]
    valid, last = spooled[:-1], spooled[-1]

    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    bad_stream = spool_mod._HEADER.pack(2, 0xFFFF, 3) + b"\xff\xfe" + b"bad"
    absurd = spool_mod._HEADER.pack(13, 0xFFFF, 0xFFFFFFFF) + b"packet-counts"
    encode = lambda recs: b"".join(spool_mod._encode(*r) for r in recs)  # noqa: E731
    half = len(valid) // 2
    (spool / "001000000000.spool").write_bytes(encode(valid[:1]) + bad_stream + encode(valid[1:half]))
    (spool / "001000000001.spool").write_bytes(encode(valid[half:]) + absurd + b"x" * 100)
    (spool / "copy of 001000000000.spool").write_bytes(encode([last]))  # not a segment: never sent
    (spool / "README").write_text("not the spool's")

    broker = broker_factory(value_schemas={COUNTS: schemas.load("packet-counts"), FLOWS: schemas.load("ssh-flows")})
    with ProducerProc("--iface", testnet.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.3",
                      spool_dir=spool) as producer:
        producer.wait_attached()
        producer.wait_for_log("spool drained", timeout=30)
        rc = producer.stop()
    assert rc == 0, producer.stderr
    err = producer.stderr
    assert "copy of 001000000000.spool is not a spool segment" in err and "move it out of the spool directory" in err
    assert "001000000000.spool holds records whose stream name is not UTF-8" in err
    assert "001000000001.spool: a record header is corrupt" in err
    assert f"holds {len(valid) + 2} events from an earlier run" in err  # two found bad when read
    assert "Traceback" not in err

    ids = collections.Counter(d["event"]["id"] for _, d in documents(broker, COUNTS))
    assert all(ids[orjson.loads(v)["event"]["id"]] == 1 for _, _, v in valid)
    assert ids[orjson.loads(last[2])["event"]["id"]] == 0
    assert sum(ids.values()) == len(ids) == producer.summary()["events"]["delivered"]  # spooled + this run's own, once each
    assert sorted(p.name for p in spool.iterdir()) == ["README", "copy of 001000000000.spool"]
    print(f"\n{len(valid)} valid spooled events delivered once; skipped: 1 file, 1 record, 1 unreadable tail")


@pytest.mark.parametrize("round_", ROUNDS)
def test_events_whose_acknowledgement_was_lost_are_not_sent_twice(testnet, broker_factory, tmp_path, round_):
    """The broker stores what the producer sends but its answers are lost (a relay in front
    swallows them, as when a broker dies mid-request); the producer is stopped, and what Kafka
    never acknowledged goes to the spool. The next start finds those events in Kafka by their
    event.id and does not send them again: every interval record once. (Once in four runs a
    broker killed mid-request gave this: 28 records in Kafka for 27 delivered.)"""
    from .env import Front

    front = Front()
    broker = broker_factory(advertise=front.port, port=front.target)
    spool = tmp_path / "spool"
    args = ["--iface", testnet.iface, "--bootstrap-servers", f"127.0.0.1:{front.port}", "--interval", "0.2",
            "--shutdown-timeout", "3"]
    try:
        with ProducerProc(*args, spool_dir=spool) as producer:
            producer.wait_attached()
            time.sleep(1.0)
            front.mute()  # from now on every record reaches the broker, no acknowledgement comes back
            time.sleep(2.0)
            rc = producer.stop(timeout=30)
        assert rc == 3, producer.stderr
        first = producer.summary()["events"]
        assert first["spooled"] >= 5, first  # the muted intervals, and the final one
        front.unmute()
        with ProducerProc(*args, spool_dir=spool) as producer:
            producer.wait_attached()
            producer.wait_for_log("spool drained", timeout=30)
            rc = producer.stop()
        assert rc == 0, producer.stderr
        counts = [d for _, d in documents(broker, COUNTS)]  # the broker advertises the relay: read through it
    finally:
        front.close()
    second = producer.summary()["events"]
    ids = collections.Counter(d["event"]["id"] for d in counts)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    # Some reached the broker (up to librdkafka's requests in flight), the rest waited in its queue.
    assert 1 <= second["already_in_kafka"] < first["spooled"]
    assert len(counts) == first["delivered"] + second["already_in_kafka"] + second["delivered"]
    assert sum(1 for d in counts if d["interval"].get("final")) == 2
    print(f"\n[lost acknowledgements] {first['spooled']} events spooled unacknowledged; {second['already_in_kafka']} of them "
          f"found in Kafka at the next start and not sent again; {len(counts)} records, each once")
