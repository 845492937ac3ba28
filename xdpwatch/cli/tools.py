"""The commands around the pipeline: `xdpwatch demo` (xdpwatch/demo/) and `schemas`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from xdpwatch import schemas
from xdpwatch.cli.app import app
from xdpwatch.cli.options import LogLevel, setup_logging


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

    setup_logging(LogLevel.warning)
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
