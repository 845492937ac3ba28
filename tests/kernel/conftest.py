"""Fixtures for the kernel tier: the real XDP program, compiled and loaded (never attached),
run on exact frames with BPF_PROG_TEST_RUN."""

from __future__ import annotations

import pytest

from xdpwatch.producer.libbpf import XDP_PASS
from xdpwatch.producer.loader import BpfConfig, XdpProgram
from xdpwatch.producer.records import CounterId, FlowEvent, FlowKey, FlowValue

NAMES = {cid: cid.name.lower() for cid in CounterId}  # "total", "ipv4", …, "events_submitted"


class Harness:
    """One loaded program: runs frames, reports counter deltas, collects ring-buffer events."""

    def __init__(self, cfg: BpfConfig):
        self.cfg = cfg
        self.prog = XdpProgram(cfg)
        self.prog.add_iface(1)  # BPF_PROG_TEST_RUN's frames arrive on lo (ifindex 1): slot 0
        self.events: list[FlowEvent] = []
        self.prog.open_events(self.events.append)

    def counters(self) -> dict[str, tuple[int, int]]:
        return {NAMES[CounterId(i)]: pb for i, pb in enumerate(self.prog.read_counters())}

    def run(self, *frames, repeat: int = 1) -> dict[str, tuple[int, int]]:
        """Run each frame (`repeat` times); every verdict must be XDP_PASS. Returns
        {counter name: (packets, bytes)} for the counters that moved, and only those."""
        before = self.prog.read_counters()
        for f in frames:
            verdict, _ = self.prog.test_run(bytes(f), repeat)
            assert verdict == XDP_PASS, f"verdict {verdict} for {bytes(f).hex()}"
        after = self.prog.read_counters()
        return {NAMES[CounterId(i)]: (a[0] - b[0], a[1] - b[1])
                for i, (a, b) in enumerate(zip(after, before)) if a != b}

    def take_events(self) -> list[FlowEvent]:
        """Every ring-buffer record submitted since the last call, in order."""
        self.prog.poll_events(0)
        out, self.events[:] = list(self.events), []
        return out

    def flows(self) -> list[tuple[FlowKey, FlowValue]]:
        return list(self.prog.flow_entries())

    def reset(self) -> None:
        """Forget every flow and drain the ring buffer, so the next SSH frame starts a flow."""
        for k, _ in self.flows():
            self.prog.delete_flow(k)
        self.take_events()
        assert self.flows() == []

    def close(self) -> None:
        self.prog.close()


@pytest.fixture(scope="module")
def xdp():
    """The program as the producer loads it by default: ssh_ports=(22,)."""
    h = Harness(BpfConfig(ssh_ports=(22,), flow_table_size=65536, ringbuf_pages=64))
    yield h
    h.close()


@pytest.fixture(scope="module")
def xdp_2222():
    """A second program with an extra SSH port: ssh_ports=(22, 2222)."""
    h = Harness(BpfConfig(ssh_ports=(22, 2222)))
    yield h
    h.close()


@pytest.fixture
def fresh():
    """A program of its own (empty flow table, empty ring buffer) for flow-state tests."""
    made: list[Harness] = []

    def make(**kw) -> Harness:
        made.append(Harness(BpfConfig(**kw)))
        return made[-1]

    yield make
    for h in made:
        h.close()
