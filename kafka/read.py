"""Reading topics: by offset or from a time, to an offset or to the end of each partition,
and on from there. What reads a topic uses this: the alert consumer rebuilding its state
after a restart or a rebalance (and skipping what it published already), the producer's
spool check at start (`read_back_ids`) and its control topic (`ControlReader`), `xdpwatch
blocks`, the demo's live view and the tests.

Any broker that speaks the Kafka protocol will do; two rules come from the test broker
(Tansu 0.6, measured):
- the end of a partition is the end-of-partition event of a fetch, never a ListOffsets
  answer asked for beforehand (Tansu's is too low: 16,727 for 20,005 records);
- a lookup by time (offsets_for_times) is a hint: its answer is checked against the message
  before it, and a partition is read from its beginning when that message is not older than
  asked (Tansu ignores record timestamps there). Reading more than needed is always correct.
"""

from __future__ import annotations

import collections
import os
import socket
import time
import uuid
from typing import Iterator

from xdpwatch import schemas
from xdpwatch.errors import BrokerError
from xdpwatch.kafka.admin import reach
from xdpwatch.kafka.config import client

# Producer, broker and consumer hosts' clocks may differ, and a message's timestamp is when it
# was produced, not when its event happened: reads by time start this much earlier.
MARGIN_S = 60.0
# Settings of a consumer group member, which a Reader never is.
_GROUP_KEYS = ("group.id", "enable.auto.commit", "enable.auto.offset.store", "auto.offset.reset", "stats_cb",
               "statistics.interval.ms", "error_cb")


class Reader:
    """Reads partitions with its own consumer, assigned (no group: it never commits, and never
    joins the caller's group). `conf`: the client settings (bootstrap.servers, -X ...);
    `tuning` goes under them, what a Reader needs over them. `purpose` names it to the broker."""

    def __init__(self, conf: dict, purpose: str = "readback", stall_timeout: float = 30.0,
                 tuning: dict | None = None):
        from confluent_kafka import Consumer

        self.stall_timeout = stall_timeout
        self.conf = {k: v for k, v in conf.items() if k not in _GROUP_KEYS}
        self._errors: collections.deque = collections.deque(maxlen=20)
        group = f"xdpwatch-{purpose}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._c = client(Consumer, {"fetch.wait.max.ms": 50, **(tuning or {}), **self.conf, "group.id": group,
                                    "enable.auto.commit": False, "enable.partition.eof": True}, self._errors)

    def metadata(self, topic: str | None = None):
        """The cluster's metadata (of `topic` alone if given); BrokerError if Kafka cannot be reached."""
        return reach(self._c, self.conf, self._errors, topic=topic)

    def partitions(self, topic: str) -> list[int]:
        """The partitions of `topic`; [] when it does not exist (yet)."""
        meta = self.metadata(topic).topics[topic]
        return [] if meta.error is not None else sorted(meta.partitions)

    def message_at(self, topic: str, partition: int, offset: int):
        """The message at `offset`, or None when there is none (removed by retention)."""
        return next(self.read([(topic, partition, offset, offset + 1)]), None)

    def starts(self, partitions: list[tuple[str, int]], since_s: float) -> list[tuple[str, int, int]]:
        """(topic, partition, offset) for each of `partitions`: from that offset, every message
        produced at `since_s` or later is read (a lower bound: more may come). A time lookup,
        kept where the message before its answer is older than asked, else the beginning."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        if since_s <= 0 or not partitions:
            return [(t, p, OFFSET_BEGINNING) for t, p in partitions]
        try:
            found = self._c.offsets_for_times([TopicPartition(t, p, int(since_s * 1000)) for t, p in partitions],
                                              timeout=15)
        except KafkaException as e:
            raise BrokerError(f"cannot look up offsets by time in {_topics(partitions)}: {e.args[0].str()}") from None
        probes = {(tp.topic, tp.partition): tp.offset for tp in found if tp.error is None and tp.offset > 0}
        trusted = {(m.topic(), m.partition()) for m in self.read([(t, p, o - 1, o) for (t, p), o in probes.items()])
                   if m.timestamp()[1] < since_s * 1000}  # else not a time index: read it all
        return [(t, p, probes[(t, p)] if (t, p) in trusted else OFFSET_BEGINNING) for t, p in partitions]

    def start(self, topic: str, partition: int, since_s: float) -> int:
        """`starts` of one partition."""
        return self.starts([(topic, partition)], since_s)[0][2]

    def read(self, ranges: list[tuple[str, int, int, int | None]], follow: bool = False,
             what: str | None = None) -> Iterator:
        """The messages of each (topic, partition, start, end): from `start` (an offset or
        OFFSET_BEGINNING) up to `end` excluded, or to the partition's end with None; each
        partition in offset order. BrokerError, naming `what` is read (default: the topics),
        when nothing arrives for `stall_timeout` s before the ends are reached (however long
        the whole read takes while it progresses).

        With `follow`, the partitions stay assigned once at their end: what arrives in one
        while others are still read is handed over too, and `poll` takes what comes next."""
        from confluent_kafka import KafkaError, TopicPartition

        ends = {(t, p): end for t, p, start, end in ranges if end is None or start < 0 or start < end}
        if not ends:
            return
        self.follow([(t, p, start) for t, p, start, _ in ranges if (t, p) in ends])

        def done(key) -> None:
            del ends[key]
            if not follow:  # stop fetching what is read
                self._c.pause([TopicPartition(*key)])

        last_progress = time.monotonic()
        try:
            while ends:
                for m in self._c.consume(1000, 0.2):
                    key = (m.topic(), m.partition())
                    err = m.error()
                    if err is not None:
                        if err.fatal():
                            raise BrokerError(f"reading {key[0]}[{key[1]}]: {err.str()}")
                        if key in ends and err.code() == KafkaError._PARTITION_EOF:
                            done(key)
                            last_progress = time.monotonic()
                        continue
                    if key not in ends:
                        if follow:
                            yield m
                        continue
                    last_progress = time.monotonic()
                    end = ends[key]
                    if end is not None and m.offset() >= end:
                        done(key)
                        continue
                    yield m
                    if end is not None and m.offset() + 1 >= end:
                        done(key)
                if ends and time.monotonic() - last_progress > self.stall_timeout:
                    raise BrokerError(f"reading {what or _topics(ends)} stalled: no message for "
                                      f"{self.stall_timeout:.0f}s before its end ({_partitions(ends)}); "
                                      "is the broker up?")
        finally:
            if not follow:
                self._c.unassign()

    def follow(self, starts: list[tuple[str, int, int]]) -> None:
        """Read each (topic, partition) from its `start` offset (or OFFSET_BEGINNING) on:
        `poll` takes what comes, as it comes."""
        from confluent_kafka import TopicPartition

        assigned = [TopicPartition(t, p, start) for t, p, start in starts]
        self._c.assign(assigned)
        self._c.resume(assigned)  # librdkafka keeps a partition paused by an earlier read across assignments

    def tail(self, topic: str, since_s: float = 0.0) -> Iterator:
        """Every message of `topic` produced at `since_s` or later (and maybe some before;
        all of them by default), each partition in order, up to the end of each partition."""
        starts = self.starts([(topic, p) for p in self.partitions(topic)], since_s)
        return self.read([(t, p, start, None) for t, p, start in starts])

    def poll(self, max_messages: int = 500, timeout: float = 0.0) -> list:
        """After `follow` or a `read(..., follow=True)`: the next messages, waiting at most
        `timeout` s; end-of-partition events left out, other errors left in (`m.error()`)
        for the caller."""
        from confluent_kafka import KafkaError

        return [m for m in self._c.consume(max_messages, timeout)
                if m.error() is None or m.error().code() != KafkaError._PARTITION_EOF]

    def close(self) -> None:
        self._c.close()


def _topics(keys) -> str:
    names = sorted({t for t, *_ in keys})
    return f"topic {names[0]}" if len(names) == 1 else f"topics {', '.join(names)}"


def _partitions(keys) -> str:
    """`partitions [0, 2]` of one topic, `partitions a[0], b[2]` of several."""
    keys = sorted(keys)
    if len({t for t, _ in keys}) == 1:
        return f"partitions {[p for _, p in keys]}"
    return "partitions " + ", ".join(f"{t}[{p}]" for t, p in keys)


def read_back_ids(conf: dict, topics: list[str], wanted: set[str], since_s: float,
                  stall_timeout: float = 30.0) -> set[str]:
    """The ids of `wanted` that are the event.id of a message of `topics` produced at
    `since_s` or later: every partition read from there to its end (Reader.starts, read)."""
    prefixes = {i.rsplit("-", 1)[0].encode() for i in wanted}  # one per producer run: a cheap first filter
    found: set[str] = set()
    reader = Reader(conf, "spool-check", stall_timeout)
    try:
        partitions = [(t, p) for t in topics for p in reader.partitions(t)]
        for m in reader.read([(t, p, start, None) for t, p, start in reader.starts(partitions, since_s)]):
            value = m.value()
            if value and any(p in value for p in prefixes):
                eid = schemas.event_id(value)
                if eid in wanted:
                    found.add(eid)
    finally:
        reader.close()
    return found


class ControlReader:
    """The control topic (block/unblock commands) as the producer's enforcement reads it:
    `catch_up` streams every partition from its beginning to its end (each start replays every
    command, which rebuilds the blocks still within their TTL), then `poll` follows it without
    blocking, from the run loop. `brokers`: the cluster's brokers, as it names them."""

    # Commands are small: fetches of at most 1 MiB a partition keep what librdkafka reads
    # ahead to ~100 MB instead of ~250 MB while a long topic is restored (measured on
    # 1,000,000 commands; the read itself then takes 6 s instead of 3, still ahead of the
    # Enforcer). It follows the topic as long as the producer runs: librdkafka's usual 500 ms
    # fetch wait, not a read back's 50. -X may change them.
    TUNING = {"fetch.max.bytes": 2 << 20, "max.partition.fetch.bytes": 1 << 20, "fetch.wait.max.ms": 500}

    def __init__(self, conf: dict, topic: str, stall_timeout: float = 15.0):
        self.topic = topic
        self._reader = Reader(conf, "control", stall_timeout, self.TUNING)
        meta = self._reader.metadata(topic)
        self.brokers = [f"{b.host}:{b.port}" for b in meta.brokers.values()]
        self._partitions = sorted(meta.topics[topic].partitions)

    def catch_up(self) -> Iterator[bytes]:
        """Every command already in the topic (up to its end when called), in order, as a
        stream: memory does not grow with the topic. BrokerError when no message arrives for
        the stall timeout while the end is not reached."""
        from confluent_kafka import OFFSET_BEGINNING

        ranges = [(self.topic, p, OFFSET_BEGINNING, None) for p in self._partitions]
        for m in self._reader.read(ranges, follow=True, what=f"the control topic {self.topic}"):
            yield m.value()

    def poll(self) -> list[bytes]:
        return [m.value() for m in self._reader.poll() if m.error() is None]

    def close(self) -> None:
        self._reader.close()
