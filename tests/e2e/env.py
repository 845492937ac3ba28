"""Real components for end-to-end tests: the lab (broker, namespaces, sshd, shared with
`xdpwatch demo`) plus what only tests need: exact frames, reading whole topics back. Each
fails loudly when a prerequisite is missing (run `make setup`); none is ever skipped."""

from __future__ import annotations

import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from xdpwatch import schemas
from xdpwatch.lab import Broker, Net, Sshd, free_port, scrape, sh, wait_for  # noqa: F401

SENDFRAMES = Path(__file__).resolve().parent.parent / "sendframes.py"
NOBODY_MAC = "02:00:00:00:00:99"  # owned by no interface: frames are seen by XDP, answered by nobody
# `make test-soak` (XDPWATCH_SOAK=1) runs the long variants: longer outages, more crashes.
SOAK = os.environ.get("XDPWATCH_SOAK") == "1"


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def consume_all(bootstrap: str, topic: str, *, min_messages: int = 0, idle_timeout: float = 2.0,
                timeout: float = 30.0) -> list[Record]:
    """Every record of `topic` from the beginning (assign, no group), ordered by partition and
    offset. Returns once `min_messages` arrived and nothing new came for `idle_timeout`."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "xw-test-reader", "enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise AssertionError(f"topic {topic}: {meta.error}")
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error():
                    raise AssertionError(f"consume {topic}: {m.error()}")
                out.append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or []))
                last_new = time.monotonic()
            if len(out) >= min_messages and time.monotonic() - last_new >= idle_timeout:
                break
        else:
            raise AssertionError(f"{topic}: {len(out)} messages after {timeout}s, expected at least {min_messages}")
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()


def documents(broker, topic, **kw):
    """Every message of `topic`: checked headers, decoded and schema-checked documents."""
    stream = topic.split(".", 1)[1]
    docs = []
    for m in consume_all(broker.bootstrap, topic, **kw):
        headers = dict(m.headers)
        assert headers["content-type"] == b"application/json"
        assert headers["schema-id"] == schemas.schema_id(stream).encode()
        doc = orjson.loads(m.value)
        assert schemas.errors(stream, doc) == []
        docs.append((m.key, doc))
    return docs


class TestNet(Net):
    __test__ = False

    def send_frames(self, frames: list[bytes]) -> None:
        payload = b"".join(struct.pack("!I", len(f)) + f for f in frames)
        r = self.exec(self.cli_ns, [sys.executable, str(SENDFRAMES), self.cli_if], input=payload,
                      capture_output=True, timeout=60)
        if r.returncode != 0 or int(r.stdout) != len(frames):
            raise AssertionError(f"sendframes: rc={r.returncode} out={r.stdout!r} err={r.stderr!r}")

    def ssh_syns(self, sports) -> list[bytes]:
        """One SYN to the server's port 22 from each source port: one new SSH flow each."""
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        head = Ether(src=self.cli_mac, dst=NOBODY_MAC) / IP(src=self.cli_ip, dst=self.srv_ip)
        return [bytes(head / TCP(sport=p, dport=22, flags="S")) for p in sports]
