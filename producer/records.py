"""ctypes mirror of bpf/xdpwatch.h: the counter indices and the structs the kernel writes.

tests/unit/test_records.py compiles the C header with the system compiler and checks that
every size and offset here matches it.
"""

from __future__ import annotations

import ctypes as ct
import enum
import socket


class CounterId(enum.IntEnum):
    """Index into the per-CPU `counters` array (enum counter_id)."""

    TOTAL = 0
    IPV4 = 1
    IPV6 = 2
    ARP = 3
    L3_OTHER = 4
    TCP = 5
    UDP = 6
    ICMP = 7
    L4_OTHER = 8
    SSH = 9
    MALFORMED = 10
    VLAN = 11
    FLOWS_STARTED = 12
    RINGBUF_DROPS = 13
    EVENTS_SUBMITTED = 14
    BLOCKED = 15
    SYN_LIMITED = 16


NR_COUNTERS = len(CounterId)


class IfSlot(ct.Structure):
    """An entry of the direct-mapped ifindex -> slot table (struct ifslot)."""

    _fields_ = [("ifindex", ct.c_uint32), ("slot", ct.c_uint32)]


class Counter(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class FlowKey(ct.Structure):
    _fields_ = [
        ("client_addr", ct.c_uint8 * 16),
        ("server_addr", ct.c_uint8 * 16),
        ("client_port", ct.c_uint16),
        ("server_port", ct.c_uint16),
        ("family", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("_pad", ct.c_uint8 * 2),
        ("ifindex", ct.c_uint32),
    ]

    def addrs(self) -> tuple[bytes, bytes]:
        """(client, server) address bytes: 4 for IPv4, 16 for IPv6."""
        raw = bytes(self)  # one copy; slicing a ctypes array builds a list
        if self.family == 4:
            return raw[0:4], raw[16:20]
        return raw[0:16], raw[16:32]

    def ips(self, addrs: tuple[bytes, bytes] | None = None) -> tuple[str, str]:
        """(client, server) addresses as text; `addrs` is self.addrs() when the caller has it."""
        af = socket.AF_INET if self.family == 4 else socket.AF_INET6
        client, server = addrs or self.addrs()
        return socket.inet_ntop(af, client), socket.inet_ntop(af, server)

    @property
    def client_ip(self) -> str:
        return self.ips()[0]

    @property
    def server_ip(self) -> str:
        return self.ips()[1]


SERVER_SIZES = 12


class FlowValue(ct.Structure):
    _fields_ = [
        ("first_ns", ct.c_uint64),
        ("last_ns", ct.c_uint64),
        ("fin_ns", ct.c_uint64),
        ("rst_ns", ct.c_uint64),
        ("packets", ct.c_uint64),
        ("bytes", ct.c_uint64),
        ("to_client_packets", ct.c_uint64),
        ("to_client_bytes", ct.c_uint64),
        ("tcp_flags", ct.c_uint32),
        ("client_isn", ct.c_uint32),
        ("server_isn", ct.c_uint32),
        ("midstream", ct.c_uint8),
        ("directions", ct.c_uint8),
        ("banners", ct.c_uint8),
        ("nsizes", ct.c_uint8),
        ("handshake", ct.c_uint8),
        ("_pad", ct.c_uint8),
        ("server_sizes", ct.c_uint16 * SERVER_SIZES),
        ("_pad2", ct.c_uint8 * 6),
    ]


class Handshake(enum.IntEnum):
    """How far the TCP three-way handshake went (enum handshake): the contract's tcp.handshake."""

    NONE = 0
    SYN = 1
    SYN_ACK = 2
    COMPLETE = 3


HANDSHAKE_NAMES = {h.value: h.name.lower() for h in Handshake}  # 3 -> "complete"


DIR_TO_SERVER = 1
DIR_TO_CLIENT = 2


class EventType(enum.IntEnum):
    FLOW_START = 1
    FLOW_END_RST = 2
    BANNER = 3
    FLOW_ESTABLISHED = 4


class FlowEvent(ct.Structure):
    _fields_ = [
        ("val", FlowValue),
        ("key", FlowKey),
        ("type", ct.c_uint32),
    ]


BANNER_MAX = 88


class BannerEvent(ct.Structure):
    """The first bytes of one direction of a flow that start with "SSH-" (struct banner_event)."""

    _fields_ = [
        ("key", FlowKey),
        ("_pad1", ct.c_uint8 * 4),
        ("first_ns", ct.c_uint64),
        ("data", ct.c_uint8 * BANNER_MAX),
        ("len", ct.c_uint16),
        ("dir", ct.c_uint8),
        ("_pad", ct.c_uint8),
        ("_pad0", ct.c_uint8 * 8),
        ("type", ct.c_uint32),
    ]

    @property
    def banner(self) -> bytes:
        return bytes(self.data[: min(self.len, BANNER_MAX)])


TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")


_FLAG_LISTS = [tuple(name for bit, name in enumerate(TCP_FLAG_NAMES) if f & (1 << bit)) for f in range(256)]


def tcp_flag_names(flags: int) -> list[str]:
    """The TCP flags set in `flags` (the header's flags byte), in header bit order."""
    return list(_FLAG_LISTS[flags & 0xFF])


_TYPE_OFFSET = FlowEvent.type.offset  # the same in BannerEvent (checked in tests)
_RECORD_SIZE = ct.sizeof(FlowEvent)  # = ct.sizeof(BannerEvent)
_BANNER = int(EventType.BANNER)


def decode_event(data: int | bytes, size: int | None = None) -> FlowEvent | BannerEvent:
    """Copy one ring-buffer record (a pointer from bcc's callback, or bytes) into a
    FlowEvent or a BannerEvent, as its `type` says."""
    if isinstance(data, (bytes, bytearray)):
        size = len(data)
    elif size is None:
        size = _RECORD_SIZE
    if size < _RECORD_SIZE:
        raise ValueError(f"ring-buffer record of {size} bytes, expected {_RECORD_SIZE}")
    if isinstance(data, int):
        data = ct.string_at(data, _RECORD_SIZE)
    kind = int.from_bytes(data[_TYPE_OFFSET:_TYPE_OFFSET + 4], "little")
    return (BannerEvent if kind == _BANNER else FlowEvent).from_buffer_copy(data)
