"""The on-disk spool alone (real files), and the exporter's overflow into it with a real
librdkafka client whose broker is unreachable (its queue fills and stays full)."""

from __future__ import annotations

import socket
import stat

import pytest

from xdpwatch.producer import spool as spool_mod
from xdpwatch.producer.exporter import KafkaExporter
from xdpwatch.producer.spool import Spool


def drain(s: Spool) -> list:
    out = []
    while (r := s.peek()) is not None:
        out.append(r)
        s.pop()
    return out


def records(n: int, start: int = 0):
    return [("ssh-flows" if i % 3 else "packet-counts", None if i % 5 == 0 else b"k%d" % i, b"v%d" % i * (i % 7))
            for i in range(start, start + n)]


def test_order_is_kept_across_segments_and_restarts(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "SEGMENT_BYTES", 500)  # many segments
    s = Spool(tmp_path / "sp", 1 << 20)
    recs = records(300)
    assert all(s.append(*r) for r in recs)
    assert len(s) == 300 and len(list((tmp_path / "sp").glob("*.spool"))) > 5
    got = [s.peek() for _ in range(1)]
    s.pop()
    got += [s.peek()]
    s.pop()
    s.close()  # a restart: the rest is read back from disk, in order
    s2 = Spool(tmp_path / "sp", 1 << 20)
    assert len(s2) == 298
    assert got + drain(s2) == recs
    assert len(s2) == 0 and s2.bytes == 0 and not list((tmp_path / "sp").iterdir())


def test_prepend_goes_first_even_with_a_half_read_segment(tmp_path):
    s = Spool(tmp_path, 1 << 20)
    for r in records(10):
        s.append(*r)
    first = s.peek()
    s.pop()
    assert first == records(10)[0]
    s.peek()  # peeked, not popped: stays
    s.prepend(records(3, start=100))
    assert len(s) == 12
    assert drain(s) == records(3, start=100) + records(10)[1:]


def test_bounded_and_private(tmp_path):
    s = Spool(tmp_path / "sp", 200)
    assert s.append("ssh-flows", b"k", b"x" * 100)
    assert not s.append("ssh-flows", b"k", b"x" * 100)  # would pass 200 bytes
    assert len(s) == 1
    assert stat.S_IMODE((tmp_path / "sp").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "sp").glob("*.spool"))


def test_a_torn_tail_is_skipped_and_counted(tmp_path):
    s = Spool(tmp_path, 1 << 20)
    for r in records(5):
        s.append(*r)
    s.close()
    segment = next(tmp_path.glob("*.spool"))
    with open(segment, "ab") as f:  # a process killed in the middle of a write
        f.write(spool_mod._encode("ssh-flows", b"key", b"value")[:9])
    s2 = Spool(tmp_path, 1 << 20)
    assert drain(s2) == records(5)
    assert s2.torn == 1 and len(s2) == 0


def dead_end_exporter(spool: Spool | None, queue: int = 5) -> KafkaExporter:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ex = KafkaExporter(f"127.0.0.1:{port}", "xdpwatch", {"queue.buffering.max.messages": str(queue), "log_level": "0"})
    if spool is not None:
        ex.use_spool(spool)
    return ex


def test_exporter_spools_the_overflow_in_order_and_writes_back_the_queue_at_close(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    ex = dead_end_exporter(spool)
    recs = records(20)
    for r in recs:
        ex.export(*r)
    ex.poll()
    assert ex.stats.produced == 5 and len(spool) == 15 and ex.stats.dropped == 0
    stats = ex.close(0.5)
    # librdkafka's 5 were purged and written back in front: the spool holds all 20, the 5
    # first (librdkafka hands them back partition by partition, so in order per key).
    assert stats.produced == 0 and stats.spooled == 20 and stats.pending == 0
    back = drain(Spool(tmp_path, 1 << 20))
    assert sorted(back[:5], key=repr) == sorted(recs[:5], key=repr) and back[5:] == recs[5:]


@pytest.mark.parametrize("with_spool", [False, True])
def test_exporter_drops_and_counts_what_neither_queue_nor_spool_takes(tmp_path, with_spool):
    spool = Spool(tmp_path, 300) if with_spool else None
    ex = dead_end_exporter(spool)
    for r in records(20):
        ex.export(*r)
    kept = 5 + (len(spool) if spool is not None else 0)
    assert ex.stats.dropped == 20 - kept > 0
    ex.close(0)
