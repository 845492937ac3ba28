"""What enforcement must never block, found without privileges or dependencies: this host's
own addresses (every interface) and its default gateways, read from /proc/net of the
producer's network namespace, and the Kafka brokers' resolved addresses.

- IPv4 addresses: the LOCAL entries of /proc/net/fib_trie (every address of every interface
  that is up, secondaries included). That file names no interface: the name shown is the
  interface of the most specific link route (/proc/net/route) holding the address, if any.
- IPv6 addresses: /proc/net/if_inet6 (with their interface).
- Default gateways: /proc/net/route and /proc/net/ipv6_route (the main table; gateways of
  other policy-routing tables are not seen).
Missing IPv6 files mean IPv6 is off; the IPv4 files must be readable. A line that does not
parse is skipped.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RTF_GATEWAY = 0x2
PROC_NET = Path("/proc/net")


@dataclass(frozen=True)
class Protected:
    """A prefix never blocked, and what it is ("an address of this host (eth0)", "a default
    gateway (eth0)", "the Kafka broker kafka1:9092"), for the reason of a refusal."""

    net: Network
    what: str
    lo: int = field(init=False, repr=False, compare=False)  # the prefix as an integer range
    hi: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", int(self.net.network_address))
        object.__setattr__(self, "hi", int(self.net.broadcast_address))

    def __str__(self) -> str:
        n = self.net
        return f"{n.network_address if n.prefixlen == n.max_prefixlen else n} is {self.what}"


# ------------------------------------------------------------------------- /proc parsers
def parse_fib_trie(text: str) -> set[Network]:
    """The LOCAL prefixes of /proc/net/fib_trie: '|-- ADDR' then lines '/LEN SCOPE TYPE'."""
    out: set[Network] = set()
    addr = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|--"):
            addr = s[3:].strip()
        elif s.startswith("/") and addr is not None:
            parts = s.split()
            if len(parts) >= 3 and parts[2] == "LOCAL":
                try:
                    out.add(ipaddress.ip_network(f"{addr}{parts[0]}", strict=False))
                except ValueError:
                    continue
        else:
            addr = None
    return out


def _hex4(h: str) -> ipaddress.IPv4Address:
    # /proc/net/route prints the raw __be32 as a native-endian %08X
    return ipaddress.IPv4Address(struct.pack("=I", int(h, 16)))


def parse_route(text: str) -> tuple[list[tuple[ipaddress.IPv4Network, str]], list[tuple[ipaddress.IPv4Address, str]]]:
    """/proc/net/route: (link routes as (network, interface), default gateways as
    (address, interface))."""
    links, gateways = [], []
    for line in text.splitlines()[1:]:
        f = line.split()
        try:
            iface, dest, gw, flags, mask = f[0], _hex4(f[1]), _hex4(f[2]), int(f[3], 16), _hex4(f[7])
        except (IndexError, ValueError, struct.error):
            continue
        if flags & RTF_GATEWAY:
            if int(dest) == 0 and int(mask) == 0 and int(gw):
                gateways.append((gw, iface))
        else:
            links.append((ipaddress.IPv4Network(f"{dest}/{mask}", strict=False), iface))
    return links, gateways


def parse_if_inet6(text: str) -> list[tuple[ipaddress.IPv6Address, str]]:
    """/proc/net/if_inet6: 'ADDR32HEX IFINDEX PLEN SCOPE FLAGS NAME' per address."""
    out = []
    for line in text.splitlines():
        f = line.split()
        try:
            out.append((ipaddress.IPv6Address(bytes.fromhex(f[0])), f[5]))
        except (IndexError, ValueError):
            continue
    return out


def parse_ipv6_route(text: str) -> list[tuple[ipaddress.IPv6Address, str]]:
    """/proc/net/ipv6_route: the default routes' gateways ('DEST PLEN SRC SPLEN NEXTHOP
    METRIC REFCNT USE FLAGS NAME')."""
    out = []
    for line in text.splitlines():
        f = line.split()
        try:
            if int(f[1], 16) == 0 and int(f[8], 16) & RTF_GATEWAY and int(f[4], 16):
                out.append((ipaddress.IPv6Address(bytes.fromhex(f[4])), f[9]))
        except (IndexError, ValueError):
            continue
    return out


def _name_of(addr, links: list[tuple[ipaddress.IPv4Network, str]]) -> str | None:
    best = None
    for net, iface in links:
        if addr in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, iface)
    return best[1] if best else None


def host_protected(proc_net: Path = PROC_NET) -> list[Protected]:
    """This host's addresses and default gateways, both families, as /proc/net says now.
    Raises OSError when the IPv4 files cannot be read."""
    links, gateways = parse_route((proc_net / "route").read_text())
    out = []
    for net in sorted(parse_fib_trie((proc_net / "fib_trie").read_text()), key=lambda n: (n.network_address, n.prefixlen)):
        name = _name_of(net.network_address, links) if net.prefixlen == 32 else None
        out.append(Protected(net, f"an address of this host ({name})" if name else "an address of this host"))
    try:
        v6 = parse_if_inet6((proc_net / "if_inet6").read_text())
        gateways6 = parse_ipv6_route((proc_net / "ipv6_route").read_text())
    except FileNotFoundError:  # IPv6 is off
        v6, gateways6 = [], []
    out += [Protected(ipaddress.ip_network(a), f"an address of this host ({name})") for a, name in v6]
    out += [Protected(ipaddress.ip_network(a), f"a default gateway ({name})") for a, name in (*gateways, *gateways6)]
    return out


# ------------------------------------------------------------------------- brokers
def split_server(server: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'PROTOCOL://host:port' (as bootstrap.servers takes them)."""
    s = server.strip().rpartition("://")[2]
    host, sep, port = s.rpartition(":")
    if not sep:
        host, port = s, "9092"
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"{server!r} is not host:port")
    return host, int(port)


def broker_protected(servers: Iterable[str]) -> list[Protected]:
    """Every address each broker name resolves to now; a name that does not resolve is
    logged and left out."""
    out: list[Protected] = []
    for server in dict.fromkeys(s for s in servers if s.strip()):
        try:
            host, port = split_server(server)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (ValueError, OSError) as e:
            log.warning("never-block list: Kafka broker %s left out: %s", server, e)
            continue
        addrs = dict.fromkeys(ipaddress.ip_address(i[4][0].partition("%")[0]) for i in infos)
        out += [Protected(ipaddress.ip_network(a), f"the Kafka broker {server.strip()}") for a in addrs]
    return out
