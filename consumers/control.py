"""The prevention loop's control plane: issue block/unblock commands to the producers
(`xdpwatch block`, `unblock`, `alert --block-on`) and list the blocks they enforce
(`xdpwatch blocks`, from the enforcement topic). Commands follow schemas/control.v1.json,
and producers report what they did in schemas/enforcement.v1.json."""

from __future__ import annotations

import getpass
import logging
import re
import socket
import time
import uuid

import orjson

from .. import schemas
from .errors import ConsumerError

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'900', '90s', '15m', '2h', '7d' -> seconds (at least 1)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 7d)")
    seconds = round(float(m[1]) * _UNITS[m[2]])
    if seconds < 1:
        raise ValueError(f"{text!r} is shorter than a second")
    return seconds


def operator() -> str:
    return f"operator:{getpass.getuser()}@{socket.gethostname()}"


def command(action: str, prefix: str, issued_by: str, ttl_s: int | None = None, reason: str | None = None,
            alert_id: str | None = None) -> dict:
    """A control document, checked against the schema (the producer checks it again)."""
    from datetime import datetime, timezone

    cmd = {"id": str(uuid.uuid4()), "action": action, "prefix": prefix, "issued_by": issued_by}
    for k, v in (("ttl_s", ttl_s), ("reason", reason), ("alert_id", alert_id)):
        if v is not None:
            cmd[k] = v
    doc = {"@timestamp": datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
           "command": cmd}
    errs = schemas.errors("control", doc)
    if errs:
        raise ConsumerError(f"invalid {action} command: {errs[0]}")
    return doc


class CommandSender:
    """Produces commands to the control topic, each acknowledged before `send` returns."""

    def __init__(self, kafka_conf: dict, topic: str):
        from .base import AckedProducer, ensure_topics

        ensure_topics(kafka_conf, [topic], partitions=1)  # one partition: one order for every command
        self._out = AckedProducer(kafka_conf, topic, "a command")

    def send(self, doc: dict) -> None:
        self._out.send(orjson.dumps(doc), schemas.key_of("control", doc), schemas.headers("control"))
        cmd = doc["command"]
        log.info("sent %s %s (command %s) to %s", cmd["action"], cmd["prefix"], cmd["id"], self._out.topic)


def active_blocks(kafka_conf: dict, topic: str, now: float | None = None, timeout: float = 10.0) -> list[dict]:
    """The blocks in place now, per producer: the enforcement topic read from its beginning,
    each (observer, prefix) folded to its last word. Newest first."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    now = time.time() if now is None else now
    try:
        c = Consumer({**kafka_conf, "group.id": f"xdpwatch-blocks-{uuid.uuid4()}", "enable.auto.commit": False,
                      "enable.partition.eof": True})
    except KafkaException as e:
        raise ConsumerError(f"invalid Kafka setting: {e.args[0].str()}") from None
    try:
        try:
            meta = c.list_topics(topic, timeout=timeout).topics[topic]
        except KafkaException as e:
            raise ConsumerError(f"cannot reach Kafka at {kafka_conf['bootstrap.servers']} ({e.args[0].str()})") from None
        if meta.error is not None:
            return []  # no producer has enforced anything yet
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        pending, state = set(meta.partitions), {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error():
                    pending.discard(m.partition())  # _PARTITION_EOF: read to the end
                    continue
                try:
                    doc = orjson.loads(m.value())
                    e = doc["xdpwatch"]["enforcement"]
                    key = (doc["observer"]["hostname"], e["prefix"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue
                if doc["event"]["action"] == "block_applied":
                    state[key] = doc
                elif doc["event"]["action"] in ("block_removed", "block_expired"):
                    state.pop(key, None)
        out = [d for d in state.values() if schemas.timestamp_s(d["xdpwatch"]["enforcement"]["expires"]) > now]
        return sorted(out, key=lambda d: d["@timestamp"], reverse=True)
    finally:
        c.close()


class BlockOnAlert:
    """`xdpwatch alert --block-on RULE`: a block command for the source of each alert of
    the chosen rules, carrying the alert's id and message."""

    def __init__(self, sender: CommandSender, rules: set[str], ttl_s: int):
        self.sender, self.rules, self.ttl_s = sender, rules, ttl_s
        self.sent = 0

    def __call__(self, alert: dict) -> None:
        rule = alert["rule"]["name"]
        ip = alert.get("source", {}).get("ip")
        if rule not in self.rules or not ip:
            return
        self.sender.send(command("block", ip, f"alert:{rule}", ttl_s=self.ttl_s, reason=alert["message"][:1024],
                                 alert_id=alert["event"]["id"]))
        self.sent += 1
