"""Compile, load and attach the XDP program; expose its maps.

The C source lives in bpf/. Settings reach it as -D cflags (defaults in bpf/config.h).
Attachment is a BPF link: the kernel detaches it when our process exits, however it
exits, so a crash never leaves a program behind. A program attached the old (netlink) way
is left alone unless it is a stale xdpwatch program, which is replaced.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from xdpwatch.producer import libbpf
from xdpwatch.producer.errors import AttachError, BpfError, ConfigError, InterfaceError, PrivilegeError
from xdpwatch.producer.records import NR_COUNTERS, FlowEvent, FlowKey, FlowValue, decode_event

log = logging.getLogger(__name__)

# bpf/ is next to producer/ in the repository and, installed, in the xdpwatch package
# (pyproject's package-dir keeps the layout): one place to look in both.
BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
SOURCE = BPF_DIR / "xdpwatch.bpf.c"
PROG_NAME = "xdpwatch"  # the kernel's name for our program: how a stale one is recognised
EGRESS_PROG_NAME = "xdpwatch_egress"  # the TC program for the other direction of SSH flows

XDP_MODES = {
    "native": [libbpf.XDP_FLAGS_DRV_MODE],
    "generic": [libbpf.XDP_FLAGS_SKB_MODE],
    "auto": [libbpf.XDP_FLAGS_DRV_MODE, libbpf.XDP_FLAGS_SKB_MODE],
}
MODE_NAMES = {libbpf.XDP_FLAGS_DRV_MODE: "native", libbpf.XDP_FLAGS_SKB_MODE: "generic"}

PERMISSION_HINT = "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"

# Capabilities the producer needs: load BPF (CAP_BPF, or CAP_SYS_ADMIN before 5.8), read
# maps bcc creates with pointers (CAP_PERFMON), attach XDP (CAP_NET_ADMIN).
_CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def missing_capabilities(status_path: str = "/proc/self/status") -> list[str]:
    """The needed capabilities this process lacks (CAP_SYS_ADMIN stands in for BPF+PERFMON)."""
    try:
        with open(status_path) as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return []  # cannot tell: let the kernel decide
    has = {name for name, bit in _CAP_BITS.items() if eff >> bit & 1}
    missing = [] if "CAP_NET_ADMIN" in has else ["CAP_NET_ADMIN"]
    if "CAP_SYS_ADMIN" not in has:
        missing += [c for c in ("CAP_BPF", "CAP_PERFMON") if c not in has]
    return missing


ENFORCE_MODES = {"off": 0, "dry_run": 1, "enforce": 2}  # bpf/config.h ENFORCE_MODE


@dataclass(frozen=True)
class BpfConfig:
    ssh_ports: tuple[int, ...] = (22,)
    flow_table_size: int = 65536
    ringbuf_pages: int = 64
    enforce_mode: str = "off"  # off | dry_run | enforce
    syn_rate: int = 0          # SSH SYNs per second per source; 0: no limit
    syn_burst: int = 1

    def validate(self) -> None:
        if not self.ssh_ports:
            raise ConfigError("at least one --ssh-port is needed")
        for p in self.ssh_ports:
            if not 1 <= p <= 65535:
                raise ConfigError(f"--ssh-port {p} is not a TCP port (1-65535)")
        if not 16 <= self.flow_table_size <= 1 << 24:
            raise ConfigError("--flow-table-size must be between 16 and 16777216")
        n = self.ringbuf_pages
        if n < 1 or n & (n - 1):
            raise ConfigError(f"--ringbuf-pages must be a power of two, got {n}")
        if self.enforce_mode not in ENFORCE_MODES:
            raise ConfigError(f"enforcement mode must be one of {', '.join(ENFORCE_MODES)}, got {self.enforce_mode!r}")
        if self.syn_rate and self.enforce_mode == "off":
            raise ConfigError("--syn-rate-limit needs --enforce (drop) or --dry-run (count only)")
        if not 0 <= self.syn_rate <= 1_000_000 or not 1 <= self.syn_burst <= 1_000_000:
            raise ConfigError("--syn-rate-limit must be 0-1000000 per second and --syn-burst 1-1000000")

    def cflags(self) -> list[str]:
        return [
            f"-DFLOW_TABLE_SIZE={self.flow_table_size}",
            f"-DRINGBUF_PAGES={self.ringbuf_pages}",
            "-DIS_SSH_PORT(p)=(" + "||".join(f"(p)=={port}" for port in sorted(set(self.ssh_ports))) + ")",
            f"-DENFORCE_MODE={ENFORCE_MODES[self.enforce_mode]}",
            f"-DSYN_RATE={self.syn_rate}",
            f"-DSYN_BURST={self.syn_burst}",
        ]


_LOCAL_INCLUDE = re.compile(r'\s*#\s*include\s+"([^"]+)"')


def render_source(cfg: BpfConfig, bpf_dir: Path = BPF_DIR) -> str:
    """The program as it is compiled: cflags, then the source with our `#include "…"` files
    inlined, recursively, each once (as their include guards would have it). `bpf_dir`: where
    the sources are (another copy of bpf/, for benchmarks that compare two versions).

    The loader compiles this text, not the file: bcc rewrites map calls (`flows.lookup(…)`)
    only in the file it is given, so a header that uses a map must be part of it. `#line`
    markers keep the compiler's messages pointing at the real file and line."""
    seen: set[Path] = set()

    def inline(path: Path) -> list[str]:
        out = [f'#line 1 "{path}"']
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = _LOCAL_INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            header = bpf_dir / m[1]
            if header not in seen:
                seen.add(header)
                out += inline(header)
            out.append(f'#line {n + 1} "{path}"')
        return out

    return "\n".join([f"/* cflags: {' '.join(cfg.cflags())} */", *inline(bpf_dir / SOURCE.name)]) + "\n"


class XdpProgram:
    """The compiled and loaded program with its maps. Not yet attached anywhere."""

    def __init__(self, cfg: BpfConfig):
        cfg.validate()
        self.cfg = cfg
        missing = missing_capabilities()
        if missing:
            raise PrivilegeError(f"not allowed to load and attach XDP programs: missing {', '.join(missing)}; "
                                 f"{PERMISSION_HINT}")
        try:
            from bcc import BPF  # imported late: the Debian package may be missing
        except ImportError as e:
            raise BpfError(f"the bcc Python module is not importable ({e}); run `make setup` "
                           "and use the .venv it creates") from None
        self._BPF = BPF
        try:
            self.bpf = BPF(text=render_source(cfg).encode(), cflags=cfg.cflags())
            self.fd = self.bpf.load_func(PROG_NAME.encode(), BPF.XDP).fd
            self.egress_fd = self.bpf.load_func(EGRESS_PROG_NAME.encode(), BPF.SCHED_CLS).fd
        except Exception as e:  # bcc raises bare Exception for every failure
            msg = str(e)
            if "Operation not permitted" in msg or "Permission denied" in msg:
                raise PrivilegeError(f"not allowed to load BPF programs: {PERMISSION_HINT}") from None
            if "kernel headers" in msg or "Failed to compile" in msg:
                raise BpfError(f"compiling the XDP program failed ({msg.strip()}); "
                               "run `make setup` to install bcc and kernel headers") from None
            raise BpfError(f"loading the XDP program failed: {msg.strip()}") from None
        self._counters = self.bpf[b"counters"]
        self._flows_fd = self.bpf[b"flows"].map_fd
        self._callback_error: BaseException | None = None

    # ---- counters ----
    def read_counters(self) -> list[tuple[int, int]]:
        """Cumulative (packets, bytes) per counter id, summed over CPUs."""
        # One element (struct counters) per CPU, holding every counter: one map read.
        per_cpu = self._counters.getvalue(self._counters.Key(0))
        return [(sum(cpu.c[i].packets for cpu in per_cpu), sum(cpu.c[i].bytes for cpu in per_cpu))
                for i in range(NR_COUNTERS)]

    # ---- flow table ----
    def flow_entries(self) -> Iterator[tuple[FlowKey, FlowValue]]:
        return libbpf.map_lookup_batch(self._flows_fd, FlowKey, FlowValue)

    def flow_records(self) -> Iterator[tuple[bytes, bytes]]:
        """The flow table as raw (key, value) bytes: what the tracker's sweep reads."""
        return libbpf.map_lookup_batch_raw(self._flows_fd, ct.sizeof(FlowKey), ct.sizeof(FlowValue))

    def pop_flow(self, key: FlowKey) -> FlowValue | None:
        val = FlowValue()
        return val if libbpf.map_lookup_and_delete(self._flows_fd, key, val) else None

    def delete_flow(self, key: FlowKey) -> None:
        libbpf.map_delete(self._flows_fd, key)

    # ---- ring buffer ----
    def open_events(self, handler: Callable[[FlowEvent], None]) -> None:
        """Deliver each ring-buffer record to `handler` during poll_events()."""

        def on_record(_ctx, data, size):
            try:
                handler(decode_event(data, size))
                return 0
            except BaseException as e:  # ctypes would swallow it: keep it for poll_events
                self._callback_error = e
                return -1

        self.bpf[b"events"].open_ring_buffer(on_record)

    def poll_events(self, timeout_ms: int) -> None:
        """Wait up to `timeout_ms` for records and hand them all to the handler (0: no wait)."""
        if timeout_ms == 0:
            self.bpf.ring_buffer_consume()
        else:
            self.bpf.ring_buffer_poll(timeout_ms)
        if self._callback_error is not None:
            err, self._callback_error = self._callback_error, None
            raise err

    # ---- tests and benchmarks ----
    def test_run(self, packet: bytes, repeat: int = 1) -> tuple[int, int]:
        return libbpf.prog_test_run(self.fd, packet, repeat)

    def test_run_egress(self, packet: bytes) -> int:
        """The egress (TC) program on `packet`; returns its verdict (-1: next/pass)."""
        verdict, _ = libbpf.prog_test_run(self.egress_fd, packet)
        return ct.c_int32(verdict).value

    # ---- attach ----
    def attach(self, iface: str, mode: str = "auto", egress: bool = True) -> "Attachment":
        return Attachment(self, iface, mode, egress)

    def close(self) -> None:
        self.bpf.cleanup()


def ifindex_of(iface: str) -> int:
    try:
        return socket.if_nametoindex(iface)
    except OSError:
        raise InterfaceError(f"interface {iface!r} does not exist; list interfaces with `ip link`") from None


class Attachment:
    """Our program attached to one interface through a BPF link. Close to detach."""

    def __init__(self, prog: XdpProgram, iface: str, mode: str, egress: bool = True):
        if mode not in XDP_MODES:
            raise ConfigError(f"--xdp-mode must be one of {', '.join(XDP_MODES)}, got {mode!r}")
        self.iface = iface
        self.ifindex = ifindex_of(iface)
        _clear_stale(self.ifindex, iface)
        self.link_fd = self.egress_fd = -1
        # Egress first: a handshake's SYN-ACK leaves there, and one that left before the hook
        # was in place would leave the flow's handshake unverified for good.
        if egress:
            self._attach_egress(prog)
        else:
            log.warning("no egress hook on %s (--no-egress): SSH flows count only what arrives, and no handshake "
                        "can be verified, so the rules that can block see no connection from it", iface)
        errors = []
        for flags in XDP_MODES[mode]:
            try:
                self.link_fd = libbpf.xdp_link_create(prog.fd, self.ifindex, flags)
                self.mode = MODE_NAMES[flags]
                break
            except OSError as e:
                if e.errno in (errno.EPERM, errno.EBUSY):
                    self.detach()
                if e.errno == errno.EPERM:
                    raise PrivilegeError(f"not allowed to attach XDP to {iface}: {PERMISSION_HINT}") from None
                if e.errno == errno.EBUSY:
                    raise AttachError(_occupied_message(self.ifindex, iface)) from None
                errors.append(f"{MODE_NAMES[flags]}: {e.strerror}")
        else:
            self.detach()
            hint = " (try --xdp-mode generic)" if mode == "native" else ""
            raise AttachError(f"cannot attach XDP to {iface}: {'; '.join(errors)}{hint}")
        log.info("attached XDP program to %s (ifindex %d) in %s mode", iface, self.ifindex, self.mode)

    def _attach_egress(self, prog: XdpProgram) -> None:
        """The other direction of SSH flows, where the kernel can (TCX, Linux >= 6.6). Not
        on loopback: there every packet leaves and arrives, and would count twice."""
        flags = Path(f"/sys/class/net/{self.iface}/flags")
        if flags.exists() and int(flags.read_text(), 16) & 0x8:  # IFF_LOOPBACK
            log.info("%s is a loopback interface: both directions already arrive at XDP", self.iface)
            return
        try:
            self.egress_fd = libbpf.tcx_egress_link_create(prog.egress_fd, self.ifindex)
        except OSError as e:
            log.warning("SSH flows on %s count only what arrives, and no handshake can be verified (no TCX egress "
                        "hook here: %s; needs Linux >= 6.6)", self.iface, e.strerror)
            return
        log.info("attached the egress program to %s (TCX): SSH flows count both directions", self.iface)

    def detach(self) -> None:
        if self.link_fd >= 0:
            os.close(self.link_fd)
            self.link_fd = -1
            log.info("detached XDP program from %s", self.iface)
        if self.egress_fd >= 0:
            os.close(self.egress_fd)
            self.egress_fd = -1

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _occupied_message(ifindex: int, iface: str) -> str:
    q = libbpf.xdp_query(ifindex)
    name = libbpf.prog_name(q.prog_id) if q.prog_id else "?"
    if name == PROG_NAME:
        return (f"another xdpwatch producer is running on {iface} (program id {q.prog_id}); "
                "stop it first, one producer per interface")
    return (f"{iface} already has XDP program {name!r} (id {q.prog_id}) attached; xdpwatch never "
            "replaces a program it does not own: detach it or choose another interface")


def _clear_stale(ifindex: int, iface: str) -> None:
    """Remove an xdpwatch program attached by netlink (it outlived the process that attached
    it). A link-attached one belongs to a live producer: the kernel refuses to detach it."""
    q = libbpf.xdp_query(ifindex)
    if not q.prog_id:
        return
    name = libbpf.prog_name(q.prog_id)
    if name != PROG_NAME:
        raise AttachError(_occupied_message(ifindex, iface))
    mode_flags = {libbpf.XDP_ATTACHED_DRV: libbpf.XDP_FLAGS_DRV_MODE,
                  libbpf.XDP_ATTACHED_SKB: libbpf.XDP_FLAGS_SKB_MODE}.get(q.attach_mode, 0)
    try:
        libbpf.xdp_detach(ifindex, mode_flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise AttachError(_occupied_message(ifindex, iface)) from None
        raise AttachError(f"cannot remove stale xdpwatch program {q.prog_id} from {iface}: {e.strerror}") from None
    log.warning("removed stale xdpwatch program id %d from %s (left by an earlier run)", q.prog_id, iface)
