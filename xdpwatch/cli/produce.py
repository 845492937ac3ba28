"""`xdpwatch produce`: parse the options, build the pipeline (producer/pipeline.py), run
it until SIGINT or SIGTERM, report."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from xdpwatch.cli.app import app
from xdpwatch.cli.options import (BootstrapForKafkaOutputOpt, KafkaConfigOpt, KafkaOptionOpt, LogFormat, LogFormatOpt,
                                  LogLevel, LogLevelOpt, MetricsAddressOpt, MetricsPortOpt, Output, client_conf, prefix,
                                  setup_logging, stop_event, topic_prefix_option)


class XdpMode(str, enum.Enum):
    auto = "auto"
    native = "native"
    generic = "generic"


ProducerPrefixOpt = topic_prefix_option("Topics are PREFIX.packet-counts and PREFIX.ssh-flows.")


@app.command(epilog="Example: xdpwatch produce --iface eth0 --bootstrap-servers kafka:9092 "
                    "-X security.protocol=SSL  (events go to xdpwatch.packet-counts and xdpwatch.ssh-flows)")
def produce(
    iface: Annotated[str, typer.Option("--iface", "-i", envvar="XDPWATCH_IFACE",
                                       help="Interface to watch (its ingress traffic).")],
    bootstrap_servers: BootstrapForKafkaOutputOpt = None,
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
    topic_prefix: ProducerPrefixOpt = "xdpwatch",
    topic_partitions: Annotated[int, typer.Option(envvar="XDPWATCH_TOPIC_PARTITIONS", min=1,
                                                  help="Partitions for topics xdpwatch creates (existing topics are left as they are).")] = 3,
    topic_replication: Annotated[int, typer.Option(envvar="XDPWATCH_TOPIC_REPLICATION", min=1,
                                                   help="Replication factor for topics xdpwatch creates.")] = 1,
    xdp_mode: Annotated[XdpMode, typer.Option(envvar="XDPWATCH_XDP_MODE",
                                              help="native (driver), generic (any interface, slower), or auto: native if the driver supports it.")] = XdpMode.auto,
    egress: Annotated[bool, typer.Option("--egress/--no-egress", envvar="XDPWATCH_EGRESS",
                                         help="Also hook the interface's egress (TCX, Linux >= 6.6) so SSH flows count both directions (source.* and destination.* packets and bytes). Without it, or where the kernel cannot, flows count what arrives.")] = True,
    kafka_option: KafkaOptionOpt = [],
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

    setup_logging(log_level, log_format)
    if enforce and dry_run:
        raise ConfigError("--enforce and --dry-run exclude each other: choose one")
    options = pipeline.Options(
        iface=iface, output=output.value, kafka=None, interval_s=interval, flow_idle_timeout_s=flow_idle_timeout,
        flow_active_timeout_s=flow_active_timeout, flow_fin_linger_s=flow_fin_linger, ssh_ports=tuple(ssh_port),
        topic_prefix=topic_prefix, topic_partitions=topic_partitions, topic_replication=topic_replication,
        xdp_mode=xdp_mode.value, egress=egress, flow_table_size=flow_table_size, ringbuf_pages=ringbuf_pages,
        shutdown_timeout_s=shutdown_timeout, spool_dir=spool_dir, spool_max_mb=spool_max_mb,
        enforce_mode="enforce" if enforce else "dry_run" if dry_run else "off",
        allow=tuple(prefix(p, "--allow") for p in allow), syn_rate_limit=syn_rate_limit, syn_burst=syn_burst,
        metrics_port=metrics_port, metrics_address=metrics_address, summary_file=summary_file)
    bpf = options.check()
    if dump_bpf:
        typer.echo(render_source(bpf), nl=False)
        return
    if output is Output.kafka:
        options.kafka = client_conf(bootstrap_servers, kafka_option, kafka_config, " with --output kafka")
    stop = stop_event()
    pipeline.finish(pipeline.build(options).run(stop), options)
