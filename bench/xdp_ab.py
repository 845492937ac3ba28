"""The XDP program of a git revision against the working tree's, side by side in one process:
ns per packet (BPF_PROG_TEST_RUN, as bench/run.py's xdp_cost measures it) for the same
frames, runs alternating between the two programs so that the machine's drift hits both
alike; medians of the rounds. Also each program's instruction count before verification.
For changes to bpf/: show that the per-packet cost did not move. Never asserts on speed.

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

from run import BARE_SOURCE, SYN, XDP_PACKETS, ring_pages, run_ns, tcp_frame, udp_frame
from xdpwatch.producer import libbpf
from xdpwatch.producer.loader import BpfConfig, XdpProgram

ROOT = Path(__file__).resolve().parent.parent


def bpf_dir_at(rev: str, into: Path) -> Path:
    """bpf/ as committed at `rev`, extracted under `into`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "bpf"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    return into / "bpf"


def load_at(bpf_dir: Path, cfg: BpfConfig) -> BPF:
    """The program of `bpf_dir` compiled with `cfg`'s settings, as main's loader does it."""
    flags = [f for f in cfg.cflags() if not f.startswith("-I")] + [f"-I{bpf_dir}"]
    return BPF(src_file=str(bpf_dir / "xdpwatch.bpf.c").encode(), cflags=flags)


def ready(b: BPF) -> tuple[BPF, int]:
    """The XDP program's fd, its events drained by ring_buffer_consume, one flow open."""
    b[b"events"].open_ring_buffer(lambda *_: 0)
    fd = b.load_func(b"xdpwatch", BPF.XDP).fd
    run_ns(fd, tcp_frame(1, 40000, 22, SYN), 10)  # the flow that the ACKs below belong to
    return b, fd


def code(b: BPF) -> bytes:
    """The program's instructions with map fds (a ld_imm64 from a map fd) zeroed: two
    loads of one source differ only there."""
    insns = bytearray(b.dump_func(b"xdpwatch"))
    for i in range(0, len(insns), 8):
        if insns[i] == 0x18 and insns[i + 1] >> 4 == 1:  # BPF_LD|BPF_IMM|BPF_DW, src BPF_PSEUDO_MAP_FD
            insns[i + 4:i + 8] = bytes(4)
    return bytes(insns)


def new_flow_ns(b: BPF, fd: int, pkt: bytes, batch: int) -> float:
    """SYN+RST re-creates the flow on every run and emits two events: drain after each batch."""
    ns = libbpf.prog_test_run(fd, pkt, batch)[1]
    b.ring_buffer_consume()
    return float(ns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", default="main")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    repeat, rounds, batch = (10_000, 3, 5_000) if args.quick else (1_000_000, args.rounds, 50_000)
    cfg = BpfConfig(ssh_ports=(22,), flow_table_size=65536, ringbuf_pages=ring_pages(2 * batch))

    with tempfile.TemporaryDirectory(prefix="xw-ab-") as tmp:
        before = ready(load_at(bpf_dir_at(args.rev, Path(tmp)), cfg))
        after = ready(XdpProgram(cfg).bpf)  # the working tree's, through the loader
        bare = BPF(text=BARE_SOURCE)
        bare_fd = bare.load_func(b"bare", BPF.XDP).fd
        print(f"{'':38} {args.rev + ' (ns)':>12} {'tree (ns)':>12} {'change':>8}")
        insns = [code(b) for b, _ in (before, after)]
        print(f"{'instructions':38} {len(insns[0]) // 8:>12} {len(insns[1]) // 8:>12} "
              f"{'same' if insns[0] == insns[1] else 'differ':>8}")
        bare_ns = statistics.median(run_ns(bare_fd, udp_frame(), repeat) for _ in range(rounds))
        print(f"{'bare XDP_PASS':38} {bare_ns:>12.1f}")
        for name, pkt in XDP_PACKETS.items():
            ns: tuple[list[float], list[float]] = ([], [])
            for i in range(rounds):
                for side in (0, 1) if i % 2 else (1, 0):
                    b, fd = (before, after)[side]
                    ns[side].append(new_flow_ns(b, fd, pkt, batch) if "new flow" in name else run_ns(fd, pkt, repeat))
            a, z = statistics.median(ns[0]), statistics.median(ns[1])
            print(f"{name:38} {a:>12.1f} {z:>12.1f} {(z - a) / a:>+8.1%}")
        for b in (before[0], after[0], bare):
            b.cleanup()


if __name__ == "__main__":
    main()
