"""The XDP program of a git revision against the working tree's, side by side in one process,
for changes to bpf/: does the per-packet cost move?

For each of bench/run.py's frames: ns per packet (BPF_PROG_TEST_RUN, as run.py's xdp_cost
measures it), runs alternating between the two programs so that the machine's drift hits
both alike, median and minimum of the rounds; and the instructions each program runs on
that frame (bench/bpf_interp.py: exact, where timing cannot tell a few instructions apart),
with whether both leave the same counters, ring-buffer record and flow value. Never asserts
on speed.

    sudo .venv/bin/python bench/xdp_ab.py [REV]   # REV defaults to main
    sudo .venv/bin/python bench/xdp_ab.py --quick # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

from bcc import BPF

import bpf_interp
from run import BARE_SOURCE, test_program, SYN, XDP_PACKETS, ring_pages, run_ns, tcp_frame, udp_frame
from xdpwatch.producer import libbpf
from xdpwatch.producer.loader import BpfConfig, XdpProgram, render_source

ROOT = Path(__file__).resolve().parent.parent
OPENING_SYN = tcp_frame(1, 40000, 22, SYN)  # opens the flow of XDP_PACKETS' "existing flow" ACK


def bpf_dir_at(rev: str, into: Path) -> Path:
    """bpf/ as committed at `rev`, extracted under `into`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "bpf"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    return into / "bpf"


def load_at(bpf_dir: Path, cfg: BpfConfig) -> BPF:
    """The program of `bpf_dir` compiled with `cfg`'s settings, as the loader compiles ours
    (for a single-file revision, the same instructions as compiling the file with -I)."""
    return BPF(text=render_source(cfg, bpf_dir).encode(), cflags=cfg.cflags())


class Side:
    """One loaded program: its XDP fd, its code for the interpreter, events drained."""

    def __init__(self, b: BPF):
        self.bpf = b
        b[b"events"].open_ring_buffer(lambda *_: 0)
        self.fd = b.load_func(b"xdpwatch", BPF.XDP).fd
        self.code = b.dump_func(b"xdpwatch")
        self.maps = {b[name].map_fd: name.decode() for name in (b"counters", b"flows", b"events")}
        libbpf.prog_test_run(self.fd, OPENING_SYN)

    def insns(self) -> bytes:
        """The instructions with map fds (a ld_imm64 from a map fd) zeroed: two loads of one
        source differ only there."""
        code = bytearray(self.code)
        for i in range(0, len(code), 8):
            if code[i] == bpf_interp.LD_IMM64 and code[i + 1] >> 4 == bpf_interp.PSEUDO_MAP_FD:
                code[i + 4:i + 8] = bytes(4)
        return bytes(code)

    def interpret(self, name: str, frame: bytes) -> bpf_interp.Run:
        if "new flow" in name:  # SYN+RST: every repetition creates the flow anew
            return bpf_interp.run(self.code, self.maps, frame)
        return bpf_interp.steady(self.code, self.maps, frame, OPENING_SYN if "existing flow" in name else None)

    def ns(self, name: str, frame: bytes, repeat: int, batch: int) -> float:
        if "new flow" in name:  # SYN+RST re-creates the flow each run, two events: drain per batch
            ns = libbpf.prog_test_run(self.fd, frame, batch)[1]
            self.bpf.ring_buffer_consume()
            return float(ns)
        return run_ns(self.fd, frame, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", default="main")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=41)
    args = ap.parse_args()
    repeat, rounds, batch = (10_000, 3, 5_000) if args.quick else (1_000_000, args.rounds, 50_000)
    cfg = BpfConfig(ssh_ports=(22,), flow_table_size=65536, ringbuf_pages=ring_pages(2 * batch))

    with tempfile.TemporaryDirectory(prefix="xw-ab-") as tmp:
        sides = (Side(load_at(bpf_dir_at(args.rev, Path(tmp)), cfg)), Side(test_program(cfg).bpf))
    bare = BPF(text=BARE_SOURCE)
    bare_fd = bare.load_func(b"bare", BPF.XDP).fd
    a, z = (s.insns() for s in sides)
    print(f"{'':36} {'ns: ' + args.rev:>10} {'tree':>7} {'change':>7}  {'min':>11}  {'insns run':>10}  effect")
    print(f"{'program size (instructions)':36} {len(a) // 8:>10} {len(z) // 8:>7} {'':7}  {'':11}  {'':10}  "
          f"{'same code' if a == z else 'code differs'}")
    bare_ns = statistics.median(run_ns(bare_fd, udp_frame(), repeat) for _ in range(rounds))
    print(f"{'bare XDP_PASS':36} {bare_ns:>10.1f}")
    for name, frame in XDP_PACKETS.items():
        ns: tuple[list[float], list[float]] = ([], [])
        for i in range(rounds):
            for side in (0, 1) if i % 2 else (1, 0):
                ns[side].append(sides[side].ns(name, frame, repeat, batch))
        med = [statistics.median(x) for x in ns]
        runs = [s.interpret(name, frame) for s in sides]
        same = runs[0].state() == runs[1].state() and runs[0].helpers == runs[1].helpers
        print(f"{name:36} {med[0]:>10.1f} {med[1]:>7.1f} {(med[1] - med[0]) / med[0]:>+7.1%}  "
              f"{min(ns[0]):>5.1f} {min(ns[1]):>5.1f}  {runs[0].insns:>4} {runs[1].insns:>5}  "
              f"{'same' if same else 'DIFFERS'}")
    for b in (*(s.bpf for s in sides), bare):
        b.cleanup()


if __name__ == "__main__":
    main()
