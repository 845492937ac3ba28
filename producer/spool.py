"""A bounded on-disk overflow for events Kafka cannot take yet.

librdkafka keeps unsent events in memory, up to `queue.buffering.max.messages`. When the
broker is away long enough to fill that queue, the exporter appends events here instead, in
order, and sends them again oldest first once the queue has room; while anything is spooled,
new events queue up behind it, so per-flow order is kept. At shutdown, what Kafka did not
take in time is written back here as well. A spool left by an earlier run (a crash, or a stop
while Kafka was down) is sent first by the next one.

Layout: DIR/<seq>.spool segment files, each a sequence of records
    header (stream-name length u8, key length u16 (0xFFFF = no key), value length u32), stream, key, value
A torn record at the end of a segment (a crash mid-write) is skipped and counted.

Whatever is in the directory, the spool opens (damage is skipped, counted in `corrupt` and
logged once per file, everything else is kept and sent): a `*.spool` file whose name is not a
number, or that is not a regular file, is left in place; a record whose stream name is not
UTF-8 is skipped; a header announcing more than MAX_VALUE_BYTES (no event comes close) ends
what can be read of its segment. Files not named `*.spool` are never looked at. No spool
file is opened through a symbolic link.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!BHI")
_NO_KEY = 0xFFFF
SEGMENT_BYTES = 16 << 20
FIRST_SEQ = 10**9  # room below for segments written back at shutdown (see prepend)
MAX_VALUE_BYTES = 16 << 20  # events are under 2 KB: a longer value means a corrupt header

Record = tuple[str, "bytes | None", bytes]


class Spool:
    def __init__(self, directory: Path, max_bytes: int):
        self.dir = directory
        self.max_bytes = max_bytes
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.torn = 0  # torn records skipped
        self.corrupt = 0  # files, records and unreadable segment ends skipped as corrupt
        self._segments: deque[Path] = deque(sorted(self._find_segments(), key=_seq))
        self.bytes = sum(p.stat().st_size for p in self._segments)
        self._fd = self._writer_path = None
        self._fd_size = 0
        self._reader = None
        self._next: Record | None = None
        self._next_pos = 0
        self._bad_stream_seen = self._bad_header = False  # in the segment being read
        self._count = sum(self._scan(p) for p in self._segments)

    def __len__(self) -> int:
        """Events waiting in the spool."""
        return self._count

    # ---------------------------------------------------------------- writing
    def append(self, stream: str, key: bytes | None, value: bytes) -> bool:
        """Add one event at the end (one unbuffered write: a crash of this process loses
        nothing appended); False, with nothing added, when the spool is full or the disk
        refuses the write."""
        record = _encode(stream, key, value)
        if self.bytes + len(record) > self.max_bytes:
            return False
        try:
            if self._fd is None or self._fd_size >= SEGMENT_BYTES:
                self._open_writer()
            written = os.write(self._fd, record)
        except OSError as e:
            written, error = 0, e
        else:
            error = None
        self.bytes += written
        self._fd_size += written
        if written != len(record):
            # Disk full: seal this segment; a torn tail counts as one record, which the
            # reader skips and discounts, as it does for one left by a crash.
            self._count += written > 0
            self._close_writer()
            log.error("spool write to %s failed (%s)", self.dir, error or "short write")
            return False
        self._count += 1
        return True

    def prepend(self, records: list[Record]) -> int:
        """Write `records` (older than anything spooled) in a segment read before all
        others; ignores the size bound, since these were already taken from Kafka's queue.
        Returns how many were written."""
        if records:
            self._rewrite_head(records)
        return len(records)

    def _rewrite_head(self, records: list[Record]) -> None:
        """A new first segment: `records`, then what is unread of a partly read head
        segment (which it replaces), so that nothing already popped is read again."""
        first = _seq(self._segments[0]) if self._segments else FIRST_SEQ
        path = self.dir / f"{first - 1:012d}.spool"
        data = b"".join(_encode(*r) for r in records)
        head = None
        if self._reader is not None:
            head = self._segments.popleft()
            self._reader.seek(self._next_pos if self._next is not None else self._reader.tell())
            data += self._reader.read()
            self._reader.close()
            self._reader = self._next = None
        with open(path, "wb", opener=_private) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if head is not None:
            if head == self._writer_path:
                self._close_writer()
            self.bytes -= head.stat().st_size
            head.unlink()
        self._segments.appendleft(path)
        self.bytes += len(data)
        self._count += len(records)

    def _open_writer(self) -> None:
        self._close_writer()
        last = _seq(self._segments[-1]) if self._segments else FIRST_SEQ - 1
        path = self.dir / f"{last + 1:012d}.spool"
        self._fd = _private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._fd_size = 0
        self._writer_path = path
        self._segments.append(path)

    def _close_writer(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = self._writer_path = None

    # ---------------------------------------------------------------- reading
    def head(self) -> list[Record]:
        """The records of the first segment, without taking them: the only ones an earlier
        run may have handed to Kafka already. A stop writes what Kafka had not acknowledged
        there (its acknowledgement may have been lost), and a crash leaves the segment it was
        sending from first; what follows was never handed over."""
        if not self._segments or self._reader is not None:
            return []
        out = []
        with open(self._segments[0], "rb", opener=_private) as f:
            saved = (self._next, self._next_pos, self._bad_stream_seen, self._bad_header, self._count, self.corrupt)
            self._reader = f
            try:
                while (record := self._read_one()) is not None:
                    out.append(record)
            finally:
                self._reader = None
                self._next, self._next_pos, self._bad_stream_seen, self._bad_header, self._count, self.corrupt = saved
        return out

    def peek(self) -> Record | None:
        """The oldest event, or None when the spool is empty; `pop` removes it."""
        while self._next is None and self._count and self._segments:
            if self._reader is None:
                self._reader = open(self._segments[0], "rb", opener=_private)
                self._bad_stream_seen = self._bad_header = False
            self._next = self._read_one()
            if self._next is None:  # end of this segment
                self._finish_segment()
        return self._next

    def pop(self) -> None:
        self._next = None
        self._count -= 1
        if not self._count:  # all sent: reclaim the disk
            self.close()
            for path in self._segments:
                path.unlink()
            self._segments.clear()
            self.bytes = 0

    def _read_one(self) -> Record | None:
        """The next record of the segment being read (a corrupt one is skipped and counted);
        None at its end, or where the rest cannot be read (torn or corrupt header)."""
        f = self._reader
        while True:
            start = self._next_pos = f.tell()
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                break
            n_stream, n_key, n_value = _HEADER.unpack(header)
            if n_value > MAX_VALUE_BYTES:
                self._bad_header = True
                break
            size = _body_size(n_stream, n_key, n_value)
            body = f.read(size)
            if len(body) < size:
                break
            try:
                stream = body[:n_stream].decode()
            except UnicodeDecodeError:
                self._skip_corrupt_record()
                continue
            key = None if n_key == _NO_KEY else body[n_stream:n_stream + n_key]
            return stream, key, body[len(body) - n_value:]
        f.seek(start)
        return None

    def _skip_corrupt_record(self) -> None:
        self._count -= 1
        self.corrupt += 1
        if not self._bad_stream_seen:
            self._bad_stream_seen = True
            log.warning("spool segment %s holds records whose stream name is not UTF-8 (the file was damaged): "
                        "each is skipped and counted, the others are sent", self._segments[0].name)

    def _finish_segment(self) -> None:
        path = self._segments[0]
        if path == self._writer_path:
            self._close_writer()
        tail = path.stat().st_size - self._reader.tell()
        self._reader.close()
        self._reader = None
        if tail:
            self._count -= 1
            if self._bad_header:
                self.corrupt += 1
                log.warning("spool segment %s: a record header is corrupt (it announces a value over %d bytes) %d bytes "
                            "before the end; that rest cannot be read and is skipped, the records before it were sent",
                            path.name, MAX_VALUE_BYTES, tail)
            else:
                self.torn += 1
                log.warning("spool segment %s ends with a torn record (%d bytes, from a crash or a full disk "
                            "mid-write): skipped", path.name, tail)
        self.bytes -= path.stat().st_size
        path.unlink()
        self._segments.popleft()

    def _find_segments(self) -> list[Path]:
        """The directory's segments: regular files named `<number>.spool`. Any other
        `*.spool` is skipped, counted and left where it is."""
        found = []
        for path in self.dir.glob("*.spool"):
            if path.stem.isascii() and path.stem.isdigit() and stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
            else:
                self.corrupt += 1
                log.warning("spool %s: %s is not a spool segment (its name must be a number and it must be a regular "
                            "file): skipped and left in place; move it out of the spool directory", self.dir, path.name)
        return found

    def _scan(self, path: Path) -> int:
        """Records in a segment left by an earlier run (a torn tail, or what follows a
        corrupt header, counts as one, found and discounted when read)."""
        n, pos, size = 0, 0, path.stat().st_size
        with open(path, "rb", opener=_private) as f:
            while pos < size:
                f.seek(pos)
                header = f.read(_HEADER.size)
                n += 1
                if len(header) < _HEADER.size:
                    break
                n_stream, n_key, n_value = _HEADER.unpack(header)
                if n_value > MAX_VALUE_BYTES:
                    break
                pos += _HEADER.size + _body_size(n_stream, n_key, n_value)
        return n

    def close(self) -> None:
        """Make everything durable; what was popped is never read again."""
        if self._reader is not None:
            if self._count:
                self._rewrite_head([])
            else:
                self._reader.close()
                self._reader = None
        self._close_writer()


def _encode(stream: str, key: bytes | None, value: bytes) -> bytes:
    s = stream.encode()
    return _HEADER.pack(len(s), _NO_KEY if key is None else len(key), len(value)) + s + (key or b"") + value


def _body_size(n_stream: int, n_key: int, n_value: int) -> int:
    return n_stream + (0 if n_key == _NO_KEY else n_key) + n_value


def _seq(path: Path) -> int:
    return int(path.stem)


def _private(path, flags):
    """Open a spool file (0600 when created), never through a symbolic link."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)
