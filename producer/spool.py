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
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!BHI")
_NO_KEY = 0xFFFF
SEGMENT_BYTES = 16 << 20
FIRST_SEQ = 10**9  # room below for segments written back at shutdown (see prepend)

Record = tuple[str, "bytes | None", bytes]


class Spool:
    def __init__(self, directory: Path, max_bytes: int):
        self.dir = directory
        self.max_bytes = max_bytes
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._segments: deque[Path] = deque(sorted(directory.glob("*.spool"), key=_seq))
        self.bytes = sum(p.stat().st_size for p in self._segments)
        self.torn = 0  # torn records skipped
        self._fd = self._writer_path = None
        self._fd_size = 0
        self._reader = None
        self._next: Record | None = None
        self._next_pos = 0
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
        if self._fd is None or self._fd_size >= SEGMENT_BYTES:
            self._open_writer()
        try:
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
    def peek(self) -> Record | None:
        """The oldest event, or None when the spool is empty; `pop` removes it."""
        while self._next is None and self._count and self._segments:
            if self._reader is None:
                self._reader = open(self._segments[0], "rb")
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
        f = self._reader
        start = self._next_pos = f.tell()
        header = f.read(_HEADER.size)
        if len(header) == _HEADER.size:
            n_stream, n_key, n_value = _HEADER.unpack(header)
            size = _body_size(n_stream, n_key, n_value)
            body = f.read(size)
            if len(body) == size:
                stream = body[:n_stream].decode()
                key = None if n_key == _NO_KEY else body[n_stream:n_stream + n_key]
                return stream, key, body[len(body) - n_value:]
        f.seek(start)
        return None

    def _finish_segment(self) -> None:
        path = self._segments[0]
        if path == self._writer_path:
            self._close_writer()
        tail = path.stat().st_size - self._reader.tell()
        self._reader.close()
        self._reader = None
        if tail:
            self.torn += 1
            self._count -= 1
            log.warning("spool segment %s ends with a torn record (%d bytes, from a crash or a full disk mid-write): skipped",
                        path.name, tail)
        self.bytes -= path.stat().st_size
        path.unlink()
        self._segments.popleft()

    def _scan(self, path: Path) -> int:
        """Records in a segment left by an earlier run (a torn tail counts as one, found
        and discounted when read)."""
        n, pos, size = 0, 0, path.stat().st_size
        with open(path, "rb") as f:
            while pos < size:
                f.seek(pos)
                header = f.read(_HEADER.size)
                n += 1
                if len(header) < _HEADER.size:
                    break
                pos += _HEADER.size + _body_size(*_HEADER.unpack(header))
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
    return os.open(path, flags, 0o600)
