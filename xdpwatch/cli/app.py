"""The Typer app every command module adds its commands to."""

from __future__ import annotations

from typing import Annotated

import typer

from xdpwatch import __version__

app = typer.Typer(
    name="xdpwatch",
    help="Network security telemetry from XDP into Kafka: packet counters, SSH flows (both directions, software versions, login outcome), alerts, archives, and opt-in blocking in the kernel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xdpwatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass
