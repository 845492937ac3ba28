"""`xdpwatch replay` on real archive files (written by the real Archiver), run as a
subprocess: order, filters, bad input reported with file:line and exit 4, paths confined
to the archive, pacing. Kafka output is covered end to end in tests/e2e/test_chain.py."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zstandard

from xdpwatch import schemas
from xdpwatch.consumers.archive import Archiver, segment_name
from xdpwatch.consumers.base import Event
from xdpwatch.consumers.replay import Filters, ReplayStats, replay, select_inputs

XDPWATCH = str(Path(sys.executable).with_name("xdpwatch"))
T0 = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.timezone.utc)


def flow_doc(i: int, src: str, t_s: float, action: str = "flow_start") -> dict:
    ts = (T0 + dt.timedelta(seconds=t_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    doc = {
        "@timestamp": ts,
        "event": {"id": f"gw1-b-r-{i}", "kind": "event", "module": "xdpwatch", "dataset": "xdpwatch.ssh_flows",
                  "category": ["network"], "type": ["start"] if action == "flow_start" else ["end"],
                  "action": action, "start": ts, "end": ts, "duration": 0},
        "flow": {"id": f"f{i}", "midstream": False},
        "source": {"ip": src, "port": 40000 + i}, "destination": {"ip": "192.0.2.1", "port": 22},
        "network": {"transport": "tcp", "type": "ipv4", "packets": 1, "bytes": 74, "direction": "inbound",
                    "community_id": "1:" + "A" * 27 + "="},
        "tcp": {"flags": ["SYN"]},
        "observer": {"hostname": "gw1", "ingress": {"interface": {"name": "eth0"}}},
    }
    if action == "flow_end":
        doc["event"]["reason"] = "fin"
    assert schemas.errors("ssh-flows", doc) == []
    return doc


def write_archive(directory: Path, parts: dict[int, list[dict]]) -> dict[int, list[bytes]]:
    """Archive documents as `xdpwatch archive` would (same class), one segment per 3 lines."""
    arch = Archiver(directory, roll_bytes=1, roll_seconds=3600)
    arch.roll_bytes = 3 * len(orjson.dumps(parts[next(iter(parts))][0]))  # about 3 lines per segment
    values = {}
    for p, docs in parts.items():
        values[p] = [orjson.dumps(d) for d in docs]
        for off, (doc, value) in enumerate(zip(docs, values[p])):
            arch.handle(Event("xdpwatch.ssh-flows", p, off, None, "ssh-flows", doc, value))
    arch.close()
    return values


def run(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([XDPWATCH, "replay", "--dir", str(directory), *args], capture_output=True, timeout=60)


@pytest.fixture
def archive(tmp_path):
    # p0: 10.0.0.1 at t = 0, 2, 4, …; p1: 10.0.1.1 at t = 1, 3, 5, … (flow_end every third)
    parts = {
        0: [flow_doc(i, "10.0.0.1", 2 * i) for i in range(7)],
        1: [flow_doc(100 + i, "10.0.1.1", 2 * i + 1, "flow_end" if i % 3 == 2 else "flow_start") for i in range(7)],
    }
    values = write_archive(tmp_path / "a", parts)
    return tmp_path / "a", values


def test_segments_are_zstd_json_lines_named_by_offsets(archive):
    directory, values = archive
    names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    assert names[0] == segment_name("xdpwatch.ssh-flows", 0, 0, 2) == \
        "xdpwatch.ssh-flows.p0.00000000000000000000-00000000000000000002.jsonl.zst"
    out = subprocess.run(["zstdcat", str(directory / names[0])], capture_output=True, check=True).stdout
    assert out.splitlines() == values[0][:3]
    assert directory.stat().st_mode & 0o777 == 0o700  # evidence: the archiving user's only
    assert {(directory / n).stat().st_mode & 0o777 for n in names} == {0o600}


def test_replay_merges_partitions_by_time_and_keeps_bytes(archive):
    directory, values = archive
    r = run(directory)
    assert r.returncode == 0, r.stderr
    interleaved = [v for pair in zip(values[0], values[1]) for v in pair]
    assert r.stdout.splitlines() == interleaved
    assert b"14 events replayed, 0 filtered out, 0 bad lines and 0 bad files skipped" in r.stderr


def test_filters(archive):
    directory, values = archive
    lines = lambda r: r.stdout.splitlines()  # noqa: E731
    assert lines(run(directory, "--source-ip", "10.0.1.0/24")) == values[1]
    assert lines(run(directory, "--source-ip", "10.0.0.1", "--source-ip", "10.0.1.1")) == \
        [v for pair in zip(values[0], values[1]) for v in pair]
    assert lines(run(directory, "--action", "flow_end")) == [values[1][2], values[1][5]]
    # [t=3 s, t=6 s): 3 (p1), 4 (p0), 5 (p1)
    assert lines(run(directory, "--since", "2026-11-25T10:00:03Z", "--until", "2026-11-25T10:00:06+00:00")) == \
        [values[1][1], values[0][2], values[1][2]]
    r = run(directory, "--stream", "packet-counts")
    assert r.returncode == 0 and r.stdout == b"" and b"0 events replayed, 14 filtered out" in r.stderr


def test_bad_lines_and_files_are_reported_skipped_counted(archive):
    directory, values = archive
    good = orjson.dumps(flow_doc(900, "10.0.9.9", 100))
    bad_schema = orjson.dumps({**flow_doc(901, "10.0.9.9", 101), "source": {"ip": "not an ip", "port": 1}})
    name = segment_name("xdpwatch.ssh-flows", 2, 0, 3)
    (directory / name).write_bytes(zstandard.ZstdCompressor().compress(
        good + b"\n{not json\n" + bad_schema + b"\n" + b'{"truncated": '))
    cut = sorted(directory.glob("xdpwatch.ssh-flows.p1.*"))[0]
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (directory / "notes.txt").write_text("case notes")
    (directory / ".xdpwatch.ssh-flows.p3.open").write_bytes(b"")

    r = run(directory)
    err = r.stderr.decode()
    assert r.returncode == 4, err
    assert f"{name}:2: skipped, not JSON" in err
    assert f"{name}:3: skipped, breaks the ssh-flows schema (source/ip:" in err
    assert f"{name}:4: skipped, truncated line" in err
    assert f"{cut.name}: compressed data truncated or corrupt after line 0" in err
    assert "notes.txt: skipped, not an archive segment" in err
    assert ".xdpwatch.ssh-flows.p3.open: skipped, an unfinished segment" in err
    assert "Traceback" not in err
    out = r.stdout.splitlines()
    # Everything valid is still replayed: p0, p1 minus its cut first segment, the good line.
    assert out == [v for v in sorted(values[0] + values[1][3:] + [good], key=lambda v: orjson.loads(v)["@timestamp"])]
    assert "3 bad lines and 3 bad files skipped" in err
    assert err.strip().endswith("xdpwatch: error: 6 bad lines/files were skipped (listed above)")


def test_paths_are_confined_to_the_archive(archive, tmp_path):
    directory, _ = archive
    outside = tmp_path / "secret.jsonl.zst"
    outside.write_bytes(b"")
    (directory / "link.jsonl.zst").symlink_to(outside)
    for arg in ("../secret.jsonl.zst", str(outside), "link.jsonl.zst"):
        r = run(directory, arg)
        assert r.returncode == 1 and r.stdout == b""
        assert r.stderr.decode().strip() == (f"xdpwatch: error: {arg} is outside the archive directory "
                                             f"{directory}; name files inside it (relative paths)")
    # Listed rather than named: a link leading out, even named like a segment, is not read.
    inside = write_archive(tmp_path / "elsewhere", {5: [flow_doc(5, "10.0.5.5", 0)]})
    planted = segment_name("xdpwatch.ssh-flows", 5, 0, 0)
    (directory / planted).symlink_to(tmp_path / "elsewhere" / planted)
    r = run(directory)
    assert r.returncode == 4 and inside[5][0] not in r.stdout and len(r.stdout.splitlines()) == 14
    assert f"{planted}: skipped, a symbolic link to outside the archive directory" in r.stderr.decode()
    (directory / planted).unlink()
    first = sorted(directory.glob("xdpwatch.ssh-flows.p0.*"))[0].name
    r = run(directory, first)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3
    r = run(tmp_path / "missing")
    assert r.returncode == 1 and b"archive directory" in r.stderr and b"No such file" in r.stderr


def test_bad_options_are_usage_errors(archive):
    directory, _ = archive
    for args, text in ((["--since", "yesterday"], b"not an ISO 8601 time"),
                       (["--source-ip", "10.0.0.300"], b"does not appear to be an IPv4 or IPv6"),
                       (["--action", "login"], b"'login' is not one of"),
                       (["--output", "kafka"], b"--bootstrap-servers")):
        r = run(directory, *args)
        assert r.returncode in (1, 2) and text in r.stderr and b"Traceback" not in r.stderr, r.stderr


def test_closed_pipe_is_not_an_error(archive):
    directory, _ = archive
    r = subprocess.run(f"{XDPWATCH} replay --dir {directory} | head -1", shell=True, capture_output=True,
                       timeout=60)
    assert len(r.stdout.splitlines()) == 1 and b"Traceback" not in r.stderr and b"Broken pipe" not in r.stderr


def test_speed_keeps_original_gaps_divided_by_speed(archive):
    directory, _ = archive
    now = [0.0]
    emitted: list[float] = []

    def sleep(d: float) -> None:
        now[0] += d

    stats = ReplayStats()
    replay(select_inputs(directory, [], stats), Filters(), lambda *a: emitted.append(now[0]), 2.0, stats,
           sleep=sleep, clock=lambda: now[0])
    # events 1 s apart, speed 2: emitted every 0.5 s of (fake) wall time
    assert emitted == [i * 0.5 for i in range(14)]
    emitted.clear()
    replay(select_inputs(directory, [], stats), Filters(), lambda *a: emitted.append(now[0]), 0, stats,
           sleep=sleep, clock=lambda: now[0])
    assert len(set(emitted)) == 1  # speed 0: no waiting at all


def test_archive_directory_is_locked_and_checked(tmp_path):
    from xdpwatch.consumers.errors import ConsumerError

    first = Archiver(tmp_path / "x", 10**6, 60)
    with pytest.raises(ConsumerError, match="another xdpwatch archive is writing to this directory"):
        Archiver(tmp_path / "x", 10**6, 60)
    del first
    (tmp_path / "file").write_text("")
    with pytest.raises(ConsumerError, match="opening the archive directory failed"):
        Archiver(tmp_path / "file" / "sub", 10**6, 60)
    assert os.path.isdir(tmp_path / "x")


def rle_bomb(size: int, block: int = 128 * 1024) -> bytes:
    """One zstd frame of `size` bytes of "A" (no newline), built by hand (RFC 8878) from RLE
    blocks: 4 bytes each for 128 KiB, the format's highest ratio. 10 GiB is 320 KiB."""
    frame = bytearray(b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x38]))  # magic; no size, no checksum; 128 KiB window
    for i in range(size // block):
        last = i == size // block - 1
        frame += (last | 1 << 1 | block << 3).to_bytes(3, "little") + b"A"  # Last_Block, RLE, Block_Size
    return bytes(frame)


def test_rle_bomb_is_a_valid_zstd_frame():
    assert zstandard.ZstdDecompressor().decompressobj().decompress(rle_bomb(3 << 17)) == b"A" * (3 << 17)


def test_a_decompression_bomb_is_replayed_in_bounded_memory(archive, tmp_path):
    """A 320 KiB segment that expands to 10 GiB without a newline: reported as one oversized
    line, skipped; the rest of the archive is replayed; the process stays small."""
    directory, values = archive
    size = 10 << 30
    name = segment_name("xdpwatch.ssh-flows", 2, 0, 0)
    (directory / name).write_bytes(rle_bomb(size))
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        p = subprocess.Popen([XDPWATCH, "replay", "--dir", str(directory)], stdout=out, stderr=err)
        # The peak of the replay's own memory (VmHWM). Not the rusage of wait4: Linux counts in
        # ru_maxrss the image before exec, i.e. this test process's own peak (400+ MB late in a
        # full run, which once failed this test).
        peak_kib = 0
        while p.poll() is None:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
                peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                pass
            time.sleep(0.02)
    err = (tmp_path / "err").read_text()
    assert p.returncode == 4, err
    assert f"{name}:1: skipped, a line of {size} bytes, over the 262144-byte limit" in err
    assert "Traceback" not in err
    assert sorted((tmp_path / "out").read_bytes().splitlines()) == sorted(values[0] + values[1])
    print(f"\nreplay of a 10 GiB zstd bomb ({len(rle_bomb(size))} bytes): max RSS {peak_kib // 1024} MiB")
    assert 0 < peak_kib < 256 * 1024  # KiB: 10 GiB never held, nor a quarter of it


def test_an_oversized_line_is_skipped_and_the_lines_around_it_replayed(archive):
    directory, values = archive
    before, after = (orjson.dumps(flow_doc(i, "10.0.9.9", 100 + i)) for i in (900, 901))
    huge = orjson.dumps({"padding": "x" * (300 << 10)})
    name = segment_name("xdpwatch.ssh-flows", 2, 0, 2)
    (directory / name).write_bytes(zstandard.ZstdCompressor().compress(before + b"\n" + huge + b"\n" + after + b"\n"))
    r = run(directory, name)
    err = r.stderr.decode()
    assert r.returncode == 4, err
    assert r.stdout.splitlines() == [before, after]
    assert f"{name}:2: skipped, a line of {len(huge)} bytes, over the 262144-byte limit" in err
    assert "1 bad lines and 0 bad files skipped" in err


def test_zstd_lines_caps_lines_across_steps_and_frames(monkeypatch):
    import io

    from xdpwatch.consumers import replay as replay_mod
    from xdpwatch.consumers.replay import Oversized, TruncatedFrame, zstd_lines

    monkeypatch.setattr(replay_mod, "STEP_BYTES", 3)  # lines and frames split at every point
    c = zstandard.ZstdCompressor()
    text = [b"0123456789\n", b"01234567890\n", b"\n", b"ab\n", b"x" * 50 + b"\n", b"0123456789"]
    data = c.compress(b"".join(text[:3])) + c.compress(b"".join(text[3:]))
    assert list(zstd_lines(io.BytesIO(data), max_line=10)) == \
        [b"0123456789\n", Oversized(11), b"\n", b"ab\n", Oversized(50), b"0123456789"]
    assert list(zstd_lines(io.BytesIO(c.compress(b"y" * 11)), max_line=10)) == [Oversized(11)]
    with pytest.raises(TruncatedFrame):
        list(zstd_lines(io.BytesIO(data[:-3]), max_line=10))
