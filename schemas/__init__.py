"""The message contract: JSON Schemas (draft 2020-12) of every topic's messages.

Producer and consumers share this package and nothing else. A stream name is also the
suffix of its topic: `<topic-prefix>.<stream>`.
"""

from __future__ import annotations

import datetime as dt
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
    """A jsonschema validator for `stream`, with format checks (date-time, ipv4, ipv6), and
    uniqueItems checked in linear time (jsonschema compares unsortable items pairwise: 6,000
    distinct objects in `tcp.flags` took 40 s)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(load(stream))
    cls = jsonschema.validators.extend(cls, {"uniqueItems": _unique_items})
    return cls(load(stream), format_checker=cls.FORMAT_CHECKER)


def _json_key(value):
    """A hashable stand-in for a JSON value: two are equal exactly when JSON Schema calls the
    values equal (1 == 1.0, true != 1, objects by their members, arrays by their items)."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("a", tuple(map(_json_key, value)))
    if isinstance(value, dict):
        return ("o", frozenset((k, _json_key(v)) for k, v in value.items()))
    return ("z", value)  # null


def all_unique(items: list) -> bool:
    """JSON Schema's uniqueItems, in linear time."""
    return len({_json_key(v) for v in items}) == len(items)


def _unique_items(validator, unique, instance, schema):
    from jsonschema.exceptions import ValidationError

    if unique and validator.is_type(instance, "array") and not all_unique(instance):
        yield ValidationError(f"{_short(repr(instance))} has non-unique elements")


MAX_ERROR_CHARS = 300


def _short(text: str, limit: int = MAX_ERROR_CHARS // 2) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    """The hot path of every consumer: True when `doc` follows the schema of `stream`.
    jsonschema-rs raises ValueError ("Recursion limit reached") when uniqueItems compares
    items nested a few hundred deep; our only uniqueItems array holds enum strings, so such a
    document is invalid."""
    try:
        return _fast(stream)(doc)
    except ValueError:
        return False


# Date-times of the contract (`@timestamp`, `event.start`, `expires`, ...): ISO 8601 in UTC
# with microseconds and a `Z`, e.g. 2026-11-24T10:00:00.123456Z. Written and read here only.
_UTC = dt.timezone.utc
_SECOND_PREFIX: dict[int, str] = {}


def format_time(seconds: float) -> str:
    """POSIX seconds as a date-time of the contract, rounded to the microsecond."""
    return dt.datetime.fromtimestamp(seconds, _UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_time_ns(ns: int) -> str:
    """POSIX nanoseconds (the producer's clock) as a date-time of the contract, cut to the
    microsecond. The formatted second is cached: events come in bursts within a few seconds."""
    secs, rest = divmod(ns, 10**9)
    prefix = _SECOND_PREFIX.get(secs)
    if prefix is None:
        if len(_SECOND_PREFIX) > 4096:
            _SECOND_PREFIX.clear()
        prefix = _SECOND_PREFIX[secs] = dt.datetime.fromtimestamp(secs, _UTC).strftime("%Y-%m-%dT%H:%M:%S.")
    return f"{prefix}{rest // 1000:06d}Z"


def parse_time(text: str) -> float:
    """A date-time as POSIX seconds: the contract's, or any ISO 8601 time (`Z`, lower-case
    `z` as RFC 3339 allows, an offset, or none: UTC), or a date (its midnight, UTC).
    ValueError saying what is expected otherwise."""
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        try:
            t = dt.datetime.fromisoformat(text.upper())  # 2026-11-25t10:00:00z
        except ValueError:
            raise ValueError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-25T10:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_UTC)
    return t.timestamp()


def event_id(value: bytes) -> str | None:
    """The event.id of a serialized document, None when it has none or is not JSON."""
    import orjson

    try:
        return orjson.loads(value)["event"]["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


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


def errors(stream: str, doc, limit: int = 3) -> list[str]:
    """The first `limit` ways `doc` breaks the schema of `stream`, in the schema's order, as
    'path: message' lines of at most about MAX_ERROR_CHARS characters ([] if valid). Lazy: a
    huge document costs its first errors, not all of them."""
    import itertools

    out = []
    try:
        for e in itertools.islice(validator(stream).iter_errors(doc), limit):
            path = _short("/".join(map(str, e.absolute_path)) or "(root)", MAX_ERROR_CHARS // 3)
            out.append(f"{path}: {_short(e.message)}")
    except RecursionError:
        out.append("(root): nested too deeply to check")
    return out
