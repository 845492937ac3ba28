from __future__ import annotations

import pytest

from xdpwatch.producer.events import CLASSES
from xdpwatch.producer.libbpf import XDP_PASS
from xdpwatch.producer.loader import BpfConfig, XdpProgram
from xdpwatch.producer.records import CounterId


class Harness:
    """The real program, loaded (not attached); runs frames and reports counter deltas."""

    def __init__(self, cfg: BpfConfig):
        self.prog = XdpProgram(cfg)
        self.events = []
        self.prog.open_events(self.events.append)

    def run(self, *frames: bytes) -> dict[str, tuple[int, int]]:
        """Run each frame once; returns {counter name: (packets, bytes)} that moved."""
        before = self.prog.read_counters()
        for f in frames:
            verdict, _ = self.prog.test_run(bytes(f))
            assert verdict == XDP_PASS
        after = self.prog.read_counters()
        names = {cid: name for name, cid in CLASSES.items()}
        return {names.get(CounterId(i), CounterId(i).name.lower()): (a[0] - b[0], a[1] - b[1])
                for i, (a, b) in enumerate(zip(after, before)) if a != b}

    def take_events(self):
        self.prog.poll_events(0)
        out, self.events[:] = list(self.events), []
        return out

    def flows(self):
        return {(k.client_ip, k.client_port): v for k, v in self.prog.flow_entries()}


@pytest.fixture(scope="module")
def xdp():
    h = Harness(BpfConfig(ssh_ports=(22, 2222)))
    yield h
    h.prog.close()


@pytest.fixture
def fresh():
    """A program of its own, for tests that look at the flow table or ring buffer."""
    made = []

    def make(**kw):
        made.append(Harness(BpfConfig(**kw)))
        return made[-1]

    yield make
    for h in made:
        h.prog.close()
