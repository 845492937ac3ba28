"""Producers: the settings every producer of xdpwatch relies on, and the acknowledged
producer, for side effects that must be in Kafka before a consumer moves its offset on."""

from __future__ import annotations

from xdpwatch.errors import BrokerError
from xdpwatch.kafka.config import client

# Every producer: idempotent (a retry never writes a message twice), acknowledged by every
# in-sync replica.
ACKNOWLEDGED = {"enable.idempotence": True, "acks": "all"}
# Producers of event streams (the producer's exporter, replay): zstd, in batches.
STREAMING = {**ACKNOWLEDGED, "compression.type": "zstd", "linger.ms": 20}


class AckedProducer:
    """A producer to one topic whose `send` returns only once the broker has acknowledged
    the message (or raises BrokerError naming `what` was being written)."""

    def __init__(self, conf: dict, topic: str, what: str):
        from confluent_kafka import Producer

        self.topic, self._what = topic, what
        self._p = client(Producer, {**conf, **ACKNOWLEDGED})

    def send(self, value: bytes, key: bytes | None = None, headers: list | None = None) -> None:
        errors = []
        self._p.produce(self.topic, value, key, headers=headers, on_delivery=lambda err, _m: err and errors.append(err))
        if self._p.flush(30) or errors:
            raise BrokerError(f"cannot write {self._what} to {self.topic}: "
                              f"{errors[0].str() if errors else 'timed out after 30s'}")

    def close(self) -> None:
        self._p.flush(30)
