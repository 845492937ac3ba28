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


def test_files_that_are_not_segments_are_skipped_counted_and_left_alone(tmp_path, caplog):
    s = Spool(tmp_path, 1 << 20)
    for r in records(5):
        s.append(*r)
    s.close()
    victim = tmp_path.parent / "victim"
    victim.write_bytes(spool_mod._encode("ssh-flows", b"k", b"secret"))
    bad = {"evil.spool": b"\x00" * 9, "12x.spool": b"", "+7.spool": b"", "\u0663.spool": b"", ".spool": b""}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "000000000007.spool").mkdir()
    (tmp_path / "000000000008.spool").symlink_to(victim)  # never read: it is not a regular file
    (tmp_path / "notes.txt").write_text("not the spool's")
    caplog.set_level("WARNING")
    s2 = Spool(tmp_path, 1 << 20)
    assert s2.corrupt == len(bad) + 2 and len(s2) == 5
    assert drain(s2) == records(5)
    for name in [*bad, "000000000007.spool", "000000000008.spool"]:
        assert sum(f": {name} is not a spool segment" in m for m in caplog.messages) == 1, name
        assert (tmp_path / name).exists() or (tmp_path / name).is_symlink()
    assert (tmp_path / "notes.txt").read_text() == "not the spool's"
    assert victim.read_bytes() == spool_mod._encode("ssh-flows", b"k", b"secret")


def test_a_link_in_the_writers_way_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / f"{spool_mod.FIRST_SEQ:012d}.spool").symlink_to(victim)
    s = Spool(tmp_path / "sp", 1 << 20)
    assert s.corrupt == 1 and len(s) == 0
    assert not s.append("ssh-flows", b"k", b"v")  # refused like a full disk: the exporter counts a drop
    assert victim.read_bytes() == b"precious" and len(s) == 0


def test_records_whose_stream_is_not_utf8_are_skipped_and_counted(tmp_path, caplog):
    recs = records(6)
    segment = tmp_path / f"{spool_mod.FIRST_SEQ:012d}.spool"
    bad = spool_mod._HEADER.pack(2, 1, 3) + b"\xff\xfe" + b"k" + b"bad"
    data = b"".join(spool_mod._encode(*r) for r in recs[:2]) + bad + spool_mod._encode(*recs[2]) + bad
    segment.write_bytes(data + b"".join(spool_mod._encode(*r) for r in recs[3:]))
    caplog.set_level("WARNING")
    s2 = Spool(tmp_path, 1 << 20)
    assert len(s2) == 8  # framing is intact: counted, found bad when read
    assert drain(s2) == recs
    assert s2.corrupt == 2 and s2.torn == 0 and len(s2) == 0 and not list(tmp_path.iterdir())
    assert sum("not UTF-8" in m for m in caplog.messages) == 1  # once per file


@pytest.mark.parametrize("where", ["past the end", "inside the file"])
def test_an_absurd_length_ends_its_segment_only(tmp_path, monkeypatch, caplog, where):
    """A header announcing more than any event: the rest of that segment cannot be framed;
    the records before it and every other segment are sent, and the count stays exact."""
    monkeypatch.setattr(spool_mod, "SEGMENT_BYTES", 300)
    if where == "inside the file":
        monkeypatch.setattr(spool_mod, "MAX_VALUE_BYTES", 20)  # the length points inside the segment
    recs = records(40)
    s = Spool(tmp_path, 1 << 20)
    for r in recs:
        s.append(*r)
    s.close()
    first, second = sorted(tmp_path.glob("*.spool"))[:2]
    raw = first.read_bytes()
    n_first = s._scan(first)
    keep = len(spool_mod._encode(*recs[0])) + len(spool_mod._encode(*recs[1]))
    n_stream, n_key, _ = spool_mod._HEADER.unpack(raw[keep:keep + spool_mod._HEADER.size])
    absurd = 0xFFFFFFFF if where == "past the end" else 21
    first.write_bytes(raw[:keep] + spool_mod._HEADER.pack(n_stream, n_key, absurd) + raw[keep + spool_mod._HEADER.size:])
    caplog.set_level("WARNING")
    s2 = Spool(tmp_path, 1 << 20)
    assert drain(s2) == recs[:2] + recs[n_first:]
    assert (s2.corrupt, s2.torn, len(s2), s2.bytes) == (1, 0, 0, 0)
    assert not list(tmp_path.iterdir())
    assert sum("a record header is corrupt" in m for m in caplog.messages) == 1


def dead_end_exporter(spool: Spool | None, queue: int = 5) -> KafkaExporter:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ex = KafkaExporter({"bootstrap.servers": f"127.0.0.1:{port}", "queue.buffering.max.messages": str(queue),
                        "log_level": "0"}, "xdpwatch")
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
