"""`xdpwatch archive`: every topic-partition into zstd-compressed JSON-lines segment files.

Layout of `--dir` (flat; `zstdcat FILE` reads any segment):

    <topic>.p<partition>.<first offset:020>-<last offset:020>.jsonl.zst   complete segment
    .<topic>.p<partition>.open                                           segment being written

One line per message: its value exactly as it arrived (re-serialized only if it spanned
lines). The name's offset range covers every offset consumed into the segment; offsets
in the range that have no line were dead-lettered (see the dead-letter sink).

Exactly once across crashes, in this order:
  1. lines go to the hidden `.open` file;
  2. on roll (size, age, shutdown, partition revoked): end the zstd frame, fsync the file,
     rename it to its final name, fsync the directory;
  3. only then is `last + 1` committed for the group.
A crash before 3 leaves a complete file whose offsets are not committed; a crash before 2
leaves an `.open` file that is discarded. On assignment the archiver starts each partition
at max(last offset in the files + 1, committed offset): files are the truth, commits only
help when files were moved away. So every offset lands in exactly one segment.

Nobody else can plant files here: an existing directory writable by group or others, or
owned by another user, is refused. No file is opened through a symbolic link, and those the
archiver creates (`.open`, the write probe) are created as new files only (O_EXCL), 0600. A
leftover at one of their names (a crash's, or a planted link) is removed first, by unlink,
which never follows a link: `.open` when its partition is assigned, the probe just before
it is written. One that appears in between stops the archiver with a clear error, and the
file it points to is never touched.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from xdpwatch.consumers.base import crash_point
from xdpwatch.consumers.errors import ConsumerError

log = logging.getLogger(__name__)

SEGMENT_RE = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)\.p(?P<partition>\d+)\."
                        r"(?P<first>\d{20})-(?P<last>\d{20})\.jsonl\.zst$")
LOCK_NAME = ".xdpwatch-archive.lock"

# The archive's crash points (consumers.base.crash_point, for tests): `write` (a line went into
# the open file), `frame-end` (zstd frame ended, not fsynced), `fsync` (fsynced, not renamed),
# `rename` (renamed, directory not fsynced), `commit` (all durable, offsets about to be committed).
CRASH_POINTS = ("write", "frame-end", "fsync", "rename", "commit")


@dataclass(frozen=True)
class Segment:
    path: Path
    topic: str
    partition: int
    first: int
    last: int

    @classmethod
    def parse(cls, path: Path) -> "Segment | None":
        m = SEGMENT_RE.match(path.name)
        if not m:
            return None
        return cls(path, m["topic"], int(m["partition"]), int(m["first"]), int(m["last"]))


def segment_name(topic: str, partition: int, first: int, last: int) -> str:
    return f"{topic}.p{partition}.{first:020d}-{last:020d}.jsonl.zst"


def list_segments(directory: Path) -> list[Segment]:
    """Complete segments in `directory`, by topic, partition, first offset."""
    segs = [s for p in directory.iterdir() if (s := Segment.parse(p))]
    return sorted(segs, key=lambda s: (s.topic, s.partition, s.first))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_new(path: Path) -> int:
    """A new file of the archiver's, 0600: never through a symbolic link, never an existing file."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _check_private(directory: Path) -> None:
    """Refuse a directory that someone else could plant files or links in."""
    st = directory.stat()
    if st.st_uid != os.geteuid():
        raise ConsumerError(f"archive {directory}: owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); "
                            "its owner could plant or swap files: chown it to this user, or choose another --dir")
    if st.st_mode & 0o022:
        raise ConsumerError(f"archive {directory}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                            "they could plant or swap files: chmod go-w it (0700 is best), or choose another --dir")


def _storage_error(directory: Path, what: str, e: OSError) -> ConsumerError:
    if e.errno in (errno.ELOOP, errno.EEXIST):  # O_NOFOLLOW, O_EXCL
        hint = (f"{Path(e.filename).name} is in the way: a symbolic link, or a file the archiver did not "
                "create (it never follows or overwrites one); remove it")
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk is full: free space (or point --dir elsewhere) and start again"
    elif e.errno == errno.EROFS:
        hint = "the file system is read-only"
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = "the directory is not writable by this user"
    else:
        hint = e.strerror or str(e)
    return ConsumerError(f"archive {directory}: {what} failed: {hint}. Nothing past the last complete "
                         "segment was committed; a restart resumes from the files.")


class _OpenSegment:
    """One partition's segment being written: a hidden file behind a zstd stream."""

    def __init__(self, directory: Path, topic: str, partition: int, first: int, level: int):
        import zstandard

        self.directory, self.topic, self.partition = directory, topic, partition
        self.first = self.last = first
        self.lines = self.raw_bytes = 0
        self.opened = time.monotonic()
        self.tmp = directory / f".{topic}.p{partition}.open"
        # Evidence: readable by the archiving user only (0600), whatever the umask; a link or
        # file in the way (removed at assignment, so planted since) is refused.
        self._file = os.fdopen(_create_new(self.tmp), "wb")
        self._zw = zstandard.ZstdCompressor(level=level).stream_writer(self._file, closefd=False)

    def write(self, offset: int, line: bytes) -> None:
        self._zw.write(line)
        self.last = offset
        self.lines += 1
        self.raw_bytes += len(line)
        crash_point("write")

    def finish(self) -> Segment:
        """End the frame, fsync, rename to the final name, fsync the directory."""
        self._zw.close()
        self._file.flush()
        crash_point("frame-end")
        os.fsync(self._file.fileno())
        self._file.close()
        crash_point("fsync")
        final = self.directory / segment_name(self.topic, self.partition, self.first, self.last)
        os.rename(self.tmp, final)
        crash_point("rename")
        _fsync_dir(self.directory)
        return Segment(final, self.topic, self.partition, self.first, self.last)

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


class Archiver:
    """The archive consumer's handler (an OffsetOwner for consumers.base.run_loop)."""

    owns_offsets = True

    def __init__(self, directory: Path, roll_bytes: int, roll_seconds: float, level: int = 3):
        self.directory = directory
        self.roll_bytes, self.roll_seconds, self.level = roll_bytes, roll_seconds, level
        self.segments_written = self.lines_written = 0
        self._open: dict[tuple[str, int], _OpenSegment] = {}
        self._durable: dict[tuple[str, int], int] = {}   # made durable, not yet handed to commit
        self._failed = False
        self._lock = self._take_dir(directory)

    @staticmethod
    def _take_dir(directory: Path):
        """Create/check the directory and lock it: one archiver per directory."""
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing one keeps its mode
            _check_private(directory)
            # The lock file stays between runs: opened, never written, never through a link.
            lock = os.fdopen(os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o600), "rb")
        except OSError as e:
            raise _storage_error(directory, "opening the archive directory", e) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConsumerError(f"archive {directory}: another xdpwatch archive is writing to this "
                                "directory; give each archiver its own --dir") from None
        probe = directory / f".probe-{os.getpid()}"
        try:
            probe.unlink(missing_ok=True)  # a crash's leftover (a container's pid is the same every run)
            fd = _create_new(probe)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as e:
            raise _storage_error(directory, "a test write", e) from None
        return lock

    # --- OffsetOwner -------------------------------------------------------------------
    def assigned(self, partitions: list, committed: dict[tuple[str, int], int]) -> None:
        from confluent_kafka import OFFSET_INVALID

        on_disk: dict[tuple[str, int], int] = {}
        for s in list_segments(self.directory):
            on_disk[(s.topic, s.partition)] = max(on_disk.get((s.topic, s.partition), -1), s.last + 1)
        for p in partitions:
            tp = (p.topic, p.partition)
            (self.directory / f".{p.topic}.p{p.partition}.open").unlink(missing_ok=True)  # a crash's leftover
            start = max(on_disk.get(tp, -1), committed.get(tp, -1))
            p.offset = start if start >= 0 else OFFSET_INVALID  # nothing known: auto.offset.reset
            log.info("archive %s[%d]: starting at %s (files: %s, committed: %s)", p.topic, p.partition,
                     start if start >= 0 else "the reset position", on_disk.get(tp, "none"),
                     committed.get(tp, "none"))

    def revoked(self, partitions: list) -> None:
        for p in partitions:
            self._roll((p.topic, p.partition))

    def handle(self, ev) -> None:
        line = ev.value if b"\n" not in ev.value else orjson.dumps(ev.doc)
        seg = self._segment(ev.topic, ev.partition, ev.offset)
        self._guard("writing a segment", seg.write, ev.offset, line + b"\n")
        if seg.raw_bytes >= self.roll_bytes:
            self._roll((ev.topic, ev.partition))

    def skipped(self, topic: str, partition: int, offset: int) -> None:
        tp = (topic, partition)
        if tp in self._open:
            self._open[tp].last = offset  # inside the segment's range, without a line
        else:
            self._durable[tp] = offset + 1

    def tick(self) -> None:
        now = time.monotonic()
        for tp, seg in list(self._open.items()):
            if now - seg.opened >= self.roll_seconds:
                self._roll(tp)

    def durable(self) -> list:
        from confluent_kafka import TopicPartition

        out = [TopicPartition(t, p, off) for (t, p), off in self._durable.items()]
        self._durable.clear()
        if out:
            crash_point("commit")
        return out

    def close(self) -> None:
        for tp in list(self._open):
            self._roll(tp)

    # --- internals ---------------------------------------------------------------------
    def _segment(self, topic: str, partition: int, offset: int) -> _OpenSegment:
        tp = (topic, partition)
        seg = self._open.get(tp)
        if seg is None:
            seg = self._guard("opening a segment", _OpenSegment, self.directory, topic, partition, offset,
                              self.level)
            self._open[tp] = seg
        return seg

    def _roll(self, tp: tuple[str, int]) -> None:
        seg = self._open.pop(tp, None)
        if seg is None or self._failed:
            return
        done = self._guard("finishing a segment", seg.finish, discard=seg)
        self._durable[tp] = done.last + 1
        self.segments_written += 1
        self.lines_written += seg.lines
        log.info("archived %s (%d lines, %d bytes uncompressed)", done.path.name, seg.lines, seg.raw_bytes)

    def _guard(self, what: str, fn, *args, discard: _OpenSegment | None = None):
        """Run a storage step; on failure, stop archiving for good and raise a clear error."""
        try:
            return fn(*args)
        except OSError as e:
            self._failed = True
            for seg in [*self._open.values(), *([discard] if discard else [])]:
                seg.discard()  # frees the space; their offsets were never committed
            self._open.clear()
            raise _storage_error(self.directory, what, e) from None
