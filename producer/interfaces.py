"""Which interfaces to watch, and news of interfaces that come and go.

`Selection` is what `--iface`, `--iface-pattern` and `--exclude-iface-pattern` say: a pure
function from the host's interfaces (ifindex -> name) to the ones to watch. `LinkEvents`
is a NETLINK_ROUTE socket subscribed to RTNLGRP_LINK (links created, changed, deleted):
the pipeline re-reads the interfaces as soon as it says something happened, and every
few seconds anyway, so a lost notification only delays.
"""

from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass

from xdpwatch.producer.errors import ConfigError, InterfaceError

RTMGRP_LINK = 1  # the multicast group of RTNLGRP_LINK (1 << (RTNLGRP_LINK - 1))


def compile_pattern(pattern: str | None, option: str) -> re.Pattern | None:
    """`pattern` compiled (None stays None); ConfigError in one line when it is not a regex."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{option} {pattern!r} is not a regular expression: {e}") from None


@dataclass(frozen=True)
class Selection:
    """The interfaces to watch: every name in `names`, and every interface whose whole name
    matches `pattern` but not `exclude` (which applies to pattern matches only)."""

    names: tuple[str, ...] = ()
    pattern: re.Pattern | None = None
    exclude: re.Pattern | None = None

    @classmethod
    def parse(cls, names, pattern: str | None = None, exclude: str | None = None) -> "Selection":
        names = tuple(dict.fromkeys(n for n in names if n))
        for n in names:
            if len(n) >= 16 or "/" in n or n in (".", ".."):
                raise ConfigError(f"--iface {n!r} is not an interface name")
        sel = cls(names, compile_pattern(pattern, "--iface-pattern"), compile_pattern(exclude, "--exclude-iface-pattern"))
        if not names and sel.pattern is None:
            raise ConfigError("name an interface to watch: --iface NAME (repeat for several) or --iface-pattern REGEX")
        if sel.exclude is not None and sel.pattern is None:
            raise ConfigError("--exclude-iface-pattern narrows --iface-pattern: give that too")
        return sel

    def matches(self, name: str) -> bool:
        if name in self.names:
            return True
        return (self.pattern is not None and self.pattern.fullmatch(name) is not None
                and (self.exclude is None or self.exclude.fullmatch(name) is None))

    def select(self, links: dict[int, str]) -> dict[int, str]:
        """Of `links` (ifindex -> name), the ones to watch."""
        return {i: n for i, n in links.items() if self.matches(n)}

    def check_start(self, links: dict[int, str]) -> dict[int, str]:
        """The interfaces to watch at start; InterfaceError when a named one does not exist or
        the pattern matches none (later, interfaces may come and go)."""
        present = set(links.values())
        for n in self.names:
            if n not in present:
                raise InterfaceError(f"interface {n!r} does not exist; list interfaces with `ip link`")
        if self.pattern is not None:
            hits = [n for n in links.values() if n not in self.names and self.matches(n)]
            if not hits:
                raise InterfaceError(f"no interface matches --iface-pattern {self.pattern.pattern!r}"
                                     + (f" (minus --exclude-iface-pattern {self.exclude.pattern!r})" if self.exclude else "")
                                     + "; list interfaces with `ip link`")
        return self.select(links)

    def describe(self) -> str:
        parts = list(self.names)
        if self.pattern is not None:
            parts.append(f"/{self.pattern.pattern}/" + (f" except /{self.exclude.pattern}/" if self.exclude else ""))
        return ", ".join(parts)


def current_links() -> dict[int, str]:
    """This network namespace's interfaces, ifindex -> name."""
    return dict(socket.if_nameindex())


class LinkEvents:
    """Link notifications (RTNLGRP_LINK) on a plain NETLINK_ROUTE socket, never blocking."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, RTMGRP_LINK))
        except OSError:
            self._sock.close()
            raise

    def pending(self) -> bool:
        """Whether any link changed since the last call (the messages are read and dropped:
        the caller re-reads the interfaces). An overrun socket (ENOBUFS) counts as a change."""
        seen = False
        while True:
            try:
                if not self._sock.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError as e:  # ENOBUFS: notifications were lost
                if e.errno != errno.ENOBUFS:
                    return True
                seen = True

    def close(self) -> None:
        self._sock.close()
