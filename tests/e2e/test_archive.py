"""`xdpwatch archive` as a subprocess against the real broker: exact segment contents (read
back with the real `zstdcat`), offsets committed only for durable segments, exactly once
across repeated `kill -9`, and a clear error on a full or read-only disk."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from xdpwatch.consumers.archive import Segment, list_segments

from .env import SOAK, consume_all, sh
from .procs import XDPWATCH, XdpwatchProc
from .test_alert import flow_starts

pytestmark = pytest.mark.e2e

TOPIC = "xdpwatch.ssh-flows"
GROUP = "it-archive"


def create_topic(broker, topic: str = TOPIC, partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(10)


def produce(broker, docs: list[tuple[bytes, dict]], raw: list[bytes] = ()) -> None:
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    for key, doc in docs:
        p.produce(TOPIC, orjson.dumps(doc), key)
    for r in raw:
        p.produce(TOPIC, r, b"poison")
    assert p.flush(20) == 0


def many_sources(n: int, offset: int = 0) -> list[tuple[bytes, dict]]:
    """n flow_start documents from n distinct sources (spread over partitions)."""
    out = []
    for i in range(offset, offset + n):
        out += flow_starts(f"203.0.{i // 250}.{i % 250 + 1}", 1, 1.0)
    return out


def archive_cmd(broker, directory, dead_letter, *extra) -> list[str]:
    return [XDPWATCH, "archive", "--bootstrap-servers", broker.bootstrap, "--dir", str(directory),
            "--stream", "ssh-flows", "--group-id", GROUP, "--dead-letter", str(dead_letter),
            "-X", "session.timeout.ms=3000", "-X", "heartbeat.interval.ms=500", *extra]


def read_archive(directory: Path) -> dict[int, list[tuple[Segment, list[bytes]]]]:
    """{partition: [(segment, lines)]}, each read with the real zstdcat."""
    out: dict[int, list] = {}
    for seg in list_segments(directory):
        lines = sh("zstdcat", str(seg.path)).stdout.encode().splitlines()
        out.setdefault(seg.partition, []).append((seg, lines))
    return out


def committed(broker, partitions: int = 3) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": GROUP})
    try:
        return {tp.partition: tp.offset for tp in
                c.committed([TopicPartition(TOPIC, p) for p in range(partitions)], timeout=10)}
    finally:
        c.close()


def assert_exactly_once(directory: Path, broker, dead_offsets: set[tuple[int, int]] = frozenset()) -> int:
    """Every offset of the topic is in exactly one segment: ranges contiguous from 0 to the
    end, lines equal to the topic's values in offset order (dead-lettered ones excepted)."""
    records = consume_all(broker.bootstrap, TOPIC)
    arch = read_archive(directory)
    total = 0
    for part in {r.partition for r in records} | set(arch):
        expected = [r.value for r in records if r.partition == part and (part, r.offset) not in dead_offsets]
        segs = arch.get(part, [])
        ends = [r.offset for r in records if r.partition == part]
        next_first = 0
        for seg, _ in segs:
            assert seg.first == next_first, f"p{part}: gap or overlap at {seg.path.name}"
            next_first = seg.last + 1
        assert next_first == (max(ends) + 1 if ends else 0), f"p{part}: archive ends at {next_first}"
        got = [line for _, lines in segs for line in lines]
        assert got == expected, f"p{part}: {len(got)} lines archived, {len(expected)} expected"
        total += len(got)
    return total


def test_segments_exact_contents_dead_letters_and_commits(broker_factory, tmp_path):
    broker = broker_factory()
    create_topic(broker)
    docs = many_sources(300)
    produce(broker, docs, raw=[b"\xff not json"])
    arch, dl = tmp_path / "archive", tmp_path / "dead.jsonl"

    r = subprocess.run(archive_cmd(broker, arch, dl, "--roll-mb", "0.02", "--exit-when-idle", "4"),
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr

    dead = [orjson.loads(line) for line in dl.read_bytes().splitlines()]
    assert [d["reason"].split(":")[0] for d in dead] == ["not-json"]
    dead_offsets = {(d["partition"], d["offset"]) for d in dead}
    assert assert_exactly_once(arch, broker, dead_offsets) == 300
    segs = list_segments(arch)
    assert len(segs) > 6  # rolled by size (20 kB of JSON each), not one file per partition
    assert not list(arch.glob(".*.open"))
    # The dead-lettered offset lies inside a segment's range or right after one: committed
    # offsets are exactly the end of the archive, per partition.
    ends = {p: max(s.last for s in segs if s.partition == p) + 1 for p in {s.partition for s in segs}}
    assert committed(broker) == {p: ends.get(p, -1001) for p in range(3)}

    # A restart with nothing new writes nothing; new messages continue exactly where it ended.
    produce(broker, many_sources(20, offset=300))
    r = subprocess.run(archive_cmd(broker, arch, dl, "--exit-when-idle", "4"),
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert assert_exactly_once(arch, broker, dead_offsets) == 320
    assert "starting at" in r.stderr


# Each restart waits for the group to drop the killed member (session timeout 3 s): about
# 7 s a round, so the soak's 40 rounds need more than the default 300 s.
@pytest.mark.timeout(900 if SOAK else 300)
def test_kill_9_at_any_time_yields_every_offset_exactly_once(broker_factory, tmp_path):
    broker = broker_factory()
    create_topic(broker)
    arch, dl = tmp_path / "archive", tmp_path / "dead.jsonl"
    produce(broker, many_sources(1000))
    stop_feeding = threading.Event()
    fed = [1000]

    def feed():  # new messages keep arriving while the archiver is killed and restarted
        while not stop_feeding.is_set() and fed[0] < 5000:
            produce(broker, many_sources(25, offset=fed[0]))
            fed[0] += 25
            time.sleep(0.05)

    feeder = threading.Thread(target=feed)
    feeder.start()
    rng = random.Random(7)
    kills = mid_segment = 0
    try:
        for _ in range(40 if SOAK else 8):
            proc = XdpwatchProc("archive", *archive_cmd(broker, arch, dl, "--roll-mb", "0.003")[2:])
            proc.wait_for_log("starting at", timeout=30)
            time.sleep(rng.uniform(0.05, 1.0))
            proc.stop(signal.SIGKILL)
            kills += 1
            mid_segment += bool(list(arch.glob(".*.open")))
    finally:
        stop_feeding.set()
        feeder.join()
    r = subprocess.run(archive_cmd(broker, arch, dl, "--roll-mb", "0.003", "--exit-when-idle", "4"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    total = assert_exactly_once(arch, broker)
    print(f"\n{kills} x kill -9 ({mid_segment} with a segment half-written): {total} messages in "
          f"{len(list_segments(arch))} segments, each offset exactly once")
    assert total == fed[0] and kills == (40 if SOAK else 8)
    assert mid_segment > 0  # kills did land mid-segment


def test_crash_at_each_step_of_the_cycle_yields_every_offset_exactly_once(broker_factory, tmp_path):
    """kill -9 injected at each step of write -> end frame -> fsync -> rename -> commit
    (XDPWATCH_CRASH_AT), with new messages between crashes: every complete segment reads
    back whole, and after a clean run every offset is in exactly one segment."""
    from xdpwatch.consumers.archive import CRASH_POINTS

    broker = broker_factory()
    create_topic(broker)
    arch, dl = tmp_path / "archive", tmp_path / "dead.jsonl"
    fed = 0
    rounds = 3 if SOAK else 1
    for round_ in range(rounds):
        for point in CRASH_POINTS:
            produce(broker, many_sources(150, offset=fed))
            fed += 150
            # The n-th time the point is reached: a different place in each round. A run
            # makes all its segments durable in one or two turns, so commit crashes at the first.
            nth = {"write": 40 + 17 * round_, "commit": 1}.get(point, 2 + round_)
            r = subprocess.run(archive_cmd(broker, arch, dl, "--roll-mb", "0.003", "--exit-when-idle", "4"),
                               capture_output=True, text=True, timeout=90,
                               env={**os.environ, "XDPWATCH_CRASH_AT": f"{point}:{nth}"})
            assert r.returncode == -signal.SIGKILL, f"{point}: rc {r.returncode}\n{r.stderr}"
            if point in ("write", "frame-end", "fsync"):
                assert list(arch.glob(".*.open")), point  # the crash left a half-written segment
            read_archive(arch)  # every complete segment decompresses whole (zstdcat fails otherwise)
            if point in ("rename", "commit"):  # a durable segment whose offsets are not committed
                ends = {seg.partition: seg.last + 1 for seg in list_segments(arch)}
                assert any(committed(broker).get(p, -1) < end for p, end in ends.items()), point
    r = subprocess.run(archive_cmd(broker, arch, dl, "--roll-mb", "0.003", "--exit-when-idle", "4"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    total = assert_exactly_once(arch, broker)
    assert total == fed
    print(f"\ncrashes at {', '.join(CRASH_POINTS)} (x{rounds}): {total} messages in {len(list_segments(arch))} "
          "segments, each offset exactly once")


def test_disk_full_is_a_clear_error_and_commits_only_durable_segments(broker_factory, tmp_path):
    broker = broker_factory()
    create_topic(broker, partitions=1)
    # Random bytes in a field make the JSON nearly incompressible, so the disk fills fast.
    rng = random.Random(1)
    docs = many_sources(3000)
    for _, doc in docs:
        doc["observer"]["hostname"] = rng.randbytes(150).hex()
    produce(broker, docs)
    mnt = tmp_path / "small"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=400k,mode=0700", "tmpfs", str(mnt))
    try:
        r = subprocess.run(archive_cmd(broker, mnt, tmp_path / "dl.jsonl", "--roll-mb", "0.1",
                                       "--exit-when-idle", "4"),
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 1, r.stderr
        assert "disk is full" in r.stderr and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("xdpwatch: error: archive")
        segs = list_segments(mnt)
        assert segs and not list(mnt.glob(".*.open"))  # some complete, the partial one removed
        lines = sum(len(ls) for _, ls in read_archive(mnt).get(0, []))
        assert segs[-1].last + 1 == lines < 3000
        assert committed(broker, 1) == {0: lines}  # nothing committed that is not on disk
    finally:
        sh("umount", str(mnt))


def test_read_only_directory_is_a_clear_error(broker_factory, tmp_path):
    broker = broker_factory()
    mnt = tmp_path / "ro"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "ro,size=64k,mode=0700", "tmpfs", str(mnt))
    try:
        r = subprocess.run(archive_cmd(broker, mnt, tmp_path / "dl.jsonl"), capture_output=True, text=True,
                           timeout=30)
    finally:
        sh("umount", str(mnt))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"xdpwatch: error: archive {mnt}: opening the archive directory failed: the "
                                "file system is read-only. Nothing past the last complete "
                                "segment was committed; a restart resumes from the files.")


def test_consumer_metrics(broker_factory, tmp_path):
    from .env import free_port, scrape, wait_for

    broker = broker_factory()
    create_topic(broker)
    produce(broker, many_sources(40), raw=[b"not json"])
    port = free_port()
    with XdpwatchProc("archive", *archive_cmd(broker, tmp_path / "a", tmp_path / "dl.jsonl", "--roll-seconds", "0.5",
                                              "--metrics-port", str(port))[2:]) as proc:
        def settled():
            m = scrape(port)  # {} until it listens
            lag = [v for k, v in m.items() if k.startswith("xdpwatch_consumer_lag{")]
            return m if len(lag) == 3 and sum(lag) == 0 and m.get(
                'xdpwatch_archive_lines_total{command="archive"}') == 40 else None

        m = wait_for(settled, 30, "the archiver to catch up (lag 0, 40 lines)", interval=0.5)
        assert proc.stop() == 0, proc.stderr
    assert m['xdpwatch_consumer_messages_total{command="archive",outcome="handled"}'] == 40
    assert m['xdpwatch_consumer_messages_total{command="archive",outcome="dead_lettered"}'] == 1
    assert m['xdpwatch_archive_segments_total{command="archive"}'] >= 3
