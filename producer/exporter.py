"""Where events leave the producer. An Exporter takes (stream, key, JSON bytes).

KafkaExporter is the real one (confluent-kafka: idempotent, acks=all, zstd, delivery
reports counted, overflow to an on-disk Spool while Kafka is away; the Kafka wing,
xdpwatch.kafka, makes its clients, topics and read backs); StdoutExporter prints JSON lines
for a quick look without Kafka.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Protocol

from xdpwatch import schemas
from xdpwatch.kafka import admin
from xdpwatch.kafka.config import client
from xdpwatch.kafka.produce import STREAMING
from xdpwatch.kafka.read import MARGIN_S, read_back_ids
from xdpwatch.producer.spool import Spool

log = logging.getLogger(__name__)

# Settings the producer relies on; -X may override anything else (TLS, SASL, tuning).
KAFKA_DEFAULTS = {
    **STREAMING,
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

    def __init__(self, conf: dict, topic_prefix: str, client_id: str = "xdpwatch-producer",
                 streams: tuple[str, ...] = ("packet-counts", "ssh-flows")):
        """`conf`: the client settings (bootstrap.servers, and -X ... over KAFKA_DEFAULTS)."""
        from confluent_kafka import KafkaError, Producer

        self.topics = {s: schemas.topic(topic_prefix, s) for s in streams}
        self._stream_of = {t: s for s, t in self.topics.items()}
        self._headers = {s: schemas.headers(s) for s in self.topics}
        self.settings = conf  # what its other clients (admin, read back) use
        self.conf = {"client.id": client_id, **KAFKA_DEFAULTS, **conf}
        self.stats = DeliveryStats()
        self.spool: Spool | None = None
        self._returned: list | None = None  # collects purged events at shutdown
        self._last_error_log = self._last_drop_log = 0.0
        self._purged_codes = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)
        self._unpolled = 0  # produces since the last poll
        self._in_kafka: set[str] = set()  # ids of spooled events found in Kafka at start
        self._producer = client(Producer, self.conf)

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
        found = read_back_ids(self.settings, topics, wanted, since - MARGIN_S)
        log.info("spool: %d of the %d events an earlier run had handed to Kafka without an answer are in Kafka "
                 "already: not sent again (checked in %.1fs)", len(found), len(wanted), time.monotonic() - started)
        return found

    def ensure_topics(self, partitions: int, replication: int, timeout: float = 15.0,
                      single_partition: tuple[str, ...] = ()) -> None:
        """Fail fast when the broker is unreachable; create missing topics (admin.ensure_topics)."""
        admin.ensure_topics(self.settings, list(self.topics.values()), partitions, replication, timeout, single_partition)

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
            elif self._in_kafka and schemas.event_id(record[2]) in self._in_kafka:
                self._in_kafka.discard(schemas.event_id(record[2]))
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
