"""Count the instructions xdpwatch's XDP program runs on one frame: a small interpreter of
its bytecode as compiled (before the verifier), for bench/xdp_ab.py.

Timing cannot tell a few instructions apart on this machine (the same program measured
twice in one run differs by up to ~15%); this count is exact. Not a general eBPF
interpreter: it knows the helpers xdpwatch calls and models their results simply (the
flow table holds at most the one flow given, other maps are empty, the ring buffer always
has room, clocks are constants). It also returns the memory the run leaves (counters,
ring-buffer record, flow value), so two programs can be shown to do the same on a frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

M64 = (1 << 64) - 1
# Where each region lives in the interpreter's address space (32-bit: XDP's ctx holds
# packet pointers as u32).
PKT, CTX, STACK, COUNTERS, FLOW, RING, MAP_FDS = (0x10000000, 0x20000000, 0x30000000, 0x40000000,
                                                   0x50000000, 0x60000000, 0x70000000)
SIZES = {STACK: 512, COUNTERS: 512, FLOW: 112, RING: 256}
FLOW_VALUE_SIZE = 112  # sizeof(struct flow_value), checked by tests/unit/test_records.py
LD_IMM64, PSEUDO_MAP_FD = 0x18, 1


@dataclass
class Run:
    insns: int                       # instructions run, a helper call counting as one
    helpers: list[int]               # helper ids called, in order
    verdict: int
    memory: dict[int, bytearray] = field(repr=False)
    has_flow: bool = False
    trace: list[int] = field(default_factory=list, repr=False)  # the index of each instruction run

    def state(self) -> tuple:
        """What the run left behind: verdict, counters, ring-buffer record, flow value, frame."""
        return (self.verdict, self.has_flow, *(bytes(self.memory[r]) for r in (COUNTERS, RING, FLOW, PKT)))


def _s(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


class _Machine:
    def __init__(self, frame: bytes, flow: bytes | None, maps: dict[int, str], counters: bytes | None = None):
        self.mem = {PKT: bytearray(frame), CTX: bytearray(struct.pack("<6I", PKT, PKT + len(frame), 0, 0, 0, 0))}
        self.mem.update({base: bytearray(n) for base, n in SIZES.items()})
        if flow is not None:
            self.mem[FLOW][:] = flow
        if counters is not None:
            self.mem[COUNTERS][:] = counters
        self.has_flow = flow is not None
        self.maps = maps

    def _at(self, addr: int, n: int) -> tuple[bytearray, int]:
        for base, buf in self.mem.items():
            if base <= addr and addr + n <= base + len(buf):
                return buf, addr - base
        raise ValueError(f"access outside every region: {addr:#x}+{n}")

    def load(self, addr: int, n: int) -> int:
        buf, o = self._at(addr, n)
        return int.from_bytes(buf[o:o + n], "little")

    def store(self, addr: int, n: int, v: int) -> None:
        buf, o = self._at(addr, n)
        buf[o:o + n] = (v & ((1 << 8 * n) - 1)).to_bytes(n, "little")

    def helper(self, h: int, r: list[int]) -> int:
        name = self.maps.get(r[1] - MAP_FDS)
        if h == 1:  # map_lookup_elem
            return {"counters": COUNTERS, "flows": FLOW if self.has_flow else 0}.get(name, 0)
        if h == 2:  # map_update_elem
            if name == "flows":
                buf, o = self._at(r[3], FLOW_VALUE_SIZE)
                self.mem[FLOW][:] = buf[o:o + FLOW_VALUE_SIZE]
                self.has_flow = True
            return 0
        if h in (5, 160):  # ktime_get_ns, ktime_get_coarse_ns
            return 1_000_000_000
        if h == 118:  # jiffies64
            return 1
        if h == 131:  # ringbuf_reserve
            return RING
        if h in (132, 133):  # ringbuf_submit, ringbuf_discard
            return 0
        if h == 189:  # xdp_load_bytes(ctx, offset, to, len)
            data = self.mem[PKT][r[2]:r[2] + r[4]]
            if len(data) < r[4]:
                return -14 & M64
            buf, o = self._at(r[3], r[4])
            buf[o:o + r[4]] = data
            return 0
        raise ValueError(f"helper {h} is not modelled")


def _alu(op: int, a: int, b: int, imm: int, bits: int) -> int:
    sh = b & (bits - 1)
    kind = op & 0xf0
    if kind == 0xd0:  # byte swap: to big endian swaps on this little-endian machine
        v = a & ((1 << imm) - 1)
        return int.from_bytes(v.to_bytes(imm // 8, "little"), "big") if op & 8 else v
    return {0x00: lambda: a + b, 0x10: lambda: a - b, 0x20: lambda: a * b, 0x30: lambda: a // b if b else 0,
            0x40: lambda: a | b, 0x50: lambda: a & b, 0x60: lambda: a << sh, 0x70: lambda: a >> sh,
            0x80: lambda: -a, 0x90: lambda: a % b if b else a, 0xa0: lambda: a ^ b, 0xb0: lambda: b,
            0xc0: lambda: _s(a, bits) >> sh}[kind]() & ((1 << bits) - 1)


def _taken(op: int, a: int, b: int, bits: int) -> bool:
    sa, sb = _s(a, bits), _s(b, bits)
    return {0x00: True, 0x10: a == b, 0x20: a > b, 0x30: a >= b, 0x40: bool(a & b), 0x50: a != b,
            0x60: sa > sb, 0x70: sa >= sb, 0xa0: a < b, 0xb0: a <= b, 0xc0: sa < sb, 0xd0: sa <= sb}[op & 0xf0]


def run(code: bytes, maps: dict[int, str], frame: bytes, flow: bytes | None = None,
        counters: bytes | None = None) -> Run:
    """Run the program (`code`: bcc's dump_func) on `frame`. `maps`: map fd -> name for
    counters, flows and events; `flow`: the flow table's one entry, if any; `counters`: this
    CPU's counters element as a run before left it (default: zeroed)."""
    m = _Machine(frame, flow, maps, counters)
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    r = [0] * 11
    r[1], r[10] = CTX, STACK + SIZES[STACK]
    pc = n = 0
    helpers: list[int] = []
    trace: list[int] = []
    while True:
        trace.append(pc)
        op, regs, off, imm = insns[pc]
        dst, src, cls = regs & 15, regs >> 4, op & 7
        n += 1
        pc += 1
        if op == LD_IMM64:
            r[dst] = MAP_FDS + imm if src == PSEUDO_MAP_FD else (insns[pc][3] << 32 | imm & 0xffffffff) & M64
            pc += 1
        elif op & 0xf7 == 0xd4:  # byte swap (ALU class, whatever its width)
            r[dst] = _alu(op, r[dst], 0, imm, 64)
        elif cls in (4, 7):  # ALU (32-bit), ALU64
            bits = 32 if cls == 4 else 64
            mask = (1 << bits) - 1
            r[dst] = _alu(op, r[dst] & mask, (r[src] if op & 8 else imm) & mask, imm, bits)
        elif cls in (5, 6) and op & 0xf0 == 0x80:  # call
            helpers.append(imm)
            r[0] = m.helper(imm, r)
        elif cls in (5, 6) and op & 0xf0 == 0x90:  # exit
            return Run(n, helpers, r[0], m.mem, m.has_flow, trace)
        elif cls in (5, 6):  # JMP, JMP32
            bits = 32 if cls == 6 else 64
            mask = (1 << bits) - 1
            if _taken(op, r[dst] & mask, (r[src] if op & 8 else imm) & mask, bits):
                pc += off
        else:
            size = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[op & 0x18]
            if cls == 1:  # LDX
                r[dst] = m.load(r[src] + off, size)
            elif cls == 2:  # ST
                m.store(r[dst] + off, size, imm)
            elif op & 0xe0 == 0x60:  # STX
                m.store(r[dst] + off, size, r[src])
            elif op & 0xe0 == 0xc0 and imm in (0x00, 0x01):  # atomic add, with fetch if imm is 1
                old = m.load(r[dst] + off, size)
                m.store(r[dst] + off, size, old + r[src])
                if imm:
                    r[src] = old
            else:
                raise ValueError(f"instruction {op:#x} is not modelled")


def steady(code: bytes, maps: dict[int, str], frame: bytes, opening: bytes | None = None) -> Run:
    """The run of `frame` as a timed loop of it sees it after its first repetition: the flow
    `opening` opened (if given) and `frame` updated once, with this CPU's counters element
    (its cached clock) as that left it. A one-time step (the first payload's banner check, a
    clock read per tick) is then not counted as every packet's."""
    flow = counters = None
    for f in ((opening,) if opening else ()) + (frame,):
        r = run(code, maps, f, flow, counters)
        flow = bytes(r.memory[FLOW]) if r.has_flow else None
        counters = bytes(r.memory[COUNTERS])
    return run(code, maps, frame, flow, counters)
