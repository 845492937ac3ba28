"""Where events leave the producer. An Exporter takes (stream, key, JSON bytes).

KafkaExporter is the real one (confluent-kafka: idempotent, acks=all, zstd, delivery
reports counted, overflow to an on-disk Spool while Kafka is away); StdoutExporter prints
JSON lines for a quick look without Kafka.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from xdpwatch import schemas
from xdpwatch.errors import BrokerError
from xdpwatch.producer.errors import ConfigError
from xdpwatch.producer.spool import Spool

log = logging.getLogger(__name__)

# Settings the producer relies on; -X may override anything else (TLS, SASL, tuning).
KAFKA_DEFAULTS = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "zstd",
    "linger.ms": 20,
    "message.timeout.ms": 300_000,
    # Only failures call back into Python; successes are counted from the queue length
    # (produced - failed - still in flight), which saves a callback per event.
    "delivery.report.only.error": True,
}


@dataclass
class DeliveryStats:
    produced: int = 0   # handed to librdkafka
    delivered: int = 0
    failed: int = 0
    spooled: int = 0    # waiting in the on-disk spool (sent by a later turn or run)
    dropped: int = 0    # neither queued nor spooled: queue and spool full, or no spool
    already_in_kafka: int = 0  # spooled by an earlier run, found in Kafka at start: not sent again

    @property
    def pending(self) -> int:
        return self.produced - self.delivered - self.failed


class Exporter(Protocol):
    stats: DeliveryStats

    def export(self, stream: str, key: bytes | None, value: bytes) -> None: ...
    def poll(self) -> None: ...
    def close(self, timeout: float) -> DeliveryStats: ...


class KafkaExporter:
    # Spooled events sent per turn of the run loop, so that draining a big spool never
    # keeps the loop from the ring buffer for long.
    DRAIN_BATCH = 5000
    # librdkafka frees the slot of an acknowledged message only when poll() serves it. One
    # turn can hand over a whole ring buffer of events, so poll every this many produces:
    # without it a burst fills the local queue (and the spool) while the broker keeps up.
    POLL_EVERY = 1000

    def __init__(self, bootstrap: str, topic_prefix: str, extra: dict[str, str] | None = None,
                 client_id: str = "xdpwatch-producer", streams: tuple[str, ...] = ("packet-counts", "ssh-flows")):
        from confluent_kafka import KafkaError, KafkaException, Producer

        self.topics = {s: schemas.topic(topic_prefix, s) for s in streams}
        self._stream_of = {t: s for s, t in self.topics.items()}
        self._headers = {s: schemas.headers(s) for s in self.topics}
        self.conf = {"bootstrap.servers": bootstrap, "client.id": client_id, **KAFKA_DEFAULTS, **(extra or {})}
        self.stats = DeliveryStats()
        self.spool: Spool | None = None
        self._returned: list | None = None  # collects purged events at shutdown
        self._last_error_log = self._last_drop_log = 0.0
        self._purged_codes = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)
        self._unpolled = 0  # produces since the last poll
        self._in_kafka: set[str] = set()  # ids of spooled events found in Kafka at start
        try:
            self._producer = Producer(self.conf, logger=logging.getLogger("librdkafka"))
        except KafkaException as e:
            raise ConfigError(f"invalid Kafka setting: {e.args[0].str()}") from None

    def use_spool(self, spool: Spool) -> None:
        """Overflow to `spool` from now on; what an earlier run left there is sent first,
        except what is in Kafka already (call after ensure_topics: the broker answers)."""
        self.spool = spool
        if len(spool):
            log.warning("spool %s holds %d events from an earlier run: sending them first", spool.dir, len(spool))
            self._in_kafka = self._delivered_before(spool.head())

    def _delivered_before(self, records: list) -> set[str]:
        """The event ids among `records` (the spool's first segment: what an earlier run may
        have handed to Kafka without getting its acknowledgement back) that Kafka holds:
        read back from their topics, every partition, from the oldest @timestamp among them
        (a message is produced after its event happened) to the end."""
        import orjson

        wanted, since = set(), float("inf")
        for stream, _key, value in records:
            try:
                doc = orjson.loads(value)
                wanted.add(doc["event"]["id"])
                since = min(since, schemas.parse_time(doc["@timestamp"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # sent as it is: what cannot be read cannot be matched
        if not wanted:
            return set()
        started = time.monotonic()
        topics = sorted({self.topics[s] for s, _, _ in records if s in self.topics})
        found = read_back_ids(self.conf, topics, wanted, since - READ_BACK_MARGIN_S)
        log.info("spool: %d of the %d events an earlier run had handed to Kafka without an answer are in Kafka "
                 "already: not sent again (checked in %.1fs)", len(found), len(wanted), time.monotonic() - started)
        return found

    def ensure_topics(self, partitions: int, replication: int, timeout: float = 15.0,
                      single_partition: tuple[str, ...] = ()) -> None:
        """Fail fast when the broker is unreachable; create missing topics (those in
        `single_partition` with one partition: one order for all their messages)."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin_conf = {k: v for k, v in self.conf.items() if k not in KAFKA_DEFAULTS and k != "client.id"}
        errors: collections.deque = collections.deque(maxlen=20)
        admin = AdminClient({**admin_conf, "error_cb": errors.append}, logger=logging.getLogger("librdkafka"))
        bootstrap = self.conf["bootstrap.servers"]
        try:
            existing = admin.list_topics(timeout=timeout).topics
        except KafkaException as e:
            # librdkafka's own reason where it said more than "transport failure" (a
            # refused TLS certificate, a failed SASL login...); poll serves its callbacks.
            admin.poll(0)
            cause = next((x.str() for x in errors if x.code() != KafkaError._ALL_BROKERS_DOWN), e.args[0].str())
            raise BrokerError(f"cannot reach Kafka at {bootstrap} within {timeout:.0f}s ({cause}); "
                              "check --bootstrap-servers, that the broker is up, and the TLS/SASL settings (-X)") from None
        missing = [t for t in (*self.topics.values(), *single_partition) if t not in existing]
        if not missing:
            return
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=1 if t in single_partition else partitions, replication_factor=replication)
             for t in missing], request_timeout=timeout)
        for topic, fut in futures.items():
            try:
                fut.result()
                log.info("created topic %s (%d partitions)", topic, partitions)
            except KafkaException as e:
                err = e.args[0]
                if err.name() == "TOPIC_ALREADY_EXISTS":
                    continue
                raise BrokerError(f"topic {topic} does not exist and creating it failed ({err.str()}); "
                                  "create it yourself or let xdpwatch's user create topics") from None

    def _on_delivery(self, err, msg) -> None:
        if err is None:  # only with delivery.report.only.error overridden by -X
            return
        if self._returned is not None and err.code() in self._purged_codes:
            self._returned.append((self._stream_of[msg.topic()], msg.key(), msg.value()))
            return
        self.stats.failed += 1
        now = time.monotonic()
        if now - self._last_error_log > 5:
            self._last_error_log = now
            log.error("delivery to %s failed: %s (%d failed so far)", msg.topic(), err.str(), self.stats.failed)

    def export(self, stream: str, key: bytes | None, value: bytes) -> None:
        # Delivery reports are served by poll(), once per turn of the run loop, not per event.
        if self.spool is not None and len(self.spool):
            self._overflow(stream, key, value)  # behind what is spooled: order is kept
        elif not self._produce(stream, key, value):
            self._overflow(stream, key, value)

    def _produce(self, stream: str, key: bytes | None, value: bytes) -> bool:
        """Queue one event in librdkafka; False when its local queue is full."""
        producer = self._producer
        try:
            producer.produce(self.topics[stream], value, key, headers=self._headers[stream],
                             on_delivery=self._on_delivery)
        except BufferError:
            if not self._unpolled:
                return False
            # Full of acknowledged messages not yet served? Serve them, then try once more.
            self._unpolled = 0
            producer.poll(0)
            return self._produce(stream, key, value)
        self.stats.produced += 1
        self._unpolled += 1
        if self._unpolled >= self.POLL_EVERY:
            self._unpolled = 0
            producer.poll(0)
        return True

    def _overflow(self, stream: str, key: bytes | None, value: bytes) -> None:
        spool = self.spool
        if spool is not None:
            if not len(spool):
                log.warning("Kafka's local queue is full (%d events waiting for the broker): spooling to %s",
                            len(self._producer), spool.dir)
            if spool.append(stream, key, value):
                return
        self.stats.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log > 5:
            self._last_drop_log = now
            where = (f"spool {spool.dir} is full ({spool.bytes} bytes, raise --spool-max-mb)" if spool is not None
                     else "no spool (--spool-max-mb 0)")
            log.error("event dropped: Kafka's local queue is full and %s (%d dropped so far)", where,
                      self.stats.dropped)

    def _drain_spool(self, batch: int) -> None:
        spool = self.spool
        for _ in range(batch):
            record = spool.peek()
            if record is None:
                break
            if record[0] not in self.topics:  # not written by this program
                log.error("spool %s: skipped a record of unknown stream %r", spool.dir, record[0])
                self.stats.dropped += 1
            elif self._in_kafka and _event_id(record[2]) in self._in_kafka:
                self._in_kafka.discard(_event_id(record[2]))
                self.stats.already_in_kafka += 1
            elif not self._produce(*record):
                break
            spool.pop()
        if not len(spool):  # also when the last thing read was a torn or corrupt record, not an event
            log.info("spool drained: every spooled event is queued for Kafka")

    def poll(self) -> None:
        self._unpolled = 0
        self._producer.poll(0)
        if self.spool is not None and len(self.spool):
            self._drain_spool(self.DRAIN_BATCH)
            self.stats.spooled = len(self.spool)
        self._count_delivered()

    def _count_delivered(self) -> None:
        s = self.stats
        s.delivered = s.produced - s.failed - len(self._producer)

    def close(self, timeout: float) -> DeliveryStats:
        """Send what is queued and spooled for at most `timeout` s. With a spool, what Kafka
        did not take by then is written back to its head for the next run, which first looks
        in Kafka for those whose acknowledgement was lost (use_spool)."""
        deadline = time.monotonic() + timeout
        spool = self.spool
        while spool is not None and len(spool) and time.monotonic() < deadline:
            self._drain_spool(self.DRAIN_BATCH)
            self._producer.poll(0.05)
        remaining = self._producer.flush(max(0.0, deadline - time.monotonic()))
        if remaining and spool is not None:
            # Take every message back from librdkafka (its purge reports serve each one
            # to _on_delivery) into the front of the spool.
            self._returned = []
            self._producer.purge()
            # Messages in flight come back asynchronously: serve reports until every one did.
            returned_by = time.monotonic() + 10
            while len(self._producer) and time.monotonic() < returned_by:
                self._producer.poll(0.05)
            self.stats.produced -= spool.prepend(self._returned)
            self._returned = None
            self.stats.delivered = self.stats.produced - self.stats.failed
            remaining = 0
        else:
            self._count_delivered()
        if spool is not None:
            self.stats.spooled = len(spool)
            spool.close()
        if remaining:
            log.error("%d events still undelivered after %.0fs", remaining, timeout)
        return self.stats


# Hosts' clocks may differ, and a record's timestamp is when it was produced: reading back
# starts this much before the oldest event.
READ_BACK_MARGIN_S = 60.0


def _event_id(value: bytes) -> str | None:
    import orjson

    try:
        return orjson.loads(value)["event"]["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def read_back_ids(conf: dict, topics: list[str], wanted: set[str], since_s: float,
                  stall_timeout: float = 30.0) -> set[str]:
    """The ids of `wanted` that are the event.id of a message of `topics` produced at
    `since_s` or later: every partition read from there (a time lookup, checked: a broker
    that does not index by time is read from the beginning) to its end (the fetch's
    end-of-partition, never a ListOffsets answer: the test broker's is too low)."""
    import os

    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    client = {k: v for k, v in conf.items() if k not in KAFKA_DEFAULTS and k not in ("client.id", "error_cb")}
    c = Consumer({**client, "group.id": f"xdpwatch-spool-check-{os.getpid()}", "enable.auto.commit": False,
                  "enable.partition.eof": True, "fetch.wait.max.ms": 50}, logger=logging.getLogger("librdkafka"))
    prefixes = {i.rsplit("-", 1)[0].encode() for i in wanted}  # one per producer run: a cheap first filter
    found: set[str] = set()
    try:
        try:
            meta = c.list_topics(timeout=15).topics
            tps = [TopicPartition(t, p, int(since_s * 1000)) for t in topics if t in meta
                   for p in meta[t].partitions]
            starts = c.offsets_for_times(tps, timeout=15) if tps else []
        except KafkaException as e:
            raise BrokerError(f"cannot read back {', '.join(topics)} to check the spool: {e.args[0].str()}") from None
        starts = _checked(c, starts, since_s * 1000, stall_timeout)
        c.assign(starts)
        behind = {(tp.topic, tp.partition) for tp in starts}
        last_progress = time.monotonic()
        while behind:
            for m in c.consume(1000, 0.2):
                key = (m.topic(), m.partition())
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        behind.discard(key)
                        last_progress = time.monotonic()
                    continue
                last_progress = time.monotonic()
                value = m.value()
                if value and any(p in value for p in prefixes):
                    eid = _event_id(value)
                    if eid in wanted:
                        found.add(eid)
            if behind and time.monotonic() - last_progress > stall_timeout:
                raise BrokerError(f"reading back {', '.join(topics)} to check the spool stalled for {stall_timeout:.0f}s; "
                                  "is the broker up?")
    finally:
        c.close()
    return found


def _checked(c, starts: list, since_ms: float, timeout: float) -> list:
    """`starts` from a time lookup, each kept only if the message before it is older than
    asked (a broker that does not index by time answers anything: Tansu 0.6 does), else the
    partition's beginning."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    probes = [TopicPartition(tp.topic, tp.partition, tp.offset - 1) for tp in starts
              if tp.error is None and tp.offset > 0]
    trusted = set()
    if probes:
        c.assign(probes)
        pending, deadline = {(p.topic, p.partition) for p in probes}, time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for m in c.consume(100, 0.2):
                key = (m.topic(), m.partition())
                if key in pending and (m.error() is None or m.error().code() == KafkaError._PARTITION_EOF):
                    pending.discard(key)
                    if m.error() is None and m.timestamp()[1] < since_ms:
                        trusted.add(key)
        c.unassign()
    return [tp if (tp.topic, tp.partition) in trusted else TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING)
            for tp in starts]


class StdoutExporter:
    """One JSON object per line on stdout (`--output stdout`)."""

    def __init__(self, out=None):
        self._out = out or sys.stdout.buffer
        self.stats = DeliveryStats()

    def export(self, stream: str, key: bytes | None, value: bytes) -> None:
        self._out.write(value + b"\n")
        self.stats.produced += 1
        self.stats.delivered += 1

    def poll(self) -> None:
        self._out.flush()

    def close(self, timeout: float) -> DeliveryStats:
        self._out.flush()
        return self.stats


class ControlReader:
    """The control topic (block/unblock commands), every partition from its beginning: each
    start replays every command, which rebuilds the blocks still within their TTL. No
    consumer group offsets; served without blocking from the run loop."""

    def __init__(self, bootstrap: str, topic: str, extra: dict[str, str] | None = None):
        import os
        import socket

        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

        # Commands are small: fetches of at most 1 MiB a partition keep what librdkafka reads
        # ahead to ~100 MB instead of ~250 MB while a long topic is restored (measured on
        # 1,000,000 commands; the read itself then takes 6 s instead of 3, still ahead of
        # the Enforcer). -X may change them.
        conf = {"bootstrap.servers": bootstrap, "fetch.max.bytes": 2 << 20, "max.partition.fetch.bytes": 1 << 20,
                **{k: v for k, v in (extra or {}).items() if k not in KAFKA_DEFAULTS},
                "group.id": f"xdpwatch-control-{socket.gethostname()}-{os.getpid()}", "enable.auto.commit": False,
                "enable.partition.eof": True}  # the end of a partition is reported: catch_up knows it is done
        try:
            self._consumer = Consumer(conf, logger=logging.getLogger("librdkafka"))
            metadata = self._consumer.list_topics(topic, timeout=15)
        except KafkaException as e:
            raise BrokerError(f"cannot read the control topic {topic}: {e.args[0].str()}") from None
        self.topic = topic
        self.brokers = [f"{b.host}:{b.port}" for b in metadata.brokers.values()]  # as the cluster names them
        self._partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions]
        self._consumer.assign(self._partitions)

    def catch_up(self, stall_timeout: float = 15.0) -> Iterator[bytes]:
        """Every command already in the topic (up to its end when called), in order, as a
        stream: memory does not grow with the topic. Raises BrokerError when no message
        arrives for `stall_timeout` s while the end is not reached (however long the whole
        read takes while it progresses).

        The end is the consumer's end-of-partition event (the high watermark of the fetch
        responses), not a watermark asked for beforehand: the test broker's ListOffsets
        answers an offset below the end (16,727 for 20,005 records), which cut restores short."""
        from confluent_kafka import KafkaError

        behind = {tp.partition for tp in self._partitions}
        last_progress = time.monotonic()
        while behind:
            for m in self._consumer.consume(1000, 0.2):
                err = m.error()
                if err is None:
                    last_progress = time.monotonic()
                    yield m.value()
                elif err.code() == KafkaError._PARTITION_EOF:
                    behind.discard(m.partition())
            if behind and time.monotonic() - last_progress > stall_timeout:
                raise BrokerError(f"reading the control topic {self.topic} stalled: no message for {stall_timeout:.0f}s "
                                  f"before its end (partitions {sorted(behind)}); is the broker up?")

    def poll(self) -> list[bytes]:
        return [m.value() for m in self._consumer.consume(500, 0) if m.error() is None]

    def close(self) -> None:
        self._consumer.close()
