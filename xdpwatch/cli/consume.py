"""The consumers: `xdpwatch alert`, `archive` and `replay`. Each parses its options, builds
its handler (consumers/), and runs the shared loop (consumers/base.py) or the replay."""

from __future__ import annotations

import enum
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from xdpwatch import schemas
from xdpwatch.cli.app import app
from xdpwatch.cli.options import (BootstrapForKafkaOutputOpt, BootstrapOpt, DeadLetterOpt, KafkaConfigOpt,
                                  KafkaOptionOpt, LogFormat, LogFormatOpt, LogLevel, LogLevelOpt, MetricsAddressOpt,
                                  MetricsPortOpt, Output, PrefixOpt, client_conf, duration, parsed, setup_logging,
                                  stop_event, topic_prefix_option)

# The streams of the contract (schemas/), as a choice for --stream.
Stream = enum.Enum("Stream", {name.replace("-", "_"): name for name in schemas.names()}, type=str)


class Action(str, enum.Enum):
    flow_start = "flow_start"
    flow_update = "flow_update"
    flow_end = "flow_end"


StreamOpt = Annotated[list[Stream], typer.Option("--stream", help="Only this stream; repeat for several (default: all).")]
ExitWhenIdleOpt = Annotated[Optional[float], typer.Option(hidden=True, help="Stop after this many seconds without a message (batch runs, tests).")]
ReplayPrefixOpt = topic_prefix_option("With --output kafka: write to PREFIX.<stream>. The default keeps replayed events out of the live topics.", envvar=None)


def _consumer_setup(bootstrap_servers, group_id, from_beginning, kafka_option, kafka_config, dead_letter, topic_prefix,
                    log_level, log_format, metrics_port, metrics_address, command, counters=lambda: {},
                    gauges=lambda: {}):
    """What every consumer command shares: logging, Kafka settings, metrics (the handler's own
    `counters` and `gauges` too), dead-letter sink, stop event. Returns (consumer conf,
    client conf, dead-letter sink, stop, loop stats)."""
    from xdpwatch.consumers.base import ConsumerMetrics, FileDeadLetter, KafkaDeadLetter, LoopStats, consumer_conf
    from xdpwatch.observability import serve_metrics

    setup_logging(log_level, log_format)
    client = client_conf(bootstrap_servers, kafka_option, kafka_config)
    conf = consumer_conf(client, group_id, from_beginning)
    stats = LoopStats()
    if metrics_port:
        metrics = ConsumerMetrics(command, stats, counters, gauges)
        conf.update({"stats_cb": metrics.on_stats, "statistics.interval.ms": 5000})
        serve_metrics(metrics_port, metrics, metrics_address)
    if dead_letter == "kafka":
        sink = KafkaDeadLetter(client, f"{topic_prefix}.dead-letter")
    else:
        sink = FileDeadLetter(dead_letter)
    return conf, client, sink, stop_event(), stats


def _block_rules(rules: list[str]) -> list[str]:
    """--block-on: only rules whose evidence a spoofer cannot forge; any other is a bad option."""
    from xdpwatch.consumers.control import blockable

    return [parsed(blockable, r, "--block-on") for r in rules]


@app.command(epilog="Example: xdpwatch alert --bootstrap-servers kafka:9092 --rules rules.toml --output stdout")
def alert(
    bootstrap_servers: BootstrapOpt = None,
    rules: Annotated[Optional[Path], typer.Option(envvar="XDPWATCH_RULES", help="TOML rules file (see --print-default-rules); default rules without it.")] = None,
    output: Annotated[str, typer.Option(envvar="XDPWATCH_ALERT_OUTPUT", help="'kafka' (topic PREFIX.alerts), 'stdout' (JSON lines), or a file path (JSON lines, fsynced).")] = "kafka",
    group_id: Annotated[str, typer.Option(envvar="XDPWATCH_GROUP_ID", help="Consumer group; run several with one id to share partitions.")] = "xdpwatch-alert",
    from_beginning: Annotated[bool, typer.Option(help="With no committed offset, start at the oldest message (default: only new ones).")] = False,
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
    exit_when_idle: ExitWhenIdleOpt = None,
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
    from xdpwatch.consumers.errors import ConsumerError
    from xdpwatch.kafka.read import Reader

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

    def counters() -> dict:
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

    conf, client, dl, stop, stats = _consumer_setup(
        bootstrap_servers, group_id, from_beginning, kafka_option, kafka_config, dead_letter, topic_prefix,
        log_level, log_format, metrics_port, metrics_address, "alert", counters,
        gauges=lambda: {"alert_state_rebuild_seconds": ("Seconds the last state rebuild took",
                                                        handler.stats["rebuild_seconds"] if handler else 0)})
    ttl_s = duration(block_ttl, "--block-ttl")
    sink = AlertSink(output, client, f"{topic_prefix}.alerts")
    control_topic = schemas.topic(topic_prefix, "control")
    handler = AlertHandler(rules_cfg, sink, history=Reader(client),
                           alerts_topic=f"{topic_prefix}.alerts" if output == "kafka" else None,
                           control_topic=control_topic if block_on else None, from_beginning=from_beginning)
    if block_on:
        from xdpwatch.consumers.control import BlockBudget, BlockOnAlert, CommandSender

        blocker = handler.on_alert = BlockOnAlert(CommandSender(client, control_topic), set(block_on), ttl_s,
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
    exit_when_idle: ExitWhenIdleOpt = None,
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
        bootstrap_servers, group_id, from_beginning, kafka_option, kafka_config, dead_letter, topic_prefix,
        log_level, log_format, metrics_port, metrics_address, "archive",
        lambda: {"archive_segments": ("Segments written", arch.segments_written),
                 "archive_lines": ("Messages archived", arch.lines_written)})
    topics = [schemas.topic(topic_prefix, s.value) for s in (stream or list(Stream))]
    run_loop(conf, topics, arch, dl, stop, exit_when_idle, stats)
    logging.getLogger("xdpwatch").info("stopped: %d messages archived in %d segments, %d dead-lettered",
                                       arch.lines_written, arch.segments_written, stats.dead_lettered)


@app.command(epilog="Examples: xdpwatch replay --dir archive --source-ip 203.0.113.0/24 --action flow_start | jq . ; "
                    "xdpwatch replay --dir archive --output kafka --bootstrap-servers kafka:9092 "
                    "&& xdpwatch alert --topic-prefix replay --from-beginning --group-id case-42 --output stdout")
def replay(
    directory: Annotated[Path, typer.Option("--dir", envvar="XDPWATCH_ARCHIVE_DIR", help="Archive directory written by `xdpwatch archive`.")],
    files: Annotated[Optional[list[str]], typer.Argument(metavar="FILE", help="Segment files to replay, relative to --dir (default: all).", show_default=False)] = None,
    output: Annotated[Output, typer.Option(help="stdout (JSON lines) or kafka (topics PREFIX.<stream>).")] = Output.stdout,
    bootstrap_servers: BootstrapForKafkaOutputOpt = None,
    topic_prefix: ReplayPrefixOpt = "replay",
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

    from xdpwatch.consumers.errors import SkippedInputError, UndeliveredError
    from xdpwatch.consumers.replay import Filters, KafkaSink, ReplayStats, StdoutSink, replay as run_replay, select_inputs

    setup_logging(log_level, log_format)
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
        sink = KafkaSink(client_conf(bootstrap_servers, kafka_option, kafka_config, " with --output kafka"),
                         topic_prefix, sorted({schemas.stream_of(s.topic) for s in segments}))
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
