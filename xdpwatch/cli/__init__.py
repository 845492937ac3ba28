"""The `xdpwatch` command. Thin: parse options, build what the library offers, map its errors
to one line on stderr and an exit code (XdpwatchError.exit_code: 1 a user or configuration
error, 3 events not delivered, 4 input skipped).

- app: the Typer app; options: what several commands share, declared once
- produce: `produce`; consume: `alert`, `archive`, `replay`; control: `block`, `unblock`,
  `blocks`; tools: `demo`, `schemas`
"""

from __future__ import annotations

import sys

from xdpwatch.cli import consume, control, produce, tools  # noqa: F401 (each adds its commands to the app)
from xdpwatch.cli.app import app

# `xdpwatch --help` lists the commands in the order a user meets them.
ORDER = ("produce", "alert", "block", "unblock", "blocks", "archive", "replay", "demo", "schemas")
app.registered_commands.sort(key=lambda c: ORDER.index(c.name or c.callback.__name__))


def main() -> None:
    from xdpwatch.errors import XdpwatchError
    from xdpwatch.observability import redact

    try:
        app()
    except XdpwatchError as e:
        print(f"xdpwatch: error: {redact(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
