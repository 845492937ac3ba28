"""The loop every consumer shares: consume -> decode -> validate -> handle -> store offset.

- Offsets are stored only after the handler returned, i.e. after its side effect is done
  (`enable.auto.offset.store=False`); stored offsets are committed periodically and on
  shutdown. A crash re-delivers what was not handled: at-least-once.
- A message that is not JSON or breaks its topic's schema is a poison message: it goes to
  the dead-letter sink with the reason and the original bytes, its offset is stored, and
  the loop goes on. Nothing crashes, nothing is dropped silently.
- SIGINT/SIGTERM set `stop`; the loop finishes the batch in hand, closes the handler,
  commits, and returns.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from .. import schemas
from .errors import ConsumerError

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


class Handler(Protocol):
    def handle(self, ev: Event) -> None:
        """Do the side effect; return only when it is done (the offset is stored next)."""

    def close(self) -> None: ...


class DeadLetterSink(Protocol):
    def put(self, record: dict) -> None: ...
    def close(self) -> None: ...


class FileDeadLetter:
    """Dead letters as JSON lines appended to a file (fsynced: they are evidence too)."""

    def __init__(self, path: str):
        try:
            self._f = open(path, "ab")
        except OSError as e:
            raise ConsumerError(f"cannot open dead-letter file {path}: {e.strerror}") from None

    def put(self, record: dict) -> None:
        import os

        self._f.write(orjson.dumps(record) + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class KafkaDeadLetter:
    """Dead letters to a Kafka topic; each put waits for the broker's acknowledgement."""

    def __init__(self, conf: dict, topic: str):
        from confluent_kafka import Producer

        self.topic = topic
        self._p = Producer({**conf, "enable.idempotence": True, "acks": "all"})

    def put(self, record: dict) -> None:
        errors = []
        self._p.produce(self.topic, orjson.dumps(record), on_delivery=lambda err, _m: err and errors.append(err))
        if self._p.flush(30) or errors:
            raise ConsumerError(f"cannot write to dead-letter topic {self.topic}: {errors or 'timeout'}")

    def close(self) -> None:
        self._p.flush(30)


@dataclass
class LoopStats:
    handled: int = 0
    dead_lettered: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def consumer_conf(bootstrap: str, group_id: str, from_beginning: bool, extra: dict[str, str]) -> dict:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        **extra,
    }


def run_loop(conf: dict, topics: list[str], handler: Handler, dead_letter: DeadLetterSink,
             stop: threading.Event, idle_exit_s: float | None = None) -> LoopStats:
    """Consume `topics` until `stop` (or `idle_exit_s` without a message, for batch use)."""
    from confluent_kafka import Consumer, KafkaError, KafkaException

    stats = LoopStats()
    try:
        consumer = Consumer(conf, logger=logging.getLogger("librdkafka"))
    except KafkaException as e:
        raise ConsumerError(f"invalid Kafka setting: {e.args[0].str()}") from None
    try:
        try:
            consumer.list_topics(timeout=15)
        except KafkaException as e:
            raise ConsumerError(f"cannot reach Kafka at {conf['bootstrap.servers']} within 15s "
                                f"({e.args[0].str()}); check --bootstrap-servers") from None
        consumer.subscribe(topics)
        last_message = time.monotonic()
        while not stop.is_set():
            msgs = consumer.consume(500, 0.5)
            if not msgs and idle_exit_s is not None and time.monotonic() - last_message > idle_exit_s:
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
                ev, reason = _decode(m)
                if ev is None:
                    dead_letter.put({"reason": reason, "topic": m.topic(), "partition": m.partition(),
                                     "offset": m.offset(), "key": _b64(m.key()), "value": _b64(m.value())})
                    stats.dead_lettered += 1
                    stats.by_reason[reason.split(":")[0]] = stats.by_reason.get(reason.split(":")[0], 0) + 1
                    log.warning("dead-lettered %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), reason)
                else:
                    handler.handle(ev)
                    stats.handled += 1
                consumer.store_offsets(message=m)
        handler.close()
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:
                raise ConsumerError(f"committing offsets failed: {e.args[0].str()}") from None
    finally:
        consumer.close()
        dead_letter.close()
    return stats


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _decode(m) -> tuple[Event | None, str]:
    stream = schemas.stream_of(m.topic())
    if stream is None:
        return None, f"unknown-topic: {m.topic()} is not an xdpwatch stream"
    try:
        doc = orjson.loads(m.value())
    except (orjson.JSONDecodeError, TypeError) as e:
        return None, f"not-json: {e}"
    errs = schemas.errors(stream, doc)
    if errs:
        return None, f"schema: {'; '.join(errs[:3])}"
    return Event(m.topic(), m.partition(), m.offset(), m.key(), stream, doc), ""
