"""What several commands share, written once: option declarations (Kafka, topics, logs,
metrics, dead letters) and what turns them into settings (logging, the Kafka client
settings with the one "--bootstrap-servers is required" error, a bad value's usage error,
the stop event)."""

from __future__ import annotations

import enum
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer

from xdpwatch.errors import KafkaConfigError


class Output(str, enum.Enum):
    kafka = "kafka"
    stdout = "stdout"


class LogLevel(str, enum.Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(str, enum.Enum):
    text = "text"
    json = "json"


def _bootstrap(needed: str):
    return Annotated[Optional[str], typer.Option(envvar="XDPWATCH_BOOTSTRAP_SERVERS",
                                                 help=f"Kafka brokers, host:port[,host:port]{needed}.")]


BootstrapOpt = _bootstrap(" (required)")
BootstrapForKafkaOutputOpt = _bootstrap("; needed with --output kafka")
KafkaOptionOpt = Annotated[list[str], typer.Option("-X", "--kafka-option", metavar="KEY=VALUE",
                                                   help="librdkafka setting, as with kcat; repeat (e.g. -X security.protocol=SASL_SSL -X sasl.mechanisms=PLAIN).")]
KafkaConfigOpt = Annotated[Optional[Path], typer.Option("--kafka-config", envvar="XDPWATCH_KAFKA_CONFIG", metavar="FILE", help="librdkafka settings file, key=value lines (like kcat -F); must be readable by its owner only: the place for secrets. XDPWATCH_KAFKA_<PROPERTY> variables override it (XDPWATCH_KAFKA_SASL_PASSWORD is sasl.password), and -X overrides both.")]


def topic_prefix_option(help: str, envvar: str | None = "XDPWATCH_TOPIC_PREFIX"):
    return Annotated[str, typer.Option("--topic-prefix", envvar=envvar, help=help)]


PrefixOpt = topic_prefix_option("Topic prefix used by the producer.")
DeadLetterOpt = Annotated[str, typer.Option(envvar="XDPWATCH_DEAD_LETTER", help="Where invalid messages go, with the reason and original bytes: 'kafka' (topic PREFIX.dead-letter) or a file path (JSON lines).")]
LogLevelOpt = Annotated[LogLevel, typer.Option(envvar="XDPWATCH_LOG_LEVEL", help="Logging on stderr.")]
LogFormatOpt = Annotated[LogFormat, typer.Option(envvar="XDPWATCH_LOG_FORMAT", help="text, or json: one ECS-style object per line for a log shipper.")]
MetricsPortOpt = Annotated[Optional[int], typer.Option(envvar="XDPWATCH_METRICS_PORT", min=1, max=65535, help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics (ADDRESS: --metrics-address).")]
MetricsAddressOpt = Annotated[str, typer.Option(envvar="XDPWATCH_METRICS_ADDRESS", metavar="ADDRESS", help="Where --metrics-port listens: 127.0.0.1 keeps metrics on this host; 0.0.0.0 (or ::) lets a scraper elsewhere read them.")]


def setup_logging(level: LogLevel, fmt: LogFormat = LogFormat.text) -> None:
    from xdpwatch.observability import setup_logging

    setup_logging(level.value, fmt.value)


def kafka_options(pairs: list[str], config_file: Path | None = None) -> dict[str, str]:
    """librdkafka settings: the --kafka-config file, then XDPWATCH_KAFKA_* variables, then
    `-X key=value` (as kcat takes them), each overriding the one before (xdpwatch.kafka.config).
    From then on every secret among them is blanked out of logs and errors; a secret given
    with -X gets a warning naming the safer ways."""
    from xdpwatch.kafka.config import env_name, resolve
    from xdpwatch.observability import hide

    try:
        settings = resolve(pairs, config_file, os.environ)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'-X'") from None
    hide(settings.secrets())
    for key in settings.exposed:
        logging.getLogger("xdpwatch").warning(
            "-X %s puts a secret on the command line, where every local user can read it (ps, /proc/PID/cmdline): "
            "put it in a --kafka-config file (mode 0600) or in the environment variable %s", key, env_name(key))
    return settings.conf


def client_conf(bootstrap_servers: str | None, pairs: list[str], config_file: Path | None, needed: str = "") -> dict:
    """The Kafka client settings of a command: its brokers (KafkaConfigError without them;
    `needed` says when they are: " with --output kafka"), then kafka_options."""
    if not bootstrap_servers:
        raise KafkaConfigError(f"--bootstrap-servers (or XDPWATCH_BOOTSTRAP_SERVERS) is required{needed}")
    return {"bootstrap.servers": bootstrap_servers, **kafka_options(pairs, config_file)}


T = TypeVar("T")


def parsed(parse: Callable[[str], T], text: str, option: str) -> T:
    """`parse(text)`, a ValueError becoming the usual bad-option error (exit 2)."""
    try:
        return parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=f"'{option}'") from None


def prefix(text: str, option: str):
    """An address or CIDR prefix option."""
    from xdpwatch.producer.enforcement import parse_prefix

    return parsed(parse_prefix, text, option)


def duration(text: str, option: str) -> int:
    """A duration option: 90s, 15m, 2h, 7d."""
    from xdpwatch.consumers.control import parse_duration

    return parsed(parse_duration, text, option)


def stop_event() -> threading.Event:
    """Set by SIGINT or SIGTERM: every command's loop checks it, then drains and flushes."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
