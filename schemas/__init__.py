"""The message contract: JSON Schemas (draft 2020-12) of every topic's messages.

Producer and consumers share this package and nothing else. A stream name is also the
suffix of its topic: `<topic-prefix>.<stream>`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
CONTENT_TYPE = "application/json"

# stream name -> schema file
STREAMS = {
    "packet-counts": "packet-counts.v1.json",
    "ssh-flows": "ssh-flow.v1.json",
    "alerts": "alert.v1.json",
    "control": "control.v1.json",
    "enforcement": "enforcement.v1.json",
}


def stream_of(topic: str) -> str | None:
    """The stream a topic carries (`<prefix>.<stream>`), or None if it is not one of ours."""
    suffix = topic.rsplit(".", 1)[-1]
    return suffix if suffix in STREAMS else None


class UnknownStream(KeyError):
    pass


def names() -> list[str]:
    return list(STREAMS)


def path(stream: str) -> Path:
    try:
        return SCHEMA_DIR / STREAMS[stream]
    except KeyError:
        raise UnknownStream(f"unknown stream {stream!r}; known: {', '.join(STREAMS)}") from None


@functools.cache
def load(stream: str) -> dict:
    return json.loads(path(stream).read_text())


def schema_id(stream: str) -> str:
    return load(stream)["$id"]


def topic(prefix: str, stream: str) -> str:
    path(stream)  # validates the name
    return f"{prefix}.{stream}"


def headers(stream: str) -> list[tuple[str, bytes]]:
    """Kafka headers every message of `stream` carries."""
    return [("content-type", CONTENT_TYPE.encode()), ("schema-id", schema_id(stream).encode())]


@functools.cache
def validator(stream: str):
    """A jsonschema validator for `stream`, with format checks (date-time, ipv4, ipv6)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(load(stream))
    return cls(load(stream), format_checker=cls.FORMAT_CHECKER)


@functools.cache
def _fast(stream: str):
    """A compiled validity check for the consumers' hot path: jsonschema-rs, in the schemas'
    own dialect (2020-12) with format checks, 5x faster than fastjsonschema on a flow event
    (whose `if`/`else` raised two exceptions there). It must agree with jsonschema on every
    document: tests/unit/test_schemas_fast.py."""
    import jsonschema_rs
    from rfc3339_validator import validate_rfc3339

    # date-time as jsonschema checks it (its built-in one accepts a leap second, 23:59:60,
    # that no consumer could parse): about 1 us of the ~5 us a flow event takes.
    return jsonschema_rs.validator_for(load(stream), validate_formats=True,
                                       formats={"date-time": lambda s: validate_rfc3339(s.upper())}).is_valid


def is_valid(stream: str, doc) -> bool:
    """The hot path of every consumer: True when `doc` follows the schema of `stream`."""
    return _fast(stream)(doc)


def timestamp_s(value: str) -> float:
    """A date-time field of the contract (ISO 8601, UTC `Z`) as POSIX seconds."""
    import datetime as dt

    return dt.datetime.fromisoformat(value).timestamp()


def key_of(stream: str, doc: dict) -> bytes | None:
    """The Kafka message key of a document: what keeps related events in one partition.

    ssh-flows and alerts: the source (client) IP, so all state about one source lives in one
    consumer of a group; packet-counts: `hostname/interface` of the observer; control and
    enforcement: the prefix, so the commands and outcomes for one prefix stay in order.
    """
    if stream == "packet-counts":
        obs = doc["observer"]
        return f"{obs['hostname']}/{obs['ingress']['interface']['name']}".encode()
    if stream == "control":
        return doc["command"]["prefix"].encode()
    if stream == "enforcement":
        prefix = doc["xdpwatch"]["enforcement"].get("prefix")
        return prefix.encode() if prefix else None
    ip = doc.get("source", {}).get("ip")
    return ip.encode() if ip else None


def errors(stream: str, doc) -> list[str]:
    """Every way `doc` breaks the schema of `stream`, as 'path: message' lines ([] if valid)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in sorted(validator(stream).iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]
