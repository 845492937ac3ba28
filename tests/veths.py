"""A veth pair of the tests' own: one end in the root namespace (where the program attaches),
the other, `eth0`, in a namespace of its own that sends crafted frames. IPv6 is off and
neither end has an address, so the only frames arriving are the ones a test sends."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from xdpwatch.demo.lab import sh

SENDFRAMES = Path(__file__).resolve().parent / "sendframes.py"
NOBODY_MAC = "02:00:00:00:00:99"  # owned by no interface: frames are seen by XDP, answered by nobody
PEER_MAC = "02:00:00:00:77:01"


class Veth:
    """`name` in the root namespace, its peer `eth0` in namespace `name`-ns."""

    def __init__(self, name: str):
        self.name, self.ns = name, f"{name}-ns"
        self.delete()
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        sh("sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1")
        sh("ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "address", PEER_MAC, "up")
        sh("ip", "link", "set", name, "up")

    def send(self, frames: list[bytes]) -> int:
        """Send `frames` from the namespace end: each arrives once at `name`. Returns their bytes."""
        payload = b"".join(struct.pack("!I", len(f)) + f for f in frames)
        r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, str(SENDFRAMES), "eth0"], input=payload,
                           capture_output=True, timeout=60)
        assert r.returncode == 0 and int(r.stdout) == len(frames), r.stderr
        return sum(len(f) for f in frames)

    def delete(self) -> None:
        sh("ip", "link", "del", self.name, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


def udp(n: int, size: int, src: str) -> list[bytes]:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    return [bytes(Ether(src=PEER_MAC, dst=NOBODY_MAC) / IP(src=src, dst="198.51.100.1") / UDP(dport=9999)
                  / (b"x" * size))] * n


def syns(src: str, sports) -> list[bytes]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    return [bytes(Ether(src=PEER_MAC, dst=NOBODY_MAC) / IP(src=src, dst="198.51.100.1") / TCP(sport=p, dport=22, flags="S"))
            for p in sports]
