"""The prevention loop's control plane: `xdpwatch block`, `unblock` (commands on
PREFIX.control) and `blocks` (what the producers report on PREFIX.enforcement)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from xdpwatch import schemas
from xdpwatch.cli import options
from xdpwatch.cli.app import app
from xdpwatch.cli.options import (BootstrapOpt, KafkaConfigOpt, KafkaOptionOpt, LogLevel, LogLevelOpt, PrefixOpt,
                                  client_conf, setup_logging)


def _send(bootstrap_servers, kafka_option, kafka_config, topic_prefix, log_level, doc) -> None:
    from xdpwatch.consumers.control import CommandSender

    setup_logging(log_level)
    conf = client_conf(bootstrap_servers, kafka_option, kafka_config)
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

    net = options.prefix(prefix, "PREFIX")
    _send(bootstrap_servers, kafka_option, kafka_config, topic_prefix, log_level,
          command("block", str(net), operator(), ttl_s=options.duration(ttl, "--ttl"), reason=reason))


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

    net = options.prefix(prefix, "PREFIX")
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

    setup_logging(log_level)
    conf = client_conf(bootstrap_servers, kafka_option, kafka_config)
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
