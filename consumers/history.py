"""Reading topics back: what a consumer group already handled, and what a consumer already
published. A restart or a rebalance uses it to rebuild the state the group's last owner had
(consumers/alert.py: windows, baselines, cooldowns) and to skip what is already in Kafka.

Any broker that speaks the Kafka protocol will do; two rules come from the test broker
(Tansu 0.6, measured):
- the end of a partition is the end-of-partition event of a fetch, never a ListOffsets
  answer asked for beforehand (Tansu's is too low);
- a lookup by time (offsets_for_times) is a hint: its answer is checked against the message
  before it, and a partition is read from its beginning when that message is not older than
  asked (Tansu ignores record timestamps there). Reading more than needed is always correct.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Iterator

from xdpwatch.consumers.errors import ConsumerError

log = logging.getLogger(__name__)

# Producer, broker and consumer hosts' clocks may differ, and a message's timestamp is when it
# was produced, not when its event happened: reads by time start this much earlier.
MARGIN_S = 60.0
_GROUP_KEYS = ("group.id", "enable.auto.commit", "enable.auto.offset.store", "auto.offset.reset", "stats_cb",
               "statistics.interval.ms", "error_cb")


class Reader:
    """Reads partitions by offset or from a time, to an offset or to their end, with its own
    consumer (no group: it never commits, and never joins the caller's group)."""

    def __init__(self, conf: dict, stall_timeout: float = 30.0):
        from confluent_kafka import Consumer, KafkaException

        self.stall_timeout = stall_timeout
        client = {k: v for k, v in conf.items() if k not in _GROUP_KEYS}
        try:
            self._c = Consumer({**client, "group.id": f"xdpwatch-readback-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                                "enable.auto.commit": False, "enable.partition.eof": True,
                                "fetch.wait.max.ms": 50}, logger=logging.getLogger("librdkafka"))
        except KafkaException as e:
            raise ConsumerError(f"invalid Kafka setting: {e.args[0].str()}") from None

    def partitions(self, topic: str) -> list[int]:
        """The partitions of `topic`; [] when it does not exist (yet)."""
        from confluent_kafka import KafkaException

        try:
            meta = self._c.list_topics(topic, timeout=15).topics[topic]
        except KafkaException as e:
            raise ConsumerError(f"cannot read {topic} back: {e.args[0].str()}") from None
        return [] if meta.error is not None else sorted(meta.partitions)

    def message_at(self, topic: str, partition: int, offset: int):
        """The message at `offset`, or None when there is none (removed by retention)."""
        return next(self.read([(topic, partition, offset, offset + 1)]), None)

    def start(self, topic: str, partition: int, since_s: float) -> int:
        """An offset from which every message of the partition produced at `since_s` or
        later is read (a lower bound: more may come)."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        if since_s <= 0:
            return OFFSET_BEGINNING
        (tp,) = self._c.offsets_for_times([TopicPartition(topic, partition, int(since_s * 1000))], timeout=15)
        if tp.error is not None or tp.offset <= 0:
            return OFFSET_BEGINNING
        before = self.message_at(topic, partition, tp.offset - 1)
        if before is None or before.timestamp()[1] >= since_s * 1000:  # not a time index: read it all
            return OFFSET_BEGINNING
        return tp.offset

    def read(self, ranges: list[tuple[str, int, int, int | None]]) -> Iterator:
        """The messages of each (topic, partition, start, end): from `start` (an offset or
        OFFSET_BEGINNING) up to `end` excluded, or to the partition's end with None; each
        partition in offset order. Raises ConsumerError when nothing arrives for
        `stall_timeout` s before the ends are reached."""
        from confluent_kafka import KafkaError, TopicPartition

        ends = {(t, p): end for t, p, start, end in ranges if end is None or start < 0 or start < end}
        if not ends:
            return
        assigned = [TopicPartition(t, p, start) for t, p, start, _ in ranges if (t, p) in ends]
        self._c.assign(assigned)
        self._c.resume(assigned)  # librdkafka keeps a partition paused by an earlier read across assignments

        def done(key) -> None:  # stop fetching what is read
            del ends[key]
            self._c.pause([TopicPartition(*key)])

        last_progress = time.monotonic()
        try:
            while ends:
                for m in self._c.consume(1000, 0.2):
                    key = (m.topic(), m.partition())
                    if key not in ends:
                        continue
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            done(key)
                            last_progress = time.monotonic()
                        elif err.fatal():
                            raise ConsumerError(f"reading {key[0]}[{key[1]}] back: {err.str()}")
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
                    raise ConsumerError(f"reading back {', '.join(f'{t}[{p}]' for t, p in ends)} stalled: no message "
                                        f"for {self.stall_timeout:.0f}s before the end; is the broker up?")
        finally:
            self._c.unassign()

    def tail(self, topic: str, since_s: float) -> Iterator:
        """Every message of `topic` produced at `since_s` or later (and maybe some before),
        each partition in order, up to the end of each partition."""
        return self.read([(topic, p, self.start(topic, p, since_s), None) for p in self.partitions(topic)])

    def close(self) -> None:
        self._c.close()
