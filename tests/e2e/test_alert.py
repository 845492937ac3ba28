"""`xdpwatch alert` as a subprocess against the real broker: exact alerts, poison
messages dead-lettered with their bytes, offsets committed (no repeat on restart), and
hostile input (counts meant to spin, documents meant to crash or stall validation, 300,000
sources in one window) that neither stops the consumer nor grows its memory."""

from __future__ import annotations

import base64
import copy
import subprocess
import threading
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from xdpwatch import schemas
from xdpwatch.producer.events import Clock, EventShaper
from xdpwatch.producer.flows import FlowReport
from xdpwatch.producer.records import FlowKey, FlowValue, Handshake

from .env import free_port, scrape, wait_for
from .procs import XDPWATCH, XdpwatchProc

pytestmark = pytest.mark.e2e

S = 10**9


class FixedClock(Clock):
    def resync(self):
        self._offset = 1_800_000_000 * S


def shaped(src: str, n: int, spacing_s: float, *actions: str) -> list[tuple[bytes, dict]]:
    """n flows from `src`, one every `spacing_s` s of event time, each reported with `actions`
    by the producer's own EventShaper: flow_start as its SYN arrived (tcp.handshake "syn"),
    flow_established once its handshake completed ("complete")."""
    shaper = EventShaper("eth0", FixedClock(), hostname="gw1")
    out = []
    for i in range(n):
        k = FlowKey(family=4, proto=6, client_port=40000 + i, server_port=22)
        k.client_addr[:4] = list(map(int, src.split(".")))
        k.server_addr[:4] = [192, 0, 2, 1]
        t = int(i * spacing_s * S)
        for action in actions:
            done = action != "flow_start"
            v = FlowValue(first_ns=t, last_ns=t, packets=3 if done else 1, bytes=200 if done else 74,
                          tcp_flags=0x12 if done else 0x02, directions=1,
                          handshake=Handshake.COMPLETE if done else Handshake.SYN)
            doc = shaper.flow(FlowReport(action, None, k, v))
            out.append((schemas.key_of("ssh-flows", doc), doc))
    return out


def flow_starts(src: str, n: int, spacing_s: float) -> list[tuple[bytes, dict]]:
    """n SYNs arriving (what a spoofer can send): flow_start only."""
    return shaped(src, n, spacing_s, "flow_start")


def connections(src: str, n: int, spacing_s: float) -> list[tuple[bytes, dict]]:
    """n connections whose handshakes completed: flow_start then flow_established, each."""
    return shaped(src, n, spacing_s, "flow_start", "flow_established")


def alert_cmd(broker, dead_letter, *extra):
    return [XDPWATCH, "alert", "--bootstrap-servers", broker.bootstrap, "--from-beginning", "--output", "stdout",
            "--dead-letter", str(dead_letter), "--exit-when-idle", "4", "--group-id", "it-alert",
            "-X", "session.timeout.ms=6000", *extra]


def test_alerts_dead_letters_and_committed_offsets(broker_factory, tmp_path):
    broker = broker_factory()
    p = Producer({"bootstrap.servers": broker.bootstrap})
    attacker = connections("203.0.113.9", 12, 1.0)   # 12 in 11 s: one brute-force alert
    slow = connections("198.51.100.3", 8, 20.0)      # 8 over 140 s: none
    spoofed = flow_starts("198.51.100.4", 12, 1.0)   # 12 SYNs, no handshake: none (and no SYN flood: < 20)
    for key, doc in attacker + slow + spoofed:
        p.produce("xdpwatch.ssh-flows", orjson.dumps(doc), key)
    good = attacker[0][1]
    poison = [b"\xff not json", orjson.dumps({"event": {"action": "flow_start"}}),
              b"[" * 5000 + b"]" * 5000,                                          # nesting beyond the limit
              orjson.dumps({**good, "pad": "x" * 300_000}),                        # huge
              orjson.dumps({**good, "source": {"ip": "203.0.113.9", "port": "22"}}),  # wrong type
              None]                                                                # tombstone
    for raw in poison:
        p.produce("xdpwatch.ssh-flows", raw, b"x")
    assert p.flush(10) == 0

    dl = tmp_path / "dead.jsonl"
    r = subprocess.run(alert_cmd(broker, dl), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    alerts = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [a["rule"]["name"] for a in alerts] == ["ssh_bruteforce"]
    a = alerts[0]
    assert schemas.errors("alerts", a) == []
    assert a["source"]["ip"] == "203.0.113.9" and a["xdpwatch"]["evidence"]["count"] == 10
    assert a["xdpwatch"]["evidence"]["first_event_id"] == attacker[1][1]["event"]["id"]   # established 0
    assert a["xdpwatch"]["evidence"]["last_event_id"] == attacker[19][1]["event"]["id"]   # established 9
    assert "52 events handled, 1 alerts, 6 dead-lettered" in r.stderr

    dead = [orjson.loads(line) for line in dl.read_text().splitlines()]
    assert [d["reason"].split(":")[0] for d in dead] == ["not-json", "schema", "not-json", "too-large",
                                                         "schema", "empty"]
    assert [d["value"] and base64.b64decode(d["value"]) for d in dead] == poison
    assert all(d["topic"] == "xdpwatch.ssh-flows" for d in dead)

    # Same group again: everything was committed, nothing is raised or dead-lettered twice.
    r2 = subprocess.run(alert_cmd(broker, dl), capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and r2.stdout == "", r2.stderr
    assert len(dl.read_text().splitlines()) == 6


def test_bad_rules_file_is_one_line(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[ssh_bruteforce]\nthreshhold = 3\n")
    r = subprocess.run([XDPWATCH, "alert", "--bootstrap-servers", "127.0.0.1:1", "--rules", str(rules)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"xdpwatch: error: {rules}: [ssh_bruteforce] has no setting 'threshhold' "
                                "(known: enabled, threshold, window, cooldown)")


# ---------------------------------------------------------------- hostile input
FLOWS = "xdpwatch.ssh-flows"
N_SOURCES = 300_000


def create_topic(broker, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})  # kept alive until the result
    admin.create_topics([NewTopic(FLOWS, partitions, 1)])[FLOWS].result(10)


def flow_end(src: str, failures, n: int = 0) -> dict:
    """A flow_end with refused logins, handshake complete; `failures` as given (even invalid)."""
    start = flow_starts(src, n + 1, 1.0)[n][1]
    doc = copy.deepcopy(start)
    doc["event"].update(action="flow_end", type=["connection", "end"], reason="fin")
    doc["tcp"]["handshake"] = "complete"
    doc["ssh"] = {"auth": {"outcome": "failure", "failures": failures}}
    return doc


def template(doc: dict) -> tuple[bytes, bytes, bytes]:
    """`doc` serialized once, cut around its event id and source IP: (head, middle, tail)."""
    raw = orjson.dumps({**doc, "event": {**doc["event"], "id": "@ID@"}, "source": {**doc["source"], "ip": "@IP@"}})
    head, rest = raw.split(b"@ID@")
    middle, tail = rest.split(b"@IP@")
    return head, middle, tail


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_hostile_messages_and_300k_sources_neither_stop_nor_grow_the_consumer(broker_factory, tmp_path):
    broker = broker_factory()
    create_topic(broker, 3)
    port = free_port()
    dl, out = tmp_path / "dead.jsonl", tmp_path / "alerts.jsonl"
    offsets: dict[int, int] = {}  # partition -> next offset, from the delivery reports

    def delivered(err, msg):
        assert err is None, err
        offsets[msg.partition()] = max(offsets.get(msg.partition(), 0), msg.offset() + 1)

    # Uncompressed: messages that differ only in IP and id compress 140x (real flow events
    # 12x), and librdkafka bounds its prefetch in compressed bytes (README: Raise alerts).
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20, "queue.buffering.max.messages": 1_000_000})
    deep = b"[" * 300 + b"]" * 300  # deeper than orjson serializes: spliced in as bytes
    hostile = [
        orjson.dumps(flow_end("203.0.113.7", 2**62)),  # spun forever in a loop per failure; now invalid
        orjson.dumps(flow_end("203.0.113.7", 3.0, 1)),  # valid (3.0 is an integer); crashed range()
        orjson.dumps(flow_end("203.0.113.7", 3.0, 2)),  # with the one before: 6 refused logins, one alert
        # jsonschema-rs raised ValueError comparing two deep items for uniqueItems: the consumer died
        orjson.dumps({**flow_end("203.0.113.8", 1), "tcp": {"flags": "@"}}).replace(b'"@"', b"[%s,%s]" % (deep, deep)),
        # 20,000 distinct objects: reporting the error compared them pairwise (minutes of CPU)
        orjson.dumps({**flow_end("203.0.113.8", 1), "tcp": {"flags": [{"a": i} for i in range(20_000)]}}),
    ]
    for raw in hostile:
        p.produce(FLOWS, raw, b"203.0.113.7", on_delivery=delivered)
    assert p.flush(20) == 0

    argv = ["--bootstrap-servers", broker.bootstrap, "--from-beginning", "--output", str(out), "--dead-letter",
            str(dl), "--group-id", "it-hostile", "-X", "session.timeout.ms=6000", "--metrics-port", str(port)]
    with XdpwatchProc("alert", *argv) as proc:
        def counted(handled: int, dead: int):
            def check():
                m = scrape(port)
                if proc.proc.poll() is not None:
                    raise AssertionError(f"alert exited {proc.proc.returncode}:\n{proc.stderr}")
                return m if (m.get('xdpwatch_consumer_messages_total{command="alert",outcome="handled"}') == handled
                             and m.get('xdpwatch_consumer_messages_total{command="alert",outcome="dead_lettered"}')
                             == dead) else None
            return check

        wait_for(counted(2, 3), 60, "the hostile messages: 2 handled, 3 dead-lettered", interval=0.2)
        before = rss_mb(proc.proc.pid)

        # 300,000 sources at one instant of event time (one window of every rule), half with a
        # flow_start (a SYN: spoofable), half with a flow_established (a completed handshake),
        # pre-serialized: only the source IP and event id vary.
        start, est = (doc for _, doc in connections("10.0.0.1", 1, 1.0))
        parts = [template(start), template(est)]
        for i in range(1, N_SOURCES + 1):
            ip = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}".encode()
            head, middle, tail = parts[i % 2]
            while True:
                try:
                    p.produce(FLOWS, b"".join((head, b"s%d" % i, middle, ip, tail)), ip, on_delivery=delivered)
                    break
                except BufferError:
                    p.poll(0.05)
            if i % 10_000 == 0:
                p.poll(0)
        assert p.flush(60) == 0
        m = wait_for(counted(2 + N_SOURCES, 3), 600, "300,002 handled", interval=0.5)
        after = rss_mb(proc.proc.pid)
        assert proc.proc.poll() is None  # alive
        assert proc.stop() == 0, proc.stderr  # SIGTERM: a clean stop commits
    print(f"\n[hostile] alert consumer RSS {before:.1f} MB before, {after:.1f} MB after 300,000 sources "
          f"in one window: +{after - before:.1f} MB")
    assert after - before < 400

    # 300,001 sources (one event each) through a cap of 100,000: the least recently active were
    # dropped, and counted.
    assert m['xdpwatch_alert_sources_evicted_total{command="alert"}'] == N_SOURCES + 1 - 100_000
    # The only alert: the 6 refused logins. No source of the flood alerted (one connection each).
    alerts = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [(a["rule"]["name"], a["source"]["ip"], a["xdpwatch"]["evidence"]["count"]) for a in alerts] == [
        ("ssh_auth_failures", "203.0.113.7", 6)]
    dead = [orjson.loads(line) for line in dl.read_bytes().splitlines()]
    assert [base64.b64decode(d["value"]) for d in dead] == [hostile[0], hostile[3], hostile[4]]
    assert dead[0]["reason"] == "schema: ssh/auth/failures: 4611686018427387904 is greater than the maximum of 7"
    assert all(d["reason"].startswith("schema: tcp/flags") and len(d["reason"]) < 1000 for d in dead[1:]), dead

    # Every offset committed at the clean stop: the group is at the end of every partition, as
    # the broker's acknowledgements place it. (Tansu's high watermarks cannot be the reference:
    # after 300,000 acknowledged messages they stayed ~1% short, 30 s on, while a reader got
    # every message up to the acknowledged end.)
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "it-hostile"})
    try:
        committed = {tp.partition: tp.offset for tp in c.committed([TopicPartition(FLOWS, q) for q in range(3)], 10)}
    finally:
        c.close()
    assert sum(offsets.values()) == N_SOURCES + len(hostile)
    assert committed == offsets


class Crashy:
    """A handler that raises on some documents: anything else, or a ConsumerError (its output
    failing), after `fail_after` documents."""

    def __init__(self, fail_after: int | None = None):
        self.seen: list[str] = []
        self.fail_after = fail_after

    def handle(self, ev) -> None:
        from xdpwatch.consumers.errors import ConsumerError

        if self.fail_after is not None and len(self.seen) == self.fail_after:
            raise ConsumerError("cannot write an alert: disk full")
        if (ev.doc["source"]["port"] - 40000) % 3 == 0:
            raise KeyError("x" * 5000)
        self.seen.append(ev.doc["event"]["id"])

    def close(self) -> None:
        pass


class ListDeadLetter:
    def __init__(self):
        self.records: list[dict] = []

    def put(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


def test_a_message_that_breaks_the_handler_is_dead_lettered_and_the_loop_goes_on(broker_factory):
    from xdpwatch.consumers.base import LoopStats, consumer_conf, run_loop
    from xdpwatch.consumers.errors import ConsumerError

    broker = broker_factory()
    create_topic(broker, 1)
    docs = flow_starts("203.0.113.9", 9, 1.0)  # source ports 40000..40008: 3 of them break the handler
    p = Producer({"bootstrap.servers": broker.bootstrap})
    for key, doc in docs:
        p.produce(FLOWS, orjson.dumps(doc), key)
    assert p.flush(10) == 0

    def run(group: str, handler, dead) -> LoopStats:
        conf = consumer_conf({"bootstrap.servers": broker.bootstrap, "session.timeout.ms": "6000"}, group, True)
        return run_loop(conf, [FLOWS], handler, dead, threading.Event(), idle_exit_s=3, stats=LoopStats())

    def committed(group: str) -> int:
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
        try:
            return c.committed([TopicPartition(FLOWS, 0)], 10)[0].offset
        finally:
            c.close()

    handler, dead = Crashy(), ListDeadLetter()
    stats = run("it-crashy", handler, dead)
    assert handler.seen == [d["event"]["id"] for _, d in docs if (d["source"]["port"] - 40000) % 3]
    assert [r["offset"] for r in dead.records] == [0, 3, 6] and stats.dead_lettered == 3 and stats.handled == 6
    assert all(r["reason"].startswith("handler-error: KeyError: 'xxx") and len(r["reason"]) <= 1000
               for r in dead.records)
    assert stats.by_reason == {"handler-error": 3}
    assert committed("it-crashy") == 9

    # A ConsumerError is the handler's output failing: the loop stops, and nothing past the
    # last message handled is committed (offsets 0-2 done: 1 and 2 handled, 0 dead-lettered).
    with pytest.raises(ConsumerError, match="disk full"):
        run("it-broken", Crashy(fail_after=2), ListDeadLetter())
    assert committed("it-broken") == 3
