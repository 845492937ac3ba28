"""Exactly once for the alert consumer, end to end with the real broker: the alerts topic (and
the control topic, with --block-on) holds exactly the alerts of an uninterrupted run, each
once, whatever happens to the consumer: a SIGTERM in the middle of an attack, `kill -9` right
after an alert or a block is published, kills at random moments of a stream, one of two
consumers of a group killed.

"An uninterrupted run" is `xdpwatch alert --output stdout` over the same topics, in a group
of its own, from the beginning to the end: the reference every test compares with."""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import time

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from xdpwatch import schemas
from xdpwatch.producer.events import EventShaper
from xdpwatch.producer.flows import FlowReport
from xdpwatch.producer.records import DIR_TO_CLIENT, NR_COUNTERS, CounterId, FlowKey, FlowValue, Handshake

from .env import SOAK, LabError, consume_all, free_port, scrape, wait_for
from .procs import XDPWATCH, XdpwatchProc
from .test_alert import S, FixedClock, connections

pytestmark = pytest.mark.e2e

FLOWS, COUNTS, ALERTS, CONTROL = "xdpwatch.ssh-flows", "xdpwatch.packet-counts", "xdpwatch.alerts", "xdpwatch.control"


def create_topics(broker, partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(t, partitions, 1) for t in (FLOWS, COUNTS)]).values():
        f.result(10)


def produce(broker, events: list[tuple[bytes, dict]], topic: str = FLOWS) -> None:
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    for key, doc in events:
        p.produce(topic, orjson.dumps(doc), key, headers=schemas.headers(schemas.stream_of(topic)))
    assert p.flush(20) == 0


def intervals(rates: list[int], start_s: int = 0) -> list[tuple[bytes, dict]]:
    """Packet-count records of gw1/eth0, one a second from `start_s` (event time), with these
    packets per second."""
    shaper = EventShaper("eth0", FixedClock(), hostname="gw1")
    out = []
    for i, rate in enumerate(rates):
        delta = [(0, 0)] * NR_COUNTERS
        delta[CounterId.TOTAL] = delta[CounterId.IPV4] = delta[CounterId.UDP] = (rate, rate * 100)
        t = (1_800_000_000 + start_s + i) * S
        doc = shaper.packet_counts(t, t + S, delta, evicted=0, active=0)
        out.append((schemas.key_of("packet-counts", doc), doc))
    return out


class Alert(XdpwatchProc):
    """`xdpwatch alert` as under test: to Kafka, in group `group`, metrics on a port of its own."""

    def __init__(self, broker, tmp_path, group: str = "eos", *extra: str, env: dict | None = None):
        self.port = free_port()
        super().__init__("alert", "--bootstrap-servers", broker.bootstrap, "--from-beginning", "--output", "kafka",
                         "--group-id", group, "--dead-letter", str(tmp_path / "dl.jsonl"), "--metrics-port",
                         str(self.port), "-X", "session.timeout.ms=6000", *extra, env=env)

    def metric(self, name: str) -> float:
        return scrape(self.port).get(f'xdpwatch_{name}{{command="alert"}}', 0.0)

    def handled(self) -> float:
        return scrape(self.port).get('xdpwatch_consumer_messages_total{command="alert",outcome="handled"}', -1.0)

    def wait_handled(self, n: int, timeout: float = 60) -> None:
        def done():
            if self.proc.poll() is not None:
                raise AssertionError(f"alert exited {self.proc.returncode}:\n{self.stderr}")
            return self.handled() >= n
        wait_for(done, timeout, f"{n} events handled")


def reference(broker, tmp_path, *extra: str) -> list[dict]:
    """The alerts of an uninterrupted run over everything in the topics."""
    r = subprocess.run([XDPWATCH, "alert", "--bootstrap-servers", broker.bootstrap, "--from-beginning", "--output",
                        "stdout", "--group-id", f"reference-{time.monotonic_ns()}", "--dead-letter",
                        str(tmp_path / "dl-ref.jsonl"), "--exit-when-idle", "4", "-X", "session.timeout.ms=6000",
                        *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [orjson.loads(line) for line in r.stdout.splitlines()]


def published(broker, topic: str = ALERTS) -> list[dict]:
    docs = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, topic)]
    assert all(schemas.errors(schemas.stream_of(topic), d) == [] for d in docs)
    return docs


def ids(alerts: list[dict]) -> collections.Counter:
    return collections.Counter(a["event"]["id"] for a in alerts)


def test_a_restart_in_the_middle_of_an_attack_misses_nothing(broker_factory, tmp_path):
    """SIGTERM after 7 of 15 connections of a brute force, and after a baseline of 30
    intervals; a restart, the 8 other connections and a traffic spike: one ssh_bruteforce
    alert (threshold 10) and one traffic_spike alert, with the ids of an uninterrupted run.
    Without the rebuilt state, 7 + 8 never reach 10 and the baseline starts from nothing."""
    broker = broker_factory()
    create_topics(broker)
    attack = connections("203.0.113.9", 15, 1.0)  # flow_start + flow_established each
    produce(broker, attack[:14])
    produce(broker, intervals([100, 101, 99] * 10), COUNTS)
    with Alert(broker, tmp_path) as first:
        first.wait_handled(14 + 30)
        assert first.stop(signal.SIGTERM) == 0, first.stderr
    assert published(broker) == []

    with Alert(broker, tmp_path) as second:
        second.wait_for_log("rebuilt the state of", timeout=60)
        produce(broker, attack[14:])
        produce(broker, intervals([5000], start_s=30), COUNTS)
        second.wait_handled(16 + 1)
        rebuilt = second.metric("alert_events_reread_total")
        assert second.stop() == 0, second.stderr
    alerts = published(broker)
    assert sorted(a["rule"]["name"] for a in alerts) == ["ssh_bruteforce", "traffic_spike"]
    assert ids(alerts) == ids(reference(broker, tmp_path))
    brute = next(a for a in alerts if a["rule"]["name"] == "ssh_bruteforce")
    assert brute["xdpwatch"]["evidence"]["first_event_id"] == attack[1][1]["event"]["id"]  # the 1st connection
    assert rebuilt == 14 + 30
    print(f"\n[exactly once] SIGTERM after 7 of 15 connections and 30 intervals: rebuilt from {rebuilt:.0f} events; "
          f"after the restart {sorted(a['rule']['name'] for a in alerts)}, ids as an uninterrupted run")


RULES = """
[ssh_bruteforce]
threshold = 8
window = 10
cooldown = 15
[ssh_scan]
threshold = 5
window = 30
cooldown = 40
[ssh_auth_failures]
threshold = 5
window = 20
cooldown = 25
[traffic_spike]
enabled = false
"""


def attacks(seconds: float, sources: int = 20) -> list[tuple[float, bytes, dict]]:
    """Attacks from `sources` sources over `seconds` of event time, as (event time offset, key,
    document), in time order: each source connects every 0.4 to 1.7 s (a brute force, and a SYN
    flood for the fastest) to 2 to 7 servers (a scan for some), every third one's connections
    ending with a refused login. Deterministic."""
    shaper = EventShaper("eth0", FixedClock(), hostname="gw1")
    out = []
    for i in range(sources):
        period, servers = 0.4 + 0.07 * i, 2 + i % 6
        t, k = 0.13 * i, 0
        while t < seconds:
            key = FlowKey(family=4, proto=6, client_port=30000 + k, server_port=22)
            key.client_addr[:4] = [203, 0, 113, i + 1]
            key.server_addr[:4] = [192, 0, 2, 1 + k % servers]
            ns = int(t * S)
            for action, dt, hs, fails in (("flow_start", 0, Handshake.SYN, 0),
                                          ("flow_established", 0.001, Handshake.COMPLETE, 0),
                                          ("flow_end", 0.3, Handshake.COMPLETE, i % 3 == 0)):
                v = FlowValue(first_ns=ns, last_ns=ns + int(dt * S), packets=3, bytes=300, tcp_flags=0x12,
                              directions=1, handshake=hs, nsizes=6 + fails)
                v.server_sizes[:6 + fails] = [41, 1088, 1564, 44, 52, 52, 52][:6 + fails]
                banners = {DIR_TO_CLIENT: b"SSH-2.0-OpenSSH_9.2p1\r\n"} if action == "flow_end" else {}
                doc = shaper.flow(FlowReport(action, "fin" if action == "flow_end" else None, key, v, banners))
                out.append((t + dt, schemas.key_of("ssh-flows", doc), doc))
            t += period
            k += 1
    return sorted(out, key=lambda e: e[0])


class Stream:
    """Produces `events` paced by their event time (1 s of event time a second), counting
    what each partition holds (the ends that a consumer must commit)."""

    def __init__(self, broker, events):
        self.events, self.ends = events, {}
        self._p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        self._started = time.monotonic()
        self._next = 0

    def _delivered(self, err, msg):
        assert err is None, err
        self.ends[msg.partition()] = max(self.ends.get(msg.partition(), 0), msg.offset() + 1)

    def step(self) -> bool:
        """Produce what is due now; False once everything was produced and acknowledged."""
        due = time.monotonic() - self._started
        while self._next < len(self.events) and self.events[self._next][0] <= due:
            _, key, doc = self.events[self._next]
            self._p.produce(FLOWS, orjson.dumps(doc), key, on_delivery=self._delivered)
            self._next += 1
        self._p.poll(0)
        if self._next < len(self.events):
            return True
        assert self._p.flush(20) == 0
        return False


def committed(broker, group: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        return {tp.partition: tp.offset for tp in c.committed([TopicPartition(FLOWS, p) for p in range(3)], 10)}
    finally:
        c.close()


def check_exactly_once(broker, tmp_path, stream: Stream, group: str, *procs) -> tuple[list[dict], list[dict]]:
    try:
        wait_for(lambda: committed(broker, group) == stream.ends, 120, "the group to commit every offset", interval=1)
    except LabError:
        raise AssertionError(f"committed {committed(broker, group)}, ends {stream.ends}\n"
                             + "\n---\n".join(p.stderr for p in procs)) from None
    alerts, commands = published(broker), [d["command"] for d in published(broker, CONTROL)]
    ref = reference(broker, tmp_path, "--rules", str(tmp_path / "rules.toml"))
    assert ids(alerts) == ids(ref) and max(ids(alerts).values()) == 1
    blockable = {a["event"]["id"] for a in ref if a["rule"]["name"] in ("ssh_bruteforce", "ssh_scan")}
    assert collections.Counter(c["id"] for c in commands) == collections.Counter(f"alert-{i}" for i in blockable)
    return alerts, commands


def test_kill_9_at_any_moment_leaves_each_alert_and_block_once(broker_factory, tmp_path):
    """A 2-minute stream of attacks from 20 sources; the consumer is killed with SIGKILL right
    after it published an alert (before its offset was stored), right after it sent a block
    command, and at 5 random moments, and restarted each time."""
    broker = broker_factory()
    create_topics(broker)
    (tmp_path / "rules.toml").write_text(RULES)
    seconds = 240 if SOAK else 120
    stream = Stream(broker, attacks(seconds))
    rnd = random.Random(7)
    kills = sorted(rnd.uniform(10, seconds - 5) for _ in range(5))
    crashes = ["alert-published:3", "block-sent:2"]  # the first two instances kill themselves there
    args = ("--rules", str(tmp_path / "rules.toml"), "--block-on", "ssh_bruteforce", "--block-on", "ssh_scan",
            "--block-ttl", "1h", "--block-rate", "100000", "--block-max-active", "100000")
    started, lives = time.monotonic(), []

    def start() -> Alert:
        env = {"XDPWATCH_CRASH_AT": crashes.pop(0)} if crashes else {}
        lives.append(Alert(broker, tmp_path, "eos", *args, env=env))
        return lives[-1]

    proc = start()
    try:
        while stream.step() or proc.proc.poll() is not None:
            if proc.proc.poll() is not None:  # it killed itself at a crash point
                assert proc.proc.returncode == -signal.SIGKILL, proc.stderr
                proc = start()
            elif kills and time.monotonic() - started > kills[0]:
                kills.pop(0)
                proc.proc.kill()
                proc.proc.wait()
                proc = start()
            time.sleep(0.02)
        alerts, commands = check_exactly_once(broker, tmp_path, stream, "eos")
        assert proc.stop() == 0, proc.stderr
    finally:
        for p in lives:
            p.__exit__(None, None, None)
    suppressed = sum(p.stderr.count("is already published: not again") for p in lives)
    not_resent = sum(p.stderr.count("was already sent") for p in lives)
    assert not crashes and len(lives) == 8
    assert suppressed >= 1 and not_resent >= 1, "\n---\n".join(p.stderr for p in lives[:3])
    print(f"\n[exactly once] {len(stream.events)} events over {seconds}s, 7 kill -9: {len(alerts)} alerts and "
          f"{len(commands)} block commands, each once and as an uninterrupted run ({suppressed} alerts and "
          f"{not_resent} commands found already published after a kill)")


def test_two_consumers_of_a_group_one_killed_the_other_takes_over_exactly(broker_factory, tmp_path):
    """Two alert consumers share the 3 partitions of a stream of attacks; one is killed with
    SIGKILL mid-stream: the other takes its partitions over (after the group notices), rebuilds
    their state from the last committed offsets, and the alerts and blocks are those of an
    uninterrupted run, each once."""
    broker = broker_factory()
    create_topics(broker)
    (tmp_path / "rules.toml").write_text(RULES)
    seconds = 60
    stream = Stream(broker, attacks(seconds))
    args = ("--rules", str(tmp_path / "rules.toml"), "--block-on", "ssh_bruteforce", "--block-on", "ssh_scan",
            "--block-ttl", "1h", "--block-rate", "100000", "--block-max-active", "100000")
    with Alert(broker, tmp_path, "pair", *args) as a, Alert(broker, tmp_path, "pair", *args) as b:
        started, killed = time.monotonic(), False
        while stream.step():
            if not killed and time.monotonic() - started > 0.4 * seconds:
                assert a.handled() > 0 and b.handled() > 0, "both consumers had partitions"
                a.proc.kill()
                a.proc.wait()
                killed = True
            time.sleep(0.02)
        alerts, commands = check_exactly_once(broker, tmp_path, stream, "pair", b)
        assert b.stop() == 0, b.stderr
    taken_over = b.stderr.count("rebuilt the state of")
    assert taken_over >= 2  # its first assignment, and the partitions of the killed one
    print(f"\n[exactly once] two consumers, one killed at {0.4 * seconds:.0f}s of {seconds}s: {len(alerts)} alerts "
          f"and {len(commands)} block commands, each once and as an uninterrupted run")
