"""Where events leave the producer. An Exporter takes (stream, key, JSON bytes).

KafkaExporter is the real one (confluent-kafka: idempotent, acks=all, zstd, delivery
reports counted); StdoutExporter prints JSON lines for a quick look without Kafka.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Protocol

from .. import schemas
from .errors import BrokerError, ConfigError

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
    produced: int = 0
    delivered: int = 0
    failed: int = 0

    @property
    def pending(self) -> int:
        return self.produced - self.delivered - self.failed


class Exporter(Protocol):
    stats: DeliveryStats

    def export(self, stream: str, key: bytes | None, value: bytes) -> None: ...
    def poll(self) -> None: ...
    def close(self, timeout: float) -> DeliveryStats: ...


class KafkaExporter:
    def __init__(self, bootstrap: str, topic_prefix: str, extra: dict[str, str] | None = None,
                 client_id: str = "xdpwatch-producer"):
        from confluent_kafka import KafkaException, Producer

        self.topics = {s: schemas.topic(topic_prefix, s) for s in ("packet-counts", "ssh-flows")}
        self._headers = {s: schemas.headers(s) for s in self.topics}
        self.conf = {"bootstrap.servers": bootstrap, "client.id": client_id, **KAFKA_DEFAULTS, **(extra or {})}
        self.stats = DeliveryStats()
        self._last_error_log = 0.0
        try:
            self._producer = Producer(self.conf, logger=logging.getLogger("librdkafka"))
        except KafkaException as e:
            raise ConfigError(f"invalid Kafka setting: {e.args[0].str()}") from None

    def ensure_topics(self, partitions: int, replication: int, timeout: float = 15.0) -> None:
        """Fail fast when the broker is unreachable; create missing topics."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin_conf = {k: v for k, v in self.conf.items() if k not in KAFKA_DEFAULTS and k != "client.id"}
        admin = AdminClient(admin_conf, logger=logging.getLogger("librdkafka"))
        bootstrap = self.conf["bootstrap.servers"]
        try:
            existing = admin.list_topics(timeout=timeout).topics
        except KafkaException as e:
            raise BrokerError(f"cannot reach Kafka at {bootstrap} within {timeout:.0f}s ({e.args[0].str()}); "
                              "check --bootstrap-servers and that the broker is up") from None
        missing = [t for t in self.topics.values() if t not in existing]
        if not missing:
            return
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=partitions, replication_factor=replication) for t in missing],
            request_timeout=timeout)
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
        self.stats.failed += 1
        now = time.monotonic()
        if now - self._last_error_log > 5:
            self._last_error_log = now
            log.error("delivery to %s failed: %s (%d failed so far)", msg.topic(), err.str(), self.stats.failed)

    def export(self, stream: str, key: bytes | None, value: bytes) -> None:
        topic = self.topics[stream]
        while True:
            try:
                self._producer.produce(topic, value, key, headers=self._headers[stream],
                                       on_delivery=self._on_delivery)
                self.stats.produced += 1
                break
            except BufferError:
                # Local queue full: serve delivery reports until there is room.
                self._producer.poll(0.1)
        # Delivery reports are served by poll(), once per turn of the run loop, not per event.

    def poll(self) -> None:
        self._producer.poll(0)
        self._count_delivered()

    def _count_delivered(self) -> None:
        s = self.stats
        s.delivered = s.produced - s.failed - len(self._producer)

    def close(self, timeout: float) -> DeliveryStats:
        remaining = self._producer.flush(timeout)
        self._count_delivered()
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
