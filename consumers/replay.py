"""`xdpwatch replay`: archived segments back to Kafka or stdout, filtered, optionally paced.

Order: each partition's segments by offset, partitions merged by `@timestamp` (a partition's
own order is never changed). Every line is checked as the live consumers check messages:
size (at most MAX_MESSAGE_BYTES), JSON, then the topic's schema. A bad line, a truncated or
corrupt segment and a file that is not a segment are each reported (file and line), skipped
and counted; the command then exits 4 so scripts notice. Segments are decompressed in
bounded steps, so memory stays bounded whatever a crafted segment expands to. Paths are
confined to the archive directory.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import orjson

from xdpwatch import schemas
from xdpwatch.consumers.archive import LOCK_NAME, Segment
from xdpwatch.consumers.base import MAX_MESSAGE_BYTES
from xdpwatch.consumers.errors import ConsumerError

log = logging.getLogger(__name__)


@dataclass
class Filters:
    since: float | None = None                # POSIX seconds (schemas.parse_time)
    until: float | None = None                # exclusive
    source_nets: list = field(default_factory=list)   # ip_network; empty = any
    actions: set[str] = field(default_factory=set)    # empty = any
    streams: set[str] = field(default_factory=set)    # empty = all

    def match(self, stream: str, doc: dict, ts: float) -> bool:
        if self.streams and stream not in self.streams:
            return False
        if self.since is not None and ts < self.since or self.until is not None and ts >= self.until:
            return False
        if self.actions and doc.get("event", {}).get("action") not in self.actions:
            return False
        if self.source_nets:
            ip = doc.get("source", {}).get("ip")
            if ip is None or not any(ipaddress.ip_address(ip) in n for n in self.source_nets):
                return False
        return True


@dataclass
class ReplayStats:
    files: int = 0
    replayed: int = 0
    filtered: int = 0
    bad_lines: int = 0
    bad_files: int = 0

    def problem(self, text: str, bad_file: bool = False) -> None:
        if bad_file:
            self.bad_files += 1
        else:
            self.bad_lines += 1
        log.warning("%s", text)


def select_inputs(archive: Path, names: list[str], stats: ReplayStats) -> list[Segment]:
    """Segments to replay: `names` (relative to `archive`, never outside it) or all of it."""
    try:
        root = archive.resolve(strict=True)
    except OSError as e:
        raise ConsumerError(f"archive directory {archive}: {e.strerror}") from None
    if not root.is_dir():
        raise ConsumerError(f"{archive} is not a directory; give the archive directory with --dir")
    if names:
        paths = []
        for n in names:
            p = (root / n).resolve()
            if not p.is_relative_to(root):
                raise ConsumerError(f"{n} is outside the archive directory {archive}; "
                                    "name files inside it (relative paths)")
            if not p.is_file():
                raise ConsumerError(f"{n}: no such file in the archive directory {archive}")
            paths.append(p)
    else:
        paths = sorted(p for p in root.iterdir() if p.is_file() and p.name != LOCK_NAME)
    segments = []
    for p in paths:
        seg = Segment.parse(p)
        if not p.resolve().is_relative_to(root):  # listed, not named: a link leading out
            stats.problem(f"{p.name}: skipped, a symbolic link to outside the archive directory", bad_file=True)
        elif seg is None:
            why = ("an unfinished segment (being written, or left by a crash; its messages are "
                   "still in Kafka)" if p.name.endswith(".open") else "not an archive segment")
            stats.problem(f"{p.name}: skipped, {why}", bad_file=True)
        elif schemas.stream_of(seg.topic) is None:
            stats.problem(f"{p.name}: skipped, topic {seg.topic} is not an xdpwatch stream", bad_file=True)
        else:
            segments.append(seg)
    return segments


class TruncatedFrame(Exception):
    pass


@dataclass(frozen=True)
class Oversized:
    """In place of a line longer than the cap: its length; its bytes were never kept."""

    size: int


# Compressed bytes fed to the decompressor at a time. A zstd block yields at most 128 KiB and
# takes at least 4 bytes (RFC 8878: a 3-byte header and one RLE byte), so one step yields at
# most 33 blocks, about 4 MiB, whatever the compression ratio. Measured on an 83 MB segment
# of 200,000 lines: within noise of 64 KiB steps (the decompressor works block by block).
STEP_BYTES = 128


def zstd_lines(f, max_line: int = MAX_MESSAGE_BYTES) -> Iterator[bytes | Oversized]:
    """Lines of a file of zstd frames, each with its newline (the last one may lack it), in
    bounded memory: a line longer than `max_line` bytes (newline excluded) comes as
    `Oversized` and reading goes on after its newline. Unlike a stream reader, a file cut
    mid-frame raises (TruncatedFrame) instead of ending quietly."""
    import zstandard

    d, in_frame = zstandard.ZstdDecompressor().decompressobj(), False
    pending, dropped = bytearray(), 0  # the line so far, or the length of an oversized one
    while chunk := f.read(1 << 16):
        for i in range(0, len(chunk), STEP_BYTES):
            piece = chunk[i:i + STEP_BYTES]
            while piece:
                in_frame = True
                out = d.decompress(piece)
                piece = b""
                if d.eof:  # frame complete; the rest may start another one
                    piece, in_frame = d.unused_data, False
                    d = zstandard.ZstdDecompressor().decompressobj()
                start = 0
                while (end := out.find(b"\n", start)) >= 0:
                    size = dropped + len(pending) + end - start
                    if size > max_line:
                        yield Oversized(size)
                    else:
                        yield bytes(pending) + out[start:end + 1]
                    pending.clear()
                    dropped, start = 0, end + 1
                if dropped or len(pending) + len(out) - start > max_line:
                    dropped += len(pending) + len(out) - start
                    pending.clear()
                else:
                    pending += out[start:]
    if dropped:
        yield Oversized(dropped)
    elif pending:
        yield bytes(pending)
    if in_frame:
        raise TruncatedFrame("the last zstd frame is incomplete")


def read_segment(seg: Segment, stats: ReplayStats) -> Iterator[tuple[float, str, dict, bytes]]:
    """(timestamp, stream, document, line) of every valid line of one segment."""
    import zstandard

    stream = schemas.stream_of(seg.topic)
    stats.files += 1
    n = 0
    try:
        with open(seg.path, "rb") as f:
            for n, line in enumerate(zstd_lines(f), 1):
                where = f"{seg.path.name}:{n}"
                if isinstance(line, Oversized):
                    stats.problem(f"{where}: skipped, a line of {line.size} bytes, over the "
                                  f"{MAX_MESSAGE_BYTES}-byte limit")
                    continue
                if not line.endswith(b"\n"):
                    stats.problem(f"{where}: skipped, truncated line (no newline at end of segment)")
                    continue
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    stats.problem(f"{where}: skipped, not JSON ({e})")
                    continue
                if not schemas.is_valid(stream, doc):
                    errs = schemas.errors(stream, doc) or ["(rejected by the compiled validator)"]
                    stats.problem(f"{where}: skipped, breaks the {stream} schema ({errs[0]})")
                    continue
                yield schemas.parse_time(doc["@timestamp"]), stream, doc, line.rstrip(b"\n")
    except (zstandard.ZstdError, TruncatedFrame) as e:
        stats.problem(f"{seg.path.name}: compressed data truncated or corrupt after line {n} ({e}); "
                      "rest of the file skipped", bad_file=True)
    except OSError as e:
        stats.problem(f"{seg.path.name}: cannot read ({e.strerror}); skipped", bad_file=True)


def ordered(segments: list[Segment], stats: ReplayStats) -> Iterator[tuple[float, str, dict, bytes]]:
    """All lines, each partition in offset order, partitions merged by timestamp."""
    by_partition: dict[tuple[str, int], list[Segment]] = {}
    for s in segments:
        by_partition.setdefault((s.topic, s.partition), []).append(s)

    def partition_lines(segs: list[Segment]):
        for s in sorted(segs, key=lambda s: s.first):
            yield from read_segment(s, stats)

    return heapq.merge(*(partition_lines(v) for v in by_partition.values()), key=lambda r: r[0])


def replay(segments: list[Segment], filters: Filters, emit: Callable[[str, dict, bytes], None],
           speed: float, stats: ReplayStats, sleep=time.sleep, clock=time.monotonic) -> None:
    """Emit every matching line; with `speed` > 0, keep the original gaps divided by speed."""
    first_ts = started = None
    for ts, stream, doc, line in ordered(segments, stats):
        if not filters.match(stream, doc, ts):
            stats.filtered += 1
            continue
        if speed > 0:
            if first_ts is None:
                first_ts, started = ts, clock()
            delay = (ts - first_ts) / speed - (clock() - started)
            if delay > 0:
                sleep(delay)
        emit(stream, doc, line)
        stats.replayed += 1


class StdoutSink:
    def __init__(self) -> None:
        self._out = sys.stdout.buffer

    def emit(self, stream: str, doc: dict, line: bytes) -> None:
        self._out.write(line + b"\n")

    def close(self) -> int:
        self._out.flush()
        return 0


class KafkaSink:
    """To `<prefix>.<stream>`, keyed and with headers as the producer does; idempotent."""

    def __init__(self, conf: dict, prefix: str, streams: list[str]):
        from confluent_kafka import Producer

        from xdpwatch.kafka.admin import ensure_topics
        from xdpwatch.kafka.config import client
        from xdpwatch.kafka.produce import STREAMING

        ensure_topics(conf, [schemas.topic(prefix, s) for s in streams])
        self.prefix = prefix
        self.failed = 0
        self._errors: list[str] = []
        self._p = client(Producer, {**conf, **STREAMING})

    def _delivered(self, err, _msg) -> None:
        if err is not None:
            self.failed += 1
            if len(self._errors) < 3:
                self._errors.append(err.str())

    def emit(self, stream: str, doc: dict, line: bytes) -> None:
        topic = schemas.topic(self.prefix, stream)
        while True:
            try:
                self._p.produce(topic, line, schemas.key_of(stream, doc), headers=schemas.headers(stream),
                                on_delivery=self._delivered)
                break
            except BufferError:  # local queue full: let deliveries drain
                self._p.poll(0.5)
        self._p.poll(0)

    def close(self, timeout: float = 60.0) -> int:
        """Wait for every delivery; returns how many were not delivered."""
        pending = self._p.flush(timeout)
        if self._errors:
            log.error("delivery failed: %s", "; ".join(self._errors))
        return self.failed + pending
