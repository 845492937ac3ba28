"""The ctypes mirror in producer/records.py matches bpf/xdpwatch.h as the C compiler lays it out."""

from __future__ import annotations

import ctypes as ct
import json
import subprocess
from pathlib import Path

import pytest

from xdpwatch.producer import records as r

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
STRUCTS = {"counter": r.Counter, "flow_key": r.FlowKey, "flow_value": r.FlowValue, "flow_event": r.FlowEvent}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """sizeof/offsetof of every field, and the enum values, printed by a C program."""
    lines = []
    for cname, py in STRUCTS.items():
        lines.append(f'printf("\\"{cname}\\": {{\\"size\\": %zu", sizeof(struct {cname}));')
        for field, *_ in py._fields_:
            lines.append(f'printf(", \\"{field}\\": %zu", offsetof(struct {cname}, {field}));')
        lines.append('printf("}, ");')
    for cid in r.CounterId:
        lines.append(f'printf("\\"C_{cid.name}\\": %d, ", (int)C_{cid.name});')
    lines.append('printf("\\"NR_COUNTERS\\": %d, \\"EV_FLOW_START\\": %d, \\"EV_FLOW_END_RST\\": %d, '
                 '\\"DIR_TO_SERVER\\": %d, \\"DIR_TO_CLIENT\\": %d", NR_COUNTERS, EV_FLOW_START, '
                 'EV_FLOW_END_RST, DIR_TO_SERVER, DIR_TO_CLIENT);')
    src = ("#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n#include \"xdpwatch.h\"\n"
           "int main(void) { printf(\"{\"); " + "\n".join(lines) + ' printf("}\\n"); return 0; }\n')
    d = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text(src)
    subprocess.run(["cc", "-I", str(BPF_DIR), "-o", str(d / "layout"), str(d / "layout.c")], check=True)
    return json.loads(subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout)


@pytest.mark.parametrize("cname", STRUCTS)
def test_struct_layout_matches_c(c_layout, cname):
    py = STRUCTS[cname]
    assert ct.sizeof(py) == c_layout[cname]["size"]
    for field, *_ in py._fields_:
        assert getattr(py, field).offset == c_layout[cname][field], field


def test_enums_match_c(c_layout):
    for cid in r.CounterId:
        assert c_layout[f"C_{cid.name}"] == cid.value
    assert c_layout["NR_COUNTERS"] == r.NR_COUNTERS
    assert (c_layout["EV_FLOW_START"], c_layout["EV_FLOW_END_RST"]) == (r.EventType.FLOW_START, r.EventType.FLOW_END_RST)
    assert (c_layout["DIR_TO_SERVER"], c_layout["DIR_TO_CLIENT"]) == (r.DIR_TO_SERVER, r.DIR_TO_CLIENT)


def test_decode_event_from_bytes():
    ev = r.FlowEvent(type=r.EventType.FLOW_START)
    ev.key.client_port, ev.key.family = 40000, 4
    ev.key.client_addr[:4] = [192, 0, 2, 7]
    ev.val.packets = 3
    back = r.decode_event(bytes(ev))
    assert (back.type, back.key.client_port, back.key.client_ip, back.val.packets) == (1, 40000, "192.0.2.7", 3)
    with pytest.raises(ValueError, match="expected 104"):
        r.decode_event(b"\0" * 10)
