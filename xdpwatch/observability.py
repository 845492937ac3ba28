"""Logs and metrics of every command: logs on stderr (text or JSON lines), Prometheus
metrics over HTTP when `--metrics-port` is given."""

from __future__ import annotations

import logging
import sys
import time

import orjson


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


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def serve_metrics(port: int | None, collector, address: str = "0.0.0.0") -> None:
    """Expose `collector` (plus process metrics: CPU, RSS, fds) at http://ADDRESS:PORT/metrics."""
    if port is None:
        return
    from prometheus_client import REGISTRY, start_http_server

    REGISTRY.register(collector)
    try:
        start_http_server(port, addr=address)
    except OSError as e:
        raise MetricsPortError(f"cannot serve metrics on {address}:{port}: {e.strerror}; "
                               "choose another --metrics-port") from None
    logging.getLogger("xdpwatch").info("metrics at http://%s:%d/metrics", address, port)


class MetricsPortError(Exception):
    exit_code = 1
