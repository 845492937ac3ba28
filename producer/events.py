"""Shape kernel records into the JSON documents of schemas/ (ECS field names).

Pure functions of their inputs plus a Clock, so they are unit-tested without a kernel.
"""

from __future__ import annotations

import binascii
import hashlib
import socket
import struct
import time
from dataclasses import dataclass, field

from xdpwatch.producer.flows import FlowReport
from xdpwatch.schemas import format_time_ns
from xdpwatch.producer.records import DIR_TO_CLIENT, DIR_TO_SERVER, HANDSHAKE_NAMES, CounterId, FlowKey, tcp_flag_names
from xdpwatch.producer.ssh import login_outcome, ssh_identification

# Counter ids that are packet classes, with their JSON names.
CLASSES = {
    "total": CounterId.TOTAL,
    "ipv4": CounterId.IPV4,
    "ipv6": CounterId.IPV6,
    "arp": CounterId.ARP,
    "l3_other": CounterId.L3_OTHER,
    "tcp": CounterId.TCP,
    "udp": CounterId.UDP,
    "icmp": CounterId.ICMP,
    "l4_other": CounterId.L4_OTHER,
    "ssh": CounterId.SSH,
    "malformed": CounterId.MALFORMED,
    "vlan": CounterId.VLAN,
}

# Which directions the ingress saw: to the server only (a local or downstream server),
# from the server only (a local client), or both (loopback, a mirror port).
DIRECTIONS = {0: "unknown", DIR_TO_SERVER: "inbound", DIR_TO_CLIENT: "outbound",
              DIR_TO_SERVER | DIR_TO_CLIENT: "internal"}

EVENT_TYPES = {"flow_start": ["connection", "start"], "flow_established": ["connection", "info"],
               "flow_update": ["connection", "info"], "flow_end": ["connection", "end"]}
ENFORCEMENT_TYPES = {"block_applied": ["denied", "creation"], "block_removed": ["deletion"],
                     "block_expired": ["deletion"], "command_rejected": ["info"]}


class Clock:
    """Turns the kernel's CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) into wall time."""

    def __init__(self) -> None:
        self.resync()

    def resync(self) -> None:
        """Re-read the offset; call now and then so NTP steps are followed."""
        self._offset = time.time_ns() - time.monotonic_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self._offset


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:12]
    except OSError:
        return "noboot"


_PORTS = struct.Struct("!BBHH")
_SEED = struct.pack("!H", 0)


def community_id(key: FlowKey, addrs: tuple[bytes, bytes] | None = None) -> str:
    """Community ID v1 (https://github.com/corelight/community-id-spec, seed 0) of a
    TCP/UDP flow; `addrs` is key.addrs() when the caller has it already."""
    src, dst = addrs or key.addrs()
    sport, dport = key.client_port, key.server_port
    if (src, sport) > (dst, dport):
        src, dst, sport, dport = dst, src, dport, sport
    digest = hashlib.sha1(_SEED + src + dst + _PORTS.pack(key.proto, 0, sport, dport)).digest()
    return "1:" + binascii.b2a_base64(digest, newline=False).decode()


@dataclass
class EventShaper:
    """Builds the documents; owns the event id sequence of this producer run."""

    interface: str
    clock: Clock = field(default_factory=Clock)
    hostname: str = field(default_factory=socket.gethostname)
    enforce_mode: str = "off"  # off | dry_run | enforce: packet-counts carry `enforcement` unless off

    def __post_init__(self) -> None:
        self._id_prefix = f"{self.hostname}-{boot_id()}-{time.time_ns():x}"
        self._seq = 0
        self._observer = {"hostname": self.hostname, "ingress": {"interface": {"name": self.interface}}}

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._id_prefix}-{self._seq}"

    def packet_counts(self, start_wall_ns: int, end_wall_ns: int, delta: list[tuple[int, int]],
                      evicted: int, active: int, final: bool = False) -> dict:
        """One interval's document from per-counter (packets, bytes) deltas."""
        interval = {"start": format_time_ns(start_wall_ns), "end": format_time_ns(end_wall_ns),
                    "duration_ms": round((end_wall_ns - start_wall_ns) / 1e6, 3)}
        if final:
            interval["final"] = True
        doc = {
            "@timestamp": interval["end"],
            "event": {"id": self._next_id(), "kind": "metric", "module": "xdpwatch",
                      "dataset": "xdpwatch.packet_counts"},
            "interval": interval,
            "observer": self._observer,
            "packets": {name: delta[cid][0] for name, cid in CLASSES.items()},
            "bytes": {name: delta[cid][1] for name, cid in CLASSES.items()},
            "drops": {"ringbuf": delta[CounterId.RINGBUF_DROPS][0]},
            "flows": {"started": delta[CounterId.FLOWS_STARTED][0], "evicted": evicted, "active": active},
        }
        if self.enforce_mode != "off":
            doc["enforcement"] = {"mode": self.enforce_mode, **{
                name: {"packets": delta[cid][0], "bytes": delta[cid][1]}
                for name, cid in (("blocked", CounterId.BLOCKED), ("syn_limited", CounterId.SYN_LIMITED))}}
        return doc

    def enforcement(self, action: str, fields: dict, reason: str | None = None) -> dict:
        """An enforcement event (schemas/enforcement.v1.json): a block applied, removed,
        expired, or a command rejected, with its cause in `fields`."""
        event = {"id": self._next_id(), "kind": "event", "module": "xdpwatch", "dataset": "xdpwatch.enforcement",
                 "category": ["network"], "type": ENFORCEMENT_TYPES[action], "action": action}
        if reason:
            event["reason"] = reason
        return {"@timestamp": format_time_ns(time.time_ns()), "event": event, "observer": self._observer,
                "xdpwatch": {"enforcement": fields}}

    def flow(self, r: FlowReport) -> dict:
        """The document for one flow report."""
        k, v = r.key, r.val
        addrs = k.addrs()
        cid = community_id(k, addrs)
        client_ip, server_ip = k.ips(addrs)
        packets, nbytes, first_ns, last_ns = v.packets, v.bytes, v.first_ns, v.last_ns
        to_client_packets, to_client_bytes = v.to_client_packets, v.to_client_bytes
        client = {"ip": client_ip, "port": k.client_port,
                  "packets": packets - to_client_packets, "bytes": nbytes - to_client_bytes}
        server = {"ip": server_ip, "port": k.server_port,
                  "packets": to_client_packets, "bytes": to_client_bytes}
        start = format_time_ns(self.clock.wall_ns(first_ns))
        end = start if last_ns == first_ns else format_time_ns(self.clock.wall_ns(last_ns))
        event = {
            "id": self._next_id(), "kind": "event", "module": "xdpwatch", "dataset": "xdpwatch.ssh_flows",
            "category": ["network"], "type": EVENT_TYPES[r.action], "action": r.action,
            "start": start, "end": end, "duration": last_ns - first_ns,
        }
        if r.reason is not None:
            event["reason"] = r.reason
        doc = {
            "@timestamp": event["start"] if r.action == "flow_start" else event["end"],
            "event": event,
            "flow": {"id": f"{self._id_prefix}-f{first_ns:x}-{cid[2:10]}",
                     "midstream": bool(v.midstream)},
            "source": client,
            "destination": server,
            "network": {"transport": "tcp", "type": "ipv4" if k.family == 4 else "ipv6",
                        "packets": packets, "bytes": nbytes,
                        "direction": DIRECTIONS[v.directions],
                        "community_id": cid},
            "tcp": {"flags": tcp_flag_names(v.tcp_flags), "handshake": HANDSHAKE_NAMES[v.handshake]},
            "observer": self._observer,
        }
        if r.banners:
            doc["ssh"] = {side: ssh_identification(r.banners[d])
                          for side, d in (("client", DIR_TO_SERVER), ("server", DIR_TO_CLIENT)) if d in r.banners}
            if r.action == "flow_update" or r.action == "flow_end":
                doc["ssh"]["auth"] = login_outcome(list(v.server_sizes[:v.nsizes]), ended=r.action == "flow_end")
        return doc


class CounterDeltas:
    """Turns cumulative per-counter totals into per-interval deltas."""

    def __init__(self, initial: list[tuple[int, int]]):
        self._last = initial

    def delta(self, current: list[tuple[int, int]]) -> list[tuple[int, int]]:
        d = [(cp - lp, cb - lb) for (cp, cb), (lp, lb) in zip(current, self._last)]
        self._last = current
        return d
