"""The `xdpwatch` command. Thin: parse options, build the pipeline, map errors to one
line on stderr and an exit code (1 user/config error, 3 events not delivered)."""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from xdpwatch import __version__, schemas

app = typer.Typer(
    name="xdpwatch",
    help="Network security telemetry from XDP into Kafka: packet counters, SSH flows (both directions, software versions, login outcome), alerts, archives, and opt-in blocking in the kernel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class XdpMode(str, enum.Enum):
    auto = "auto"
    native = "native"
    generic = "generic"


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


LogLevelOpt = Annotated[LogLevel, typer.Option(envvar="XDPWATCH_LOG_LEVEL", help="Logging on stderr.")]
LogFormatOpt = Annotated[LogFormat, typer.Option(envvar="XDPWATCH_LOG_FORMAT", help="text, or json: one ECS-style object per line for a log shipper.")]
MetricsPortOpt = Annotated[Optional[int], typer.Option(envvar="XDPWATCH_METRICS_PORT", min=1, max=65535, help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics (ADDRESS: --metrics-address).")]
MetricsAddressOpt = Annotated[str, typer.Option(envvar="XDPWATCH_METRICS_ADDRESS", metavar="ADDRESS", help="Where --metrics-port listens: 127.0.0.1 keeps metrics on this host; 0.0.0.0 (or ::) lets a scraper elsewhere read them.")]
KafkaConfigOpt = Annotated[Optional[Path], typer.Option("--kafka-config", envvar="XDPWATCH_KAFKA_CONFIG", metavar="FILE", help="librdkafka settings file, key=value lines (like kcat -F); must be readable by its owner only: the place for secrets. XDPWATCH_KAFKA_<PROPERTY> variables override it (XDPWATCH_KAFKA_SASL_PASSWORD is sasl.password), and -X overrides both.")]


def _setup_logging(level: LogLevel, fmt: LogFormat = LogFormat.text) -> None:
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


def _option(parse, text: str, option: str):
    """`parse(text)`, a ValueError becoming the usual bad-option error (exit 2)."""
    try:
        return parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=f"'{option}'") from None


def _block_rules(rules: list[str]) -> list[str]:
    """--block-on: only rules whose evidence a spoofer cannot forge; any other is a bad option."""
    from xdpwatch.consumers.control import blockable

    return [_option(blockable, r, "--block-on") for r in rules]


def _prefix(text: str, option: str):
    from xdpwatch.producer.enforcement import parse_prefix

    return _option(parse_prefix, text, option)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xdpwatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


@app.command(epilog="Example: xdpwatch produce --iface eth0 --bootstrap-servers kafka:9092 "
                    "-X security.protocol=SSL  (events go to xdpwatch.packet-counts and xdpwatch.ssh-flows)")
def produce(
    iface: Annotated[str, typer.Option("--iface", "-i", envvar="XDPWATCH_IFACE",
                                       help="Interface to watch (its ingress traffic).")],
    bootstrap_servers: Annotated[Optional[str], typer.Option(
        envvar="XDPWATCH_BOOTSTRAP_SERVERS", help="Kafka brokers, host:port[,host:port]. Needed with --output kafka.")] = None,
    interval: Annotated[float, typer.Option(envvar="XDPWATCH_INTERVAL", min=0.05,
                                            help="Seconds per packet-counts record.")] = 1.0,
    flow_idle_timeout: Annotated[float, typer.Option(envvar="XDPWATCH_FLOW_IDLE_TIMEOUT", min=0.1,
                                                     help="End a flow (reason idle) after this many seconds without a packet.")] = 60.0,
    flow_active_timeout: Annotated[float, typer.Option(envvar="XDPWATCH_FLOW_ACTIVE_TIMEOUT", min=0.1,
                                                       help="Emit flow_update for a long flow every this many seconds.")] = 300.0,
    flow_fin_linger: Annotated[float, typer.Option(envvar="XDPWATCH_FLOW_FIN_LINGER", min=0.0,
                                                   help="Seconds to wait after a FIN before flow_end, so closing ACKs stay in the flow.")] = 2.0,
    ssh_port: Annotated[list[int], typer.Option(envvar="XDPWATCH_SSH_PORTS", min=1, max=65535,
                                                help="TCP port counted as SSH; repeat for several (env: space-separated).")] = [22],
    topic_prefix: Annotated[str, typer.Option(envvar="XDPWATCH_TOPIC_PREFIX",
                                              help="Topics are PREFIX.packet-counts and PREFIX.ssh-flows.")] = "xdpwatch",
    topic_partitions: Annotated[int, typer.Option(envvar="XDPWATCH_TOPIC_PARTITIONS", min=1,
                                                  help="Partitions for topics xdpwatch creates (existing topics are left as they are).")] = 3,
    topic_replication: Annotated[int, typer.Option(envvar="XDPWATCH_TOPIC_REPLICATION", min=1,
                                                   help="Replication factor for topics xdpwatch creates.")] = 1,
    xdp_mode: Annotated[XdpMode, typer.Option(envvar="XDPWATCH_XDP_MODE",
                                              help="native (driver), generic (any interface, slower), or auto: native if the driver supports it.")] = XdpMode.auto,
    egress: Annotated[bool, typer.Option("--egress/--no-egress", envvar="XDPWATCH_EGRESS",
                                         help="Also hook the interface's egress (TCX, Linux >= 6.6) so SSH flows count both directions (source.* and destination.* packets and bytes). Without it, or where the kernel cannot, flows count what arrives.")] = True,
    kafka_option: Annotated[list[str], typer.Option("-X", "--kafka-option", metavar="KEY=VALUE",
                                                    help="librdkafka setting, as with kcat; repeat (e.g. -X security.protocol=SASL_SSL -X sasl.mechanisms=PLAIN).")] = [],
    kafka_config: KafkaConfigOpt = None,
    output: Annotated[Output, typer.Option(envvar="XDPWATCH_OUTPUT",
                                           help="kafka, or stdout: JSON lines for a quick look.")] = Output.kafka,
    flow_table_size: Annotated[int, typer.Option(envvar="XDPWATCH_FLOW_TABLE_SIZE",
                                                 help="Most SSH flows tracked at once; beyond it the least recent is evicted (and counted).")] = 65536,
    ringbuf_pages: Annotated[int, typer.Option(envvar="XDPWATCH_RINGBUF_PAGES",
                                               help="Ring buffer size in pages (power of two); a full buffer drops events (counted).")] = 64,
    shutdown_timeout: Annotated[float, typer.Option(envvar="XDPWATCH_SHUTDOWN_TIMEOUT", min=0.0,
                                                    help="On stop, wait at most this many seconds for Kafka to acknowledge what is queued; the rest is spooled for the next start (exit 3).")] = 30.0,
    spool_dir: Annotated[Path, typer.Option(envvar="XDPWATCH_SPOOL_DIR", file_okay=False, readable=False,
                                            help="Where events wait on disk while Kafka is away longer than librdkafka's queue lasts (queue.buffering.max.messages); sent first on the next start.")] = Path("/var/lib/xdpwatch/spool"),
    enforce: Annotated[bool, typer.Option("--enforce", envvar="XDPWATCH_ENFORCE",
                                          help="Prevention: drop packets from blocked sources (commands on PREFIX.control, see `xdpwatch block`) and SSH SYNs over --syn-rate-limit. Off by default: monitor only.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", envvar="XDPWATCH_DRY_RUN",
                                          help="Like --enforce, but only count what would be dropped.")] = False,
    allow: Annotated[list[str], typer.Option("--allow", metavar="PREFIX", envvar="XDPWATCH_ALLOW",
                                             help="Never block this address or prefix (repeat; e.g. your management network). Loopback is always allowed; a block overlapping an allowed prefix is rejected.")] = [],
    syn_rate_limit: Annotated[int, typer.Option(envvar="XDPWATCH_SYN_RATE_LIMIT", min=0,
                                                help="With --enforce/--dry-run: new SSH connections per second per source above which SYNs are dropped (counted). 0: no limit.")] = 0,
    syn_burst: Annotated[int, typer.Option(envvar="XDPWATCH_SYN_BURST", min=1,
                                           help="New SSH connections a source may open at once before --syn-rate-limit applies.")] = 5,
    spool_max_mb: Annotated[int, typer.Option(envvar="XDPWATCH_SPOOL_MAX_MB", min=0,
                                              help="Most disk the spool may use; beyond it events are dropped and counted (exit 3). 0: no spool, drop and count as soon as the queue is full.")] = 1024,
    metrics_port: MetricsPortOpt = None,
    metrics_address: MetricsAddressOpt = "127.0.0.1",
    log_level: LogLevelOpt = LogLevel.info,
    log_format: LogFormatOpt = LogFormat.text,
    summary_file: Annotated[Optional[Path], typer.Option(envvar="XDPWATCH_SUMMARY_FILE", metavar="FILE", dir_okay=False,
                                                         help="At exit, write the run's figures there as one JSON object (mode 0600, replaced whole): packets, SSH flows, evictions, kernel drops, and the events produced, delivered, failed, undelivered, spooled, dropped and found already in Kafka. For scripts; the last log line says the same.")] = None,
    dump_bpf: Annotated[bool, typer.Option(hidden=True, help="Print the BPF source as compiled and exit.")] = False,
) -> None:
    """Attach the XDP program to an interface and stream packet counts and SSH flows to Kafka.

    Stops on SIGINT or SIGTERM: emits the last partial interval, ends open flows
    (reason shutdown), flushes Kafka, detaches XDP. Exit code 0 when every event was
    delivered, 3 when some were not, 1 on a configuration error.
    """
    from xdpwatch.producer import pipeline
    from xdpwatch.producer.errors import ConfigError
    from xdpwatch.producer.loader import render_source

    _setup_logging(log_level, log_format)
    if enforce and dry_run:
        raise ConfigError("--enforce and --dry-run exclude each other: choose one")
    options = pipeline.Options(
        iface=iface, output=output.value, kafka=None, interval_s=interval, flow_idle_timeout_s=flow_idle_timeout,
        flow_active_timeout_s=flow_active_timeout, flow_fin_linger_s=flow_fin_linger, ssh_ports=tuple(ssh_port),
        topic_prefix=topic_prefix, topic_partitions=topic_partitions, topic_replication=topic_replication,
        xdp_mode=xdp_mode.value, egress=egress, flow_table_size=flow_table_size, ringbuf_pages=ringbuf_pages,
        shutdown_timeout_s=shutdown_timeout, spool_dir=spool_dir, spool_max_mb=spool_max_mb,
        enforce_mode="enforce" if enforce else "dry_run" if dry_run else "off",
        allow=tuple(_prefix(p, "--allow") for p in allow), syn_rate_limit=syn_rate_limit, syn_burst=syn_burst,
        metrics_port=metrics_port, metrics_address=metrics_address, summary_file=summary_file)
    bpf = options.check()
    if dump_bpf:
        typer.echo(render_source(bpf), nl=False)
        return
    if output is Output.kafka:
        if not bootstrap_servers:
            raise ConfigError("--bootstrap-servers (or XDPWATCH_BOOTSTRAP_SERVERS) is required with --output kafka")
        options.kafka = {"bootstrap.servers": bootstrap_servers, **kafka_options(kafka_option, kafka_config)}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    pipeline.finish(pipeline.build(options).run(stop), options)


def _consumer_setup(bootstrap_servers, group_id, from_beginning, kafka_option, dead_letter, topic_prefix,
                    log_level, log_format, metrics_port, command, extra_metrics=lambda: {}, *,
                    kafka_config=None, metrics_address="127.0.0.1", gauges=lambda: {}):
    """What every consumer command shares: logging, metrics, Kafka config, dead-letter sink,
    stop event. Returns (consumer conf, producer conf, dead-letter sink, stop, loop stats)."""
    from xdpwatch.consumers.base import ConsumerMetrics, FileDeadLetter, KafkaDeadLetter, LoopStats, consumer_conf
    from xdpwatch.consumers.errors import ConsumerError
    from xdpwatch.observability import serve_metrics

    _setup_logging(log_level, log_format)
    if not bootstrap_servers:
        raise ConsumerError("--bootstrap-servers (or XDPWATCH_BOOTSTRAP_SERVERS) is required")
    extra = kafka_options(kafka_option, kafka_config)
    conf = consumer_conf(bootstrap_servers, group_id, from_beginning, extra)
    stats = LoopStats()
    if metrics_port:
        metrics = ConsumerMetrics(command, stats, extra_metrics, gauges)
        conf.update({"stats_cb": metrics.on_stats, "statistics.interval.ms": 5000})
        serve_metrics(metrics_port, metrics, metrics_address)
    producer_conf = {"bootstrap.servers": bootstrap_servers, **extra}
    if dead_letter == "kafka":
        sink = KafkaDeadLetter(producer_conf, f"{topic_prefix}.dead-letter")
    else:
        sink = FileDeadLetter(dead_letter)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return conf, producer_conf, sink, stop, stats


BootstrapOpt = Annotated[Optional[str], typer.Option(envvar="XDPWATCH_BOOTSTRAP_SERVERS", help="Kafka brokers, host:port[,host:port] (required).")]
FromBeginningOpt = Annotated[bool, typer.Option(help="With no committed offset, start at the oldest message (default: only new ones).")]
KafkaOptionOpt = Annotated[list[str], typer.Option("-X", "--kafka-option", metavar="KEY=VALUE", help="librdkafka setting, as with kcat; repeat.")]
DeadLetterOpt = Annotated[str, typer.Option(envvar="XDPWATCH_DEAD_LETTER", help="Where invalid messages go, with the reason and original bytes: 'kafka' (topic PREFIX.dead-letter) or a file path (JSON lines).")]
PrefixOpt = Annotated[str, typer.Option(envvar="XDPWATCH_TOPIC_PREFIX", help="Topic prefix used by the producer.")]

@app.command(epilog="Example: xdpwatch alert --bootstrap-servers kafka:9092 --rules rules.toml --output stdout")
def alert(
    bootstrap_servers: BootstrapOpt = None,
    rules: Annotated[Optional[Path], typer.Option(envvar="XDPWATCH_RULES", help="TOML rules file (see --print-default-rules); default rules without it.")] = None,
    output: Annotated[str, typer.Option(envvar="XDPWATCH_ALERT_OUTPUT", help="'kafka' (topic PREFIX.alerts), 'stdout' (JSON lines), or a file path (JSON lines, fsynced).")] = "kafka",
    group_id: Annotated[str, typer.Option(envvar="XDPWATCH_GROUP_ID", help="Consumer group; run several with one id to share partitions.")] = "xdpwatch-alert",
    from_beginning: FromBeginningOpt = False,
    kafka_option: KafkaOptionOpt = [],
    kafka_config: KafkaConfigOpt = None,
    dead_letter: DeadLetterOpt = "kafka",
    topic_prefix: PrefixOpt = "xdpwatch",
    print_default_rules: Annotated[bool, typer.Option(help="Print the default rules file, documented, and exit.")] = False,
    block_on: Annotated[list[str], typer.Option("--block-on", metavar="RULE", envvar="XDPWATCH_BLOCK_ON", callback=_block_rules,
                                                help="Also send a block command for the source of each alert of this rule (repeat): ssh_bruteforce, ssh_auth_failures or ssh_scan, the rules that count only connections whose TCP handshake completed, which a forged source address cannot do. Producers running with --enforce drop it. Not for replays: the TTL counts from now.")] = [],
    block_ttl: Annotated[str, typer.Option(envvar="XDPWATCH_BLOCK_TTL", help="How long --block-on blocks last: 90s, 15m, 2h, 7d.")] = "15m",
    block_rate: Annotated[int, typer.Option(envvar="XDPWATCH_BLOCK_RATE", min=1,
                                            help="Budget of --block-on: at most this many block commands per minute; beyond it, a block_budget_exhausted alert (at most one a minute) instead of a block.")] = 10,
    block_max_active: Annotated[int, typer.Option(envvar="XDPWATCH_BLOCK_MAX_ACTIVE", min=1,
                                                  help="Budget of --block-on: at most this many of its blocks within their TTL at once; beyond it, a block_budget_exhausted alert instead of a block. `xdpwatch block` is never limited.")] = 100,
    exit_when_idle: Annotated[Optional[float], typer.Option(hidden=True, help="Stop after this many seconds without a message (batch runs, tests).")] = None,
    metrics_port: MetricsPortOpt = None,
    metrics_address: MetricsAddressOpt = "127.0.0.1",
    log_level: LogLevelOpt = LogLevel.info,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Raise alerts from SSH flows and packet counts: SSH brute force, SSH scans and refused
    logins (handshake-verified connections only), SYN floods (unverified sources), traffic
    spikes, kernel drops. Event time, not wall-clock time: replaying archived
    events gives the same alerts. With --block-on, close the loop: the source of an alert
    is blocked in the kernel by producers that run with --enforce."""
    from xdpwatch.consumers.alert import DEFAULT_RULES, AlertHandler, AlertSink, load_rules
    from xdpwatch.consumers.base import run_loop
    from xdpwatch.kafka.read import Reader
    from xdpwatch.consumers.errors import ConsumerError

    if print_default_rules:
        typer.echo(DEFAULT_RULES, nl=False)
        return
    try:
        rules_cfg = load_rules(rules.read_text(), str(rules)) if rules else load_rules("")
    except OSError as e:
        raise ConsumerError(f"cannot read rules file {rules}: {e.strerror}") from None
    sink: AlertSink | None = None
    handler: AlertHandler | None = None
    blocker = None

    def extra_metrics() -> dict:
        evicted = handler.evicted if handler else {}
        rebuilt = handler.stats if handler else {}
        return {"alerts": ("Alerts raised", sink.count if sink else 0),
                "block_commands": ("Block commands sent by --block-on", blocker.sent if blocker else 0),
                "blocks_refused": ("Blocks --block-on did not send: its budget was spent",
                                   blocker.refused if blocker else 0),
                "alert_sources_evicted": ("Sources whose rule windows were dropped at [limits] max_sources, "
                                          "least recently active first", evicted.get("sources", 0)),
                "alert_observers_evicted": ("Traffic baselines dropped at [limits] max_observers",
                                            evicted.get("observers", 0)),
                "alert_cooldowns_evicted": ("Live cooldowns dropped at [limits] max_sources",
                                            evicted.get("cooldowns", 0)),
                "alert_state_rebuilds": ("State rebuilds after a restart or rebalance", rebuilt.get("rebuilds", 0)),
                "alert_events_reread": ("Events read again to rebuild state", rebuilt.get("events_reread", 0)),
                "alert_duplicates_suppressed": ("Alerts not published again: already in the alerts topic",
                                                rebuilt.get("alerts_suppressed", 0)),
                "block_duplicates_suppressed": ("Block commands not sent again: already in the control topic",
                                                blocker.duplicates if blocker else 0)}

    conf, producer_conf, dl, stop, stats = _consumer_setup(
        bootstrap_servers, group_id, from_beginning, kafka_option, dead_letter, topic_prefix, log_level, log_format,
        metrics_port, "alert", extra_metrics, kafka_config=kafka_config, metrics_address=metrics_address,
        gauges=lambda: {"alert_state_rebuild_seconds": ("Seconds the last state rebuild took",
                                                        handler.stats["rebuild_seconds"] if handler else 0)})
    ttl_s = _duration(block_ttl, "--block-ttl")
    sink = AlertSink(output, producer_conf, f"{topic_prefix}.alerts")
    control_topic = schemas.topic(topic_prefix, "control")
    handler = AlertHandler(rules_cfg, sink, history=Reader(producer_conf),
                           alerts_topic=f"{topic_prefix}.alerts" if output == "kafka" else None,
                           control_topic=control_topic if block_on else None, from_beginning=from_beginning)
    if block_on:
        from xdpwatch.consumers.control import BlockBudget, BlockOnAlert, CommandSender

        blocker = handler.on_alert = BlockOnAlert(CommandSender(producer_conf, control_topic), set(block_on), ttl_s,
                                                  BlockBudget(block_rate, block_max_active), handler.publish)
    topics = [f"{topic_prefix}.ssh-flows", f"{topic_prefix}.packet-counts"]
    run_loop(conf, topics, handler, dl, stop, exit_when_idle, stats)
    evicted, rebuilt = handler.evicted, handler.stats
    logging.getLogger("xdpwatch").info(
        "stopped: %d events handled, %d alerts, %d dead-lettered%s; evicted at the limits: %d sources, %d observers, "
        "%d cooldowns; %d state rebuilds (%d events read again), %d alerts and %d block commands already in Kafka "
        "not sent again", stats.handled, sink.count, stats.dead_lettered,
        f", {blocker.sent} block commands, {blocker.refused} refused by the budget "
        f"({blocker.budget_alerts} block_budget_exhausted alerts)" if blocker else "",
        evicted["sources"], evicted["observers"], evicted["cooldowns"], rebuilt["rebuilds"],
        rebuilt["events_reread"], rebuilt["alerts_suppressed"], blocker.duplicates if blocker else 0)


# ---------------------------------------------------------------------------- prevention
def _duration(text: str, option: str) -> int:
    from xdpwatch.consumers.control import parse_duration

    return _option(parse_duration, text, option)


def _client_conf(bootstrap_servers, kafka_option, kafka_config, log_level) -> dict:
    """Logging and the Kafka client settings of the control-plane commands."""
    from xdpwatch.consumers.errors import ConsumerError

    _setup_logging(log_level)
    if not bootstrap_servers:
        raise ConsumerError("--bootstrap-servers (or XDPWATCH_BOOTSTRAP_SERVERS) is required")
    return {"bootstrap.servers": bootstrap_servers, **kafka_options(kafka_option, kafka_config)}


def _send(bootstrap_servers, kafka_option, kafka_config, topic_prefix, log_level, doc) -> None:
    from xdpwatch.consumers.control import CommandSender

    conf = _client_conf(bootstrap_servers, kafka_option, kafka_config, log_level)
    CommandSender(conf, schemas.topic(topic_prefix, "control")).send(doc)
    c = doc["command"]
    typer.echo(f"{c['action']} {c['prefix']} sent (command {c['id']}); producers report it on "
               f"{schemas.topic(topic_prefix, 'enforcement')} (`xdpwatch blocks`)")


@app.command(epilog="Example: xdpwatch block 203.0.113.7 --ttl 1h --reason 'brute force from the VPN pool'")
def block(
    prefix: Annotated[str, typer.Argument(help="IPv4 or IPv6 address, or CIDR prefix (198.51.100.0/24).")],
    ttl: Annotated[str, typer.Option(help="How long the block lasts: 90s, 15m, 2h, 7d.")] = "1h",
    reason: Annotated[Optional[str], typer.Option(help="Why: shown with the block and in the audit trail.")] = None,
    bootstrap_servers: BootstrapOpt = None,
    kafka_option: KafkaOptionOpt = [],
    kafka_config: KafkaConfigOpt = None,
    topic_prefix: PrefixOpt = "xdpwatch",
    log_level: LogLevelOpt = LogLevel.warning,
) -> None:
    """Block a source on every producer running with --enforce (counted only with --dry-run)
    for TTL. Producers refuse what their policy forbids (allowlisted addresses, prefixes
    wider than /8 or /32); each says what it did on PREFIX.enforcement."""
    from xdpwatch.consumers.control import command, operator

    net = _prefix(prefix, "PREFIX")
    _send(bootstrap_servers, kafka_option, kafka_config, topic_prefix, log_level,
          command("block", str(net), operator(), ttl_s=_duration(ttl, "--ttl"), reason=reason))


@app.command(epilog="Example: xdpwatch unblock 203.0.113.7 --reason 'false positive'")
def unblock(
    prefix: Annotated[str, typer.Argument(help="The prefix as it was blocked.")],
    reason: Annotated[Optional[str], typer.Option(help="Why: kept in the audit trail.")] = None,
    bootstrap_servers: BootstrapOpt = None,
    kafka_option: KafkaOptionOpt = [],
    kafka_config: KafkaConfigOpt = None,
    topic_prefix: PrefixOpt = "xdpwatch",
    log_level: LogLevelOpt = LogLevel.warning,
) -> None:
    """Lift a block before its TTL on every producer."""
    from xdpwatch.consumers.control import command, operator

    net = _prefix(prefix, "PREFIX")
    _send(bootstrap_servers, kafka_option, kafka_config, topic_prefix, log_level,
          command("unblock", str(net), operator(), reason=reason))


@app.command(epilog="Example: xdpwatch blocks --bootstrap-servers kafka:9092 --json")
def blocks(
    bootstrap_servers: BootstrapOpt = None,
    kafka_option: KafkaOptionOpt = [],
    kafka_config: KafkaConfigOpt = None,
    topic_prefix: PrefixOpt = "xdpwatch",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per block (the block_applied event).")] = False,
    log_level: LogLevelOpt = LogLevel.warning,
) -> None:
    """The blocks in place now, per producer, newest first: from what the producers
    reported on PREFIX.enforcement."""
    import orjson

    from xdpwatch.consumers.control import active_blocks

    conf = _client_conf(bootstrap_servers, kafka_option, kafka_config, log_level)
    found = active_blocks(conf, schemas.topic(topic_prefix, "enforcement"))
    for doc in found:
        if as_json:
            typer.echo(orjson.dumps(doc).decode())
            continue
        e = doc["xdpwatch"]["enforcement"]
        cause = f"alert {e['alert_id']}" if e.get("alert_id") else e.get("issued_by", "?")
        typer.echo(f"{doc['observer']['hostname']:<20} {e['prefix']:<22} {e['mode']:<8} until {e['expires']}  "
                   f"{doc['event'].get('reason') or '-'} ({cause})")
    if not found and not as_json:
        typer.echo("no blocks in place", err=True)


# The streams of the contract (schemas/), as a choice for --stream.
Stream = enum.Enum("Stream", {name.replace("-", "_"): name for name in schemas.names()}, type=str)


StreamOpt = Annotated[list[Stream], typer.Option("--stream", help="Only this stream; repeat for several (default: all).")]


@app.command(epilog="Example: xdpwatch archive --bootstrap-servers kafka:9092 --dir /var/lib/xdpwatch/archive ; "
                    "read a segment with: zstdcat DIR/xdpwatch.ssh-flows.p0.*.jsonl.zst | jq .")
def archive(
    directory: Annotated[Path, typer.Option("--dir", envvar="XDPWATCH_ARCHIVE_DIR", file_okay=False,
                                            help="Archive directory (created if missing; one archiver per directory).")],
    bootstrap_servers: BootstrapOpt = None,
    stream: StreamOpt = [],
    roll_mb: Annotated[float, typer.Option(envvar="XDPWATCH_ROLL_MB", min=0.001,
                                           help="Close a segment at this many MB of (uncompressed) JSON.")] = 64.0,
    roll_seconds: Annotated[float, typer.Option(envvar="XDPWATCH_ROLL_SECONDS", min=0.1,
                                                help="Close a segment this many seconds after it was opened; "
                                                     "closed segments are durable and their offsets committed.")] = 300.0,
    group_id: Annotated[str, typer.Option(envvar="XDPWATCH_GROUP_ID", help="Consumer group.")] = "xdpwatch-archive",
    from_beginning: Annotated[bool, typer.Option("--from-beginning/--from-now", help="With neither files nor a committed offset for a partition, start at its oldest message (default) or only take new ones.")] = True,
    kafka_option: KafkaOptionOpt = [],
    kafka_config: KafkaConfigOpt = None,
    dead_letter: DeadLetterOpt = "kafka",
    topic_prefix: PrefixOpt = "xdpwatch",
    exit_when_idle: Annotated[Optional[float], typer.Option(hidden=True, help="Stop after this many seconds without a message (batch runs, tests).")] = None,
    metrics_port: MetricsPortOpt = None,
    metrics_address: MetricsAddressOpt = "127.0.0.1",
    log_level: LogLevelOpt = LogLevel.info,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Archive topics to zstd-compressed JSON-lines files, one segment per topic-partition
    and offset range. Every offset lands in exactly one segment, across crashes and
    restarts: offsets are committed only after a segment is on disk (fsynced), and a
    restart resumes where the files end."""
    from xdpwatch.consumers.archive import Archiver
    from xdpwatch.consumers.base import run_loop

    arch = Archiver(directory, int(roll_mb * 1e6), roll_seconds)
    conf, _, dl, stop, stats = _consumer_setup(
        bootstrap_servers, group_id, from_beginning, kafka_option, dead_letter, topic_prefix, log_level, log_format,
        metrics_port, "archive", lambda: {"archive_segments": ("Segments written", arch.segments_written),
                                          "archive_lines": ("Messages archived", arch.lines_written)},
        kafka_config=kafka_config, metrics_address=metrics_address)
    topics = [schemas.topic(topic_prefix, s.value) for s in (stream or list(Stream))]
    run_loop(conf, topics, arch, dl, stop, exit_when_idle, stats)
    logging.getLogger("xdpwatch").info("stopped: %d messages archived in %d segments, %d dead-lettered",
                                       arch.lines_written, arch.segments_written, stats.dead_lettered)


class Action(str, enum.Enum):
    flow_start = "flow_start"
    flow_update = "flow_update"
    flow_end = "flow_end"


@app.command(epilog="Examples: xdpwatch replay --dir archive --source-ip 203.0.113.0/24 --action flow_start | jq . ; "
                    "xdpwatch replay --dir archive --output kafka --bootstrap-servers kafka:9092 "
                    "&& xdpwatch alert --topic-prefix replay --from-beginning --group-id case-42 --output stdout")
def replay(
    directory: Annotated[Path, typer.Option("--dir", envvar="XDPWATCH_ARCHIVE_DIR", help="Archive directory written by `xdpwatch archive`.")],
    files: Annotated[Optional[list[str]], typer.Argument(metavar="FILE", help="Segment files to replay, relative to --dir (default: all).", show_default=False)] = None,
    output: Annotated[Output, typer.Option(help="stdout (JSON lines) or kafka (topics PREFIX.<stream>).")] = Output.stdout,
    bootstrap_servers: Annotated[Optional[str], typer.Option(envvar="XDPWATCH_BOOTSTRAP_SERVERS", help="Kafka brokers; needed with --output kafka.")] = None,
    topic_prefix: Annotated[str, typer.Option(help="With --output kafka: write to PREFIX.<stream>. The default keeps replayed events out of the live topics.")] = "replay",
    since: Annotated[Optional[str], typer.Option(metavar="TIME", help="Only events with @timestamp at or after this ISO 8601 time (UTC if no offset).")] = None,
    until: Annotated[Optional[str], typer.Option(metavar="TIME", help="Only events with @timestamp before this ISO 8601 time.")] = None,
    source_ip: Annotated[list[str], typer.Option(metavar="IP[/PREFIX]", help="Only events whose source.ip is this address or in this CIDR; repeat for several.")] = [],
    action: Annotated[list[Action], typer.Option(help="Only events with this event.action; repeat for several.")] = [],
    stream: StreamOpt = [],
    speed: Annotated[float, typer.Option(min=0.0, help="1 = original timing, 10 = ten times faster, 0 = as fast as possible.")] = 0.0,
    kafka_option: KafkaOptionOpt = [],
    kafka_config: KafkaConfigOpt = None,
    log_level: LogLevelOpt = LogLevel.warning,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Replay an archive in order, to stdout or Kafka, with filters and optional pacing.
    Bad lines and files are reported (file:line), skipped and counted; exit code 4 then."""
    import ipaddress

    from xdpwatch.consumers.errors import ConsumerError, SkippedInputError, UndeliveredError
    from xdpwatch.consumers.replay import Filters, KafkaSink, ReplayStats, StdoutSink, replay as run_replay, select_inputs

    _setup_logging(log_level, log_format)
    try:
        filters = Filters(
            since=schemas.parse_time(since) if since else None, until=schemas.parse_time(until) if until else None,
            source_nets=[ipaddress.ip_network(n, strict=False) for n in source_ip],
            actions={a.value for a in action}, streams={s.value for s in stream})
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    stats = ReplayStats()
    segments = select_inputs(directory, files or [], stats)
    if output is Output.kafka:
        if not bootstrap_servers:
            raise ConsumerError("--bootstrap-servers (or XDPWATCH_BOOTSTRAP_SERVERS) is required with --output kafka")
        sink = KafkaSink({"bootstrap.servers": bootstrap_servers, **kafka_options(kafka_option, kafka_config)}, topic_prefix,
                         sorted({schemas.stream_of(s.topic) for s in segments}))
    else:
        sink = StdoutSink()
    try:
        run_replay(segments, filters, sink.emit, speed, stats)
        undelivered = sink.close()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    print(f"xdpwatch replay: {stats.replayed} events replayed, {stats.filtered} filtered out, "
          f"{stats.bad_lines} bad lines and {stats.bad_files} bad files skipped, from {stats.files} segments",
          file=sys.stderr)
    if undelivered:
        raise UndeliveredError(f"{undelivered} of {stats.replayed} events were not delivered to Kafka")
    if stats.bad_lines or stats.bad_files:
        raise SkippedInputError(f"{stats.bad_lines + stats.bad_files} bad lines/files were skipped (listed above)")


@app.command(epilog="Example: sudo make demo DURATION=30   (or: sudo .venv/bin/xdpwatch demo --duration 30)")
def demo(
    duration: Annotated[float, typer.Option(envvar="DURATION", min=10, max=3600, help="Seconds of traffic before it stops by itself (Ctrl-C stops it earlier).")] = 60.0,
    directory: Annotated[Path, typer.Option("--dir", help="Where the archive, logs and summary.json go: created, or emptied if an earlier demo made it; any other non-empty directory is refused.")] = Path("demo-output"),
    live: Annotated[Optional[bool], typer.Option("--live/--no-live", help="Live terminal view (default: when stdout is a terminal), else a status line every 5 s.", show_default=False)] = None,
) -> None:
    """Run the whole pipeline on this machine: a broker, a namespace with a real sshd,
    `produce` on its veth, `alert` and `archive`, and traffic (UDP/TCP/ICMP, SSH logins, an
    SSH brute force, a traffic spike). Then a summary; everything it created is removed."""
    from xdpwatch.demo import Demo, DemoError, print_summary

    _setup_logging(LogLevel.warning)
    summary = Demo(duration, directory.resolve(), sys.stdout.isatty() if live is None else live).run()
    print_summary(summary)
    failed = {k: v for k, v in summary["exit_codes"].items() if k != "traffic" and v != 0}
    if failed:
        raise DemoError(f"components exited with errors: {failed}; their logs are in {summary['logs']}")
    if summary["left_behind"]:
        raise DemoError(f"could not remove: {', '.join(summary['left_behind'])}")
    if not any(a["rule"] == "ssh_bruteforce" for a in summary["alerts"]):
        raise DemoError(f"the SSH brute force raised no alert; see {summary['logs']}/alert.log")


@app.command("schemas")
def schemas_cmd(
    stream: Annotated[Optional[str], typer.Argument(help="Print this stream's schema (JSON); omit to list them.")] = None,
) -> None:
    """List the message schemas (the contract of every topic), or print one."""
    if stream is None:
        for name in schemas.names():
            typer.echo(f"{name:<15} {schemas.schema_id(name):<40} {schemas.path(name)}")
        return
    try:
        typer.echo(schemas.path(stream).read_text(), nl=False)
    except schemas.UnknownStream as e:
        raise typer.BadParameter(str(e.args[0]), param_hint="STREAM") from None


def main() -> None:
    from xdpwatch.errors import XdpwatchError
    from xdpwatch.observability import redact

    try:
        app()
    except XdpwatchError as e:
        print(f"xdpwatch: error: {redact(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
