"""The loop every consumer shares: consume -> decode -> validate -> handle -> store offset.

- Offsets are stored only after the handler returned, i.e. after its side effect is done
  (`enable.auto.offset.store=False`); stored offsets are committed periodically and on
  shutdown. A crash re-delivers what was not handled: at-least-once.
- A message that is not JSON or breaks its topic's schema is a poison message: it goes to
  the dead-letter sink with the reason and the original bytes, its offset is stored, and
  the loop goes on. Nothing crashes, nothing is dropped silently. So does a message whose
  handling raised anything but an XdpwatchError (reason `handler-error: Type: message`): one
  message cannot stop a consumer. An XdpwatchError (a ConsumerError, the Kafka wing's
  BrokerError) is the handler's infrastructure failing (an output it cannot write): it stops
  the loop, and nothing past it is committed.
- SIGINT/SIGTERM set `stop`; the loop finishes the batch in hand, closes the handler,
  commits, and returns.
- A handler that makes its own side effects durable in batches (the archiver) sets
  `owns_offsets` and implements `OffsetOwner`: it chooses the start position of every
  assigned partition and says which offsets are durable; the loop commits exactly those.
"""

from __future__ import annotations

import base64
import collections
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from xdpwatch import schemas
from xdpwatch.consumers.errors import ConsumerError
from xdpwatch.errors import XdpwatchError
from xdpwatch.kafka.admin import reach
from xdpwatch.kafka.config import client
from xdpwatch.kafka.produce import AckedProducer

log = logging.getLogger(__name__)


@dataclass
class Event:
    """One decoded, schema-valid message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    stream: str
    doc: dict
    value: bytes  # the message as it arrived


class Handler(Protocol):
    def handle(self, ev: Event) -> None:
        """Do the side effect; return only when it is done (the offset is stored next)."""

    def close(self) -> None: ...


# Crash injection for tests: XDPWATCH_CRASH_AT=<point>:<n> makes the process SIGKILL itself the
# n-th time it reaches <point> (the archive's are in archive.CRASH_POINTS; the alert consumer's:
# `alert-published`, an alert acknowledged by Kafka, its offset not stored; `block-sent`, the same
# for a block command).
_crash_at = os.environ.get("XDPWATCH_CRASH_AT", "").partition(":")
_crash_hits = {"left": int(_crash_at[2] or 1)}


def crash_point(name: str) -> None:
    if name == _crash_at[0]:
        _crash_hits["left"] -= 1
        if not _crash_hits["left"]:
            os.kill(os.getpid(), signal.SIGKILL)


class RebalanceAware(Handler, Protocol):
    """A handler with state per partition: told which partitions it gets (before their first
    message: it may rebuild their state, reading with its own client) and loses (after their
    handled offsets are committed)."""

    def on_assign(self, consumer, partitions: list) -> None: ...
    def on_revoke(self, partitions: list) -> None: ...


class OffsetOwner(Handler, Protocol):
    owns_offsets: bool  # True

    def assigned(self, partitions: list, committed: dict[tuple[str, int], int]) -> None:
        """Set `.offset` of each TopicPartition to where consuming must start.
        `committed` maps (topic, partition) to the group's committed offset, if any."""

    def revoked(self, partitions: list) -> None:
        """Make everything handled for these partitions durable (they are going away)."""

    def skipped(self, topic: str, partition: int, offset: int) -> None:
        """A message was dead-lettered: its offset is done as far as the handler goes."""

    def tick(self) -> None:
        """Called after every poll, messages or not (time-based work)."""

    def durable(self) -> list:
        """TopicPartitions (offset = next to read) that became durable since the last call."""


class DeadLetterSink(Protocol):
    def put(self, record: dict) -> None: ...
    def close(self) -> None: ...


def append_private(path: str, what: str):
    """`path` opened for appending, created 0600 when new (whatever the umask), never through
    a symbolic link: a planted link can neither divert evidence nor extend another file.
    Raises ConsumerError naming `what` the file is for."""
    import errno

    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        why = "it is a symbolic link (never followed): give the real path" if e.errno == errno.ELOOP else e.strerror
        raise ConsumerError(f"cannot open {what} {path}: {why}") from None
    return os.fdopen(fd, "ab")


class FileDeadLetter:
    """Dead letters as JSON lines appended to a file (fsynced: they are evidence too; 0600)."""

    def __init__(self, path: str):
        self._f = append_private(path, "dead-letter file")

    def put(self, record: dict) -> None:
        self._f.write(orjson.dumps(record) + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class KafkaDeadLetter:
    """Dead letters to a Kafka topic; each put waits for the broker's acknowledgement."""

    def __init__(self, conf: dict, topic: str):
        self._out = AckedProducer(conf, topic, "a dead letter")

    def put(self, record: dict) -> None:
        self._out.send(orjson.dumps(record))

    def close(self) -> None:
        self._out.close()


@dataclass
class LoopStats:
    handled: int = 0
    dead_lettered: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class ConsumerMetrics:
    """Prometheus view of a consumer: messages handled and dead-lettered, the handler's own
    figures (`extra()` -> {name: (help, value)} counters, `gauges()` the same for gauges), and
    lag per partition from librdkafka's statistics (put `on_stats` as `stats_cb` in the
    consumer config)."""

    def __init__(self, command: str, stats: LoopStats, extra=lambda: {}, gauges=lambda: {}):
        self.command, self.stats, self.extra, self.gauges = command, stats, extra, gauges
        self.lag: dict[tuple[str, int], int] = {}

    def on_stats(self, raw: str) -> None:
        doc = orjson.loads(raw)
        self.lag = {(t, int(p)): part["consumer_lag"]
                    for t, topic in doc.get("topics", {}).items()
                    for p, part in topic.get("partitions", {}).items()
                    if int(p) >= 0 and part.get("consumer_lag", -1) >= 0}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = CounterMetricFamily("xdpwatch_consumer_messages", "Messages consumed, by outcome",
                                labels=["command", "outcome"])
        m.add_metric([self.command, "handled"], self.stats.handled)
        m.add_metric([self.command, "dead_lettered"], self.stats.dead_lettered)
        yield m
        lag = GaugeMetricFamily("xdpwatch_consumer_lag", "Messages behind the end of the partition",
                                labels=["command", "topic", "partition"])
        for (t, p), v in sorted(self.lag.items()):
            lag.add_metric([self.command, t, str(p)], v)
        yield lag
        for kind, figures in ((CounterMetricFamily, self.extra()), (GaugeMetricFamily, self.gauges())):
            for name, (text, value) in figures.items():
                c = kind(f"xdpwatch_{name}", text, labels=["command"])
                c.add_metric([self.command], value)
                yield c


def consumer_conf(client: dict, group_id: str, from_beginning: bool) -> dict:
    """The loop's consumer settings over the client settings (bootstrap.servers, -X ...),
    which may change any of them."""
    return {
        "group.id": group_id,
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "topic.metadata.refresh.interval.ms": 10000,  # pick up a topic created after we started
        # Prefetch: librdkafka counts this before decompression, so it holds about this times
        # the compression ratio (flow events: 12x with zstd), ~200 MB rather than 64 MB x 12; and
        # a full queue is refilled after 20 ms, not 1 s (which starved a slow handler).
        "queued.max.messages.kbytes": 16384,
        "fetch.queue.backoff.ms": 20,
        **client,
    }


def run_loop(conf: dict, topics: list[str], handler: Handler, dead_letter: DeadLetterSink,
             stop: threading.Event, idle_exit_s: float | None = None, stats: LoopStats | None = None) -> LoopStats:
    """Consume `topics` until `stop` (or `idle_exit_s` without a message, for batch use)."""
    from confluent_kafka import Consumer, KafkaError

    stats = stats if stats is not None else LoopStats()
    owner = getattr(handler, "owns_offsets", False)
    errors: collections.deque = collections.deque(maxlen=20)
    consumer = client(Consumer, conf, errors)
    try:
        reach(consumer, conf, errors)
        if owner:
            def on_assign(c, partitions):
                committed = {(p.topic, p.partition): p.offset for p in c.committed(partitions, timeout=15)
                             if p.offset >= 0}
                handler.assigned(partitions, committed)
                c.assign(partitions)

            def on_revoke(c, partitions):
                handler.revoked(partitions)
                _commit(c, handler.durable())

            consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke)
        elif hasattr(handler, "on_assign"):  # a handler with state per partition (RebalanceAware)
            def on_assign(c, partitions):
                handler.on_assign(c, partitions)

            def on_revoke(c, partitions):
                _commit_stored(c)  # the next owner starts right after what was handled here
                handler.on_revoke(partitions)

            consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke)
        else:
            consumer.subscribe(topics)
        last_message = time.monotonic()
        while not stop.is_set():
            msgs = consumer.consume(500, 0.5)
            if owner:
                handler.tick()
                _commit(consumer, handler.durable())
            if not msgs and idle_exit_s is not None:
                if not consumer.assignment():  # still joining the group: not idle yet
                    last_message = time.monotonic()
                elif time.monotonic() - last_message > idle_exit_s:
                    break
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                        continue
                    if err.fatal():
                        raise ConsumerError(f"Kafka error: {err.str()}")
                    log.warning("consumer: %s", err.str())
                    continue
                last_message = time.monotonic()
                ev, reason = decode(m)
                if ev is not None:
                    try:
                        handler.handle(ev)
                        stats.handled += 1
                    except XdpwatchError:
                        raise  # infrastructure (an output that cannot be written): stop, commit nothing past
                    except Exception as e:  # this message broke the handler: it alone is set aside
                        reason = _short(f"handler-error: {type(e).__name__}: {e}")
                if reason:
                    dead_letter.put({"reason": reason, "topic": m.topic(), "partition": m.partition(),
                                     "offset": m.offset(), "key": _b64(m.key()), "value": _b64(m.value())})
                    stats.dead_lettered += 1
                    stats.by_reason[reason.split(":")[0]] = stats.by_reason.get(reason.split(":")[0], 0) + 1
                    log.warning("dead-lettered %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), reason)
                    if owner:
                        handler.skipped(m.topic(), m.partition(), m.offset())
                if not owner:
                    consumer.store_offsets(message=m)
        handler.close()
        if not owner:
            _commit_stored(consumer)
    finally:
        if owner:  # also after a failure: what is durable is committed
            _commit(consumer, handler.durable())
        consumer.close()
        dead_letter.close()
    return stats


def _commit_stored(consumer) -> None:
    """Commit the offsets stored after handling (synchronously)."""
    from confluent_kafka import KafkaError, KafkaException

    try:
        consumer.commit(asynchronous=False)
    except KafkaException as e:
        if e.args[0].code() != KafkaError._NO_OFFSET:
            raise ConsumerError(f"committing offsets failed: {e.args[0].str()}") from None


def _commit(consumer, offsets: list) -> None:
    """Commit what an OffsetOwner made durable. A failed commit loses nothing (the handler
    resumes from its own durable state), so it is a warning, not an error."""
    from confluent_kafka import KafkaException

    if not offsets:
        return
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as e:
        log.warning("committing offsets failed (will resume from durable state): %s", e.args[0].str())


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


MAX_REASON_CHARS = 1000


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 3] + "..."


# Our documents are under 2 KB; anything near this is not ours (a poison message), and
# nesting deeper than orjson's limit (1024) is refused by the parser as not-json.
MAX_MESSAGE_BYTES = 256 * 1024


def decode(m) -> tuple[Event | None, str]:
    """A message as the loop sees it: (Event, "") or (None, why it is a poison message)."""
    stream = schemas.stream_of(m.topic())
    if stream is None:
        return None, f"unknown-topic: {m.topic()} is not an xdpwatch stream"
    value = m.value()
    if value is None:
        return None, "empty: a message without a value (tombstone)"
    if len(value) > MAX_MESSAGE_BYTES:
        return None, f"too-large: {len(value)} bytes, the limit is {MAX_MESSAGE_BYTES}"
    try:
        doc = orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError) as e:
        return None, f"not-json: {e}"
    if not schemas.is_valid(stream, doc):
        return None, _short(f"schema: {'; '.join(schemas.errors(stream, doc)) or '(rejected by the compiled validator)'}")
    return Event(m.topic(), m.partition(), m.offset(), m.key(), stream, doc, value), ""
