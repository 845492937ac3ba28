"""Logs and metrics of every command: logs on stderr (text or JSON lines), with the
secrets of the Kafka settings blanked out; Prometheus metrics over HTTP when
`--metrics-port` is given, on 127.0.0.1 unless `--metrics-address` says otherwise."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from xdpwatch.errors import XdpwatchError


class JsonFormatter(logging.Formatter):
    """One JSON object per line: @timestamp, log.level, log.logger, message (ECS names)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "@timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "log.level": record.levelname.lower(),
            "log.logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["error.stack_trace"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


REDACTED = "[redacted]"
_secrets: set[str] = set()
MIN_SECRET_LEN = 4  # shorter values would blank out ordinary words and numbers


def hide(values) -> None:
    """From now on, `redact` (and so every log line) blanks out each of `values`."""
    _secrets.update(v for v in values if len(v) >= MIN_SECRET_LEN)


def redact(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):  # longest first: one secret may contain another
        text = text.replace(s, REDACTED)
    return text


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            record.msg, record.args = redact(record.getMessage()), None
        return True


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Redact())
    if fmt == "json":
        formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def serve_metrics(port: int | None, collector, address: str = "127.0.0.1") -> None:
    """Expose `collector` (plus process metrics: CPU, RSS, fds) at http://ADDRESS:PORT/metrics."""
    if port is None:
        return
    from prometheus_client import REGISTRY, start_http_server

    REGISTRY.register(collector)
    try:
        start_http_server(port, addr=address)
    except OSError as e:
        raise MetricsPortError(f"cannot serve metrics on {address}:{port}: {e.strerror}; "
                               "choose another --metrics-port or --metrics-address") from None
    logging.getLogger("xdpwatch").info("metrics at http://%s:%d/metrics", address, port)


class MetricsPortError(XdpwatchError):
    """--metrics-port cannot be served."""
