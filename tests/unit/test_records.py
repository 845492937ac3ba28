"""The ctypes mirror in producer/records.py matches bpf/xdpwatch.h as the C compiler lays it
out: a tiny C program includes the header and prints sizeof/offsetof of every field and the
enum values as JSON. No root, no bcc: only `cc` (gcc) and the kernel UAPI headers."""

from __future__ import annotations

import ctypes as ct
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from xdpwatch.producer import records as r

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
HEADER = (BPF_DIR / "xdpwatch.h").read_text()
STRUCTS = {"counter": r.Counter, "flow_key": r.FlowKey, "flow_value": r.FlowValue, "flow_event": r.FlowEvent,
           "banner_event": r.BannerEvent, "ifslot": r.IfSlot}


def c_fields(name: str) -> list[str]:
    """Field names of `struct name` in declaration order, read from the header text."""
    body = re.search(r"struct %s \{(.*?)\n\};" % name, HEADER, re.S)
    assert body, f"struct {name} not found in xdpwatch.h"
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    return [m.group(1) for m in re.finditer(r"(\w+)\s*(?:\[\s*\w+\s*\])?\s*;", text)]


def c_enumerators(name: str) -> list[str]:
    body = re.search(r"enum %s \{(.*?)\};" % name, HEADER, re.S)
    assert body, f"enum {name} not found in xdpwatch.h"
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    return re.findall(r"\b([A-Z][A-Z0-9_]*)\b\s*(?:=\s*\d+\s*)?,", text)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict:
    cc = shutil.which("cc")
    assert cc, "no C compiler `cc` on PATH (gcc is part of `make setup`)"
    fmt: list[str] = []  # printf format pieces, one per JSON member
    args: list[str] = []
    for s in STRUCTS:
        fields = c_fields(s)
        fmt.append(f'\\"{s}\\": {{\\"size\\": %zu, \\"fields\\": {{'
                   + ", ".join(f'\\"{f}\\": [%zu, %zu]' for f in fields) + "}}")
        args.append(f"sizeof(struct {s})")
        for f in fields:
            args += [f"offsetof(struct {s}, {f})", f"sizeof(((struct {s} *)0)->{f})"]
    for e in (c_enumerators("counter_id") + c_enumerators("flow_event_type") + c_enumerators("handshake")
              + ["DIR_TO_SERVER", "DIR_TO_CLIENT"]):
        fmt.append(f'\\"{e}\\": %d')
        args.append(f"(int){e}")
    src = ("#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n#include \"xdpwatch.h\"\n"
           f'int main(void) {{ printf("{{{", ".join(fmt)}}}\\n", {", ".join(args)}); return 0; }}\n')
    d = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text(src)
    build = subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-I", str(BPF_DIR), "-o", str(d / "layout"),
                            str(d / "layout.c")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr + src
    run = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True)
    return json.loads(run.stdout)


def test_header_parsing_found_every_struct_and_counter():
    # Guards the regexes above: a parse that found nothing would make every check vacuous.
    assert c_fields("flow_key") == ["client_addr", "server_addr", "client_port", "server_port", "family",
                                    "proto", "_pad", "ifindex"]
    assert len(c_enumerators("counter_id")) == 18  # 17 counters + NR_COUNTERS


@pytest.mark.parametrize("cname", STRUCTS)
def test_struct_layout_matches_c(c_layout, cname):
    py = STRUCTS[cname]
    c = c_layout[cname]
    assert [f for f, *_ in py._fields_] == list(c["fields"]), "same fields, same order"
    assert ct.sizeof(py) == c["size"]
    for field, (offset, size) in c["fields"].items():
        assert (getattr(py, field).offset, getattr(py, field).size) == (offset, size), field


def test_sizes_the_ring_buffer_reader_relies_on(c_layout):
    assert c_layout["flow_event"]["size"] == ct.sizeof(r.FlowEvent) == 160
    assert c_layout["banner_event"]["size"] == ct.sizeof(r.BannerEvent) == 160
    assert r.BannerEvent.type.offset == r.FlowEvent.type.offset == 156
    assert c_layout["flow_key"]["size"] == 44 and c_layout["flow_value"]["size"] == 112
    assert c_layout["counter"]["size"] == 16


def test_counter_ids_match_c(c_layout):
    c_names = [e for e in c_enumerators("counter_id") if e != "NR_COUNTERS"]
    assert [f"C_{cid.name}" for cid in r.CounterId] == c_names
    for cid in r.CounterId:
        assert c_layout[f"C_{cid.name}"] == cid.value
    assert c_layout["NR_COUNTERS"] == r.NR_COUNTERS == len(r.CounterId) == 17


def test_event_types_and_directions_match_c(c_layout):
    assert {e.name: e.value for e in r.EventType} == {"FLOW_START": c_layout["EV_FLOW_START"],
                                                       "FLOW_END_RST": c_layout["EV_FLOW_END_RST"],
                                                       "BANNER": c_layout["EV_BANNER"],
                                                       "FLOW_ESTABLISHED": c_layout["EV_FLOW_ESTABLISHED"]}
    assert {f"HS_{h.name}": h.value for h in r.Handshake} == {e: c_layout[e] for e in c_enumerators("handshake")}
    assert (c_layout["DIR_TO_SERVER"], c_layout["DIR_TO_CLIENT"]) == (r.DIR_TO_SERVER, r.DIR_TO_CLIENT) == (1, 2)


# struct flow_event packed by hand from the C declaration order, independent of ctypes:
# flow_value (8 x u64, u32 tcp_flags, u32 client_isn, u32 server_isn, u8 midstream, directions,
# banners, nsizes, handshake, 1 pad, 12 x u16 server_sizes, 6 pad),
# flow_key (16 + 16 addr bytes, u16 client_port, u16 server_port, u8 family, u8 proto, 2 pad,
# u32 ifindex), u32 type. Little endian (x86-64 and arm64 hosts).
EVENT = struct.Struct("<8QIIIBBBBBx12H6x16s16sHHBB2xII")


def packed_event(**kw) -> bytes:
    v = dict(first_ns=1_000, last_ns=2_000, fin_ns=1_500, rst_ns=1_900, packets=7, bytes=1234,
             to_client_packets=3, to_client_bytes=600, tcp_flags=0x17, client_isn=7, server_isn=0xFFFFFFFF,
             midstream=1, directions=3, banners=1, nsizes=2, handshake=3, sizes=[41, 1088] + [0] * 10,
             client=bytes([192, 0, 2, 7]) + bytes(12),
             server=bytes([192, 0, 2, 1]) + bytes(12), client_port=40000, server_port=22, family=4, proto=6,
             ifindex=7, type=2)
    v.update(kw)
    return EVENT.pack(v["first_ns"], v["last_ns"], v["fin_ns"], v["rst_ns"], v["packets"], v["bytes"],
                      v["to_client_packets"], v["to_client_bytes"],
                      v["tcp_flags"], v["client_isn"], v["server_isn"], v["midstream"], v["directions"],
                      v["banners"], v["nsizes"], v["handshake"], *v["sizes"],
                      v["client"], v["server"],
                      v["client_port"], v["server_port"], v["family"], v["proto"], v["ifindex"], v["type"])


def test_decode_event_from_bytes():
    assert EVENT.size == 160
    ev = r.decode_event(packed_event())
    assert isinstance(ev, r.FlowEvent)
    assert ev.type == r.EventType.FLOW_END_RST and ev.key.ifindex == 7
    v = ev.val
    assert (v.first_ns, v.last_ns, v.fin_ns, v.rst_ns, v.packets, v.bytes) == (1_000, 2_000, 1_500, 1_900, 7, 1234)
    assert (v.to_client_packets, v.to_client_bytes) == (3, 600)
    assert (v.tcp_flags, v.midstream, v.directions) == (0x17, 1, r.DIR_TO_SERVER | r.DIR_TO_CLIENT)
    assert (v.client_isn, v.server_isn, v.handshake) == (7, 0xFFFFFFFF, r.Handshake.COMPLETE)
    assert list(v.server_sizes[:v.nsizes]) == [41, 1088]
    k = ev.key
    assert (k.client_ip, k.client_port, k.server_ip, k.server_port, k.family, k.proto) == \
        ("192.0.2.7", 40000, "192.0.2.1", 22, 4, 6)
    assert bytes(ev) == packed_event()  # and back, byte for byte


def test_decode_event_ipv6_addresses():
    c6, s6 = bytes.fromhex("20010db8000000000000000000000007"), bytes.fromhex("20010db8000000000000000000000001")
    ev = r.decode_event(packed_event(client=c6, server=s6, family=6, type=1))
    assert (ev.key.client_ip, ev.key.server_ip, ev.type) == ("2001:db8::7", "2001:db8::1", r.EventType.FLOW_START)
    assert bytes(ev.key.client_addr) == c6


def test_decode_event_copies_and_ignores_trailing_bytes():
    raw = bytearray(packed_event() + b"\xff" * 8)  # a record with slack at its end
    ev = r.decode_event(raw)
    raw[32:40] = bytes(8)  # the caller's buffer is reused: the event must be a copy
    assert ev.val.packets == 7 and bytes(ev) == packed_event()


def test_decode_event_from_a_pointer():
    # bcc's ring-buffer callback hands (pointer, size)
    buf = ct.create_string_buffer(packed_event(), 160)
    ev = r.decode_event(ct.addressof(buf), 160)
    assert bytes(ev) == packed_event()
    assert bytes(r.decode_event(ct.addressof(buf))) == packed_event()  # size defaults to the struct's


@pytest.mark.parametrize("n", [0, 1, 56, 159])
def test_decode_event_refuses_short_records(n):
    with pytest.raises(ValueError, match=f"record of {n} bytes, expected 160"):
        r.decode_event(packed_event()[:n])


@pytest.mark.parametrize("flags, names", [
    (0x00, []),
    (0x02, ["SYN"]),
    (0x12, ["SYN", "ACK"]),
    (0x11, ["FIN", "ACK"]),
    (0x04, ["RST"]),
    (0x18, ["PSH", "ACK"]),
    (0xC2, ["SYN", "ECE", "CWR"]),
    (0xFF, ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"]),
    (0x100, []),  # beyond the flags byte
    (0x1_12, ["SYN", "ACK"]),
])
def test_tcp_flag_names(flags, names):
    assert r.tcp_flag_names(flags) == names


def test_banner_event_shares_the_type_offset(c_layout):
    assert c_layout["banner_event"]["size"] == ct.sizeof(r.BannerEvent) == ct.sizeof(r.FlowEvent) == 160
    assert r.BannerEvent.type.offset == r.FlowEvent.type.offset == 156
    raw = bytearray(160)
    raw[156:160] = (3).to_bytes(4, "little")
    raw[0:4] = bytes([192, 0, 2, 7])
    raw[56:60] = b"SSH-"
    raw[144:146] = (4).to_bytes(2, "little")
    ev = r.decode_event(bytes(raw))
    assert isinstance(ev, r.BannerEvent) and ev.banner == b"SSH-"
