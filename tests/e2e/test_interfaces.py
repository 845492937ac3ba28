"""One producer, many interfaces, through the CLI (`--output stdout`: no broker needed, every
line checked against its schema): exact per-interface counts, flows named by their
interface, an excluded and a foreign-occupied interface left alone, interfaces that appear
and go while it runs, and 20 create/delete cycles that leave nothing behind.

One producer run carries every assertion (the suite's time budget): its phases are in order
in the one test below. Veths are ours: the root end is watched, the other end sits in a
namespace we create and sends the frames (IPv6 off, no addresses: nothing else arrives)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import orjson
import pytest

from xdpwatch import schemas
from xdpwatch.producer import libbpf
from xdpwatch.producer.loader import ifindex_of

from ..veths import Veth, syns, udp
from .env import free_port, scrape, sh, wait_for
from .procs import ProducerProc
from .test_attach import attach_by_netlink

pytestmark = pytest.mark.e2e

N = os.getpid() % 90 + 10
PREFIX = f"xwi{N}"  # our interfaces: xwiNNa, xwiNNb, …
class StdoutProducer(ProducerProc):
    """The producer with --output stdout; its lines parsed and schema-checked as they come."""

    def __init__(self, *args: str):
        super().__init__("--output", "stdout", *args)
        self.docs: list[dict] = []
        self._out = threading.Thread(target=self._read_out, daemon=True)
        self._out.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            doc = orjson.loads(line)
            stream = "packet-counts" if "interval" in doc else "ssh-flows"
            assert schemas.errors(stream, doc) == [], doc
            self.docs.append(doc)

    def counts(self, iface: str) -> list[dict]:
        return [d for d in list(self.docs) if "interval" in d and d["observer"]["ingress"]["interface"]["name"] == iface]

    def total(self, iface: str) -> tuple[int, int]:
        recs = self.counts(iface)
        return sum(d["packets"]["total"] for d in recs), sum(d["bytes"]["total"] for d in recs)

    def log_count(self, text: str) -> int:
        return sum(text in line for line in list(self.stderr_lines))

    def bpf_fds(self) -> dict[str, int]:
        """This process's BPF objects by kind, from /proc/PID/fdinfo: links, programs, maps."""
        kinds = {"link_type:": 0, "prog_type:": 0, "map_type:": 0}
        fdinfo = Path(f"/proc/{self.proc.pid}/fdinfo")
        for f in fdinfo.iterdir():
            try:
                text = f.read_text()
            except OSError:
                continue  # closed meanwhile
            for k in kinds:
                if any(line.startswith(k) for line in text.splitlines()):
                    kinds[k] += 1
                    break
        return {"links": kinds["link_type:"], "progs": kinds["prog_type:"], "maps": kinds["map_type:"]}


def test_many_interfaces_that_come_and_go():
    # g: excluded; f: a foreign program; n1: outside the pattern, named with --iface
    a, b, g, f, n = (Veth(f"{PREFIX}{c}") for c in ("a", "b", "g", "f", "n1"))
    made = [a, b, g, f, n]
    port = free_port()
    try:
        foreign = attach_by_netlink("foreign_fw", f.name)
        with StdoutProducer("--iface-pattern", f"{PREFIX}[a-z]", "--exclude-iface-pattern", f"{PREFIX}g",
                            "--iface", n.name, "--interval", "0.5", "--metrics-port", str(port)) as p:
            p.wait_for_log("watching 3 interface(s)")
            # -- the foreign program: reported in one line, untouched; the excluded one: untouched
            assert (f"not watching {f.name}: {f.name} already has XDP program 'foreign_fw' (id {foreign}) attached; "
                    "xdpwatch never replaces a program it does not own") in p.stderr
            assert libbpf.xdp_query(ifindex_of(f.name)).prog_id == foreign
            assert libbpf.xdp_query(ifindex_of(g.name)).prog_id == 0
            ours = libbpf.xdp_query(ifindex_of(a.name)).prog_id
            assert ours and libbpf.prog_name(ours) == "xdpwatch" == libbpf.prog_name(libbpf.xdp_query(ifindex_of(b.name)).prog_id)
            assert libbpf.xdp_query(ifindex_of(b.name)).prog_id == ours  # one program for both

            # -- crafted traffic on both: exact sums per interface, flows named by interface
            sent = {a.name: [a.send(udp(37, 100, "203.0.113.1")), 37], b.name: [b.send(udp(11, 300, "203.0.113.2")), 11]}
            sent[a.name][0] += a.send(syns("203.0.113.1", range(40001, 40003)))
            sent[a.name][1] += 2
            sent[b.name][0] += b.send(syns("203.0.113.2", range(50001, 50004)))
            sent[b.name][1] += 3
            g.send(udp(5, 64, "203.0.113.3"))
            f.send(udp(5, 64, "203.0.113.4"))

            # -- an interface that appears: attached and counted within 5 s; then deleted
            d = Veth(f"{PREFIX}d")
            made.append(d)
            p.wait_for_log(f"watching {d.name} (ifindex", timeout=5)
            d_bytes = d.send(udp(9, 200, "203.0.113.5"))
            wait_for(lambda: p.total(d.name) == (9, d_bytes), 5, f"{d.name}'s frames counted")
            base = p.bpf_fds()
            d.delete()
            p.wait_for_log(f"stopped watching {d.name} (gone)", timeout=5)
            last = p.counts(d.name)[-1]
            assert last["interval"].get("final") is True
            assert p.total(d.name) == (9, d_bytes)  # the last partial interval included

            # -- 20 create/delete cycles leave no link, program or map behind
            assert base["links"] == 4 * 2  # a, b, n1, d: XDP and TCX each
            e = f"{PREFIX}e"
            for i in range(20):
                att, det = p.log_count(f"watching {e} (ifindex"), p.log_count(f"stopped watching {e} (gone)")
                v = Veth(e)
                made.append(v)
                wait_for(lambda: p.log_count(f"watching {e} (ifindex") > att, 5, f"cycle {i}: {e} attached")
                v.delete()
                wait_for(lambda: p.log_count(f"stopped watching {e} (gone)") > det, 5, f"cycle {i}: {e} detached")
            after = p.bpf_fds()
            assert after == {**base, "links": 3 * 2}, (base, after)  # d's links closed, nothing else changed
            m = scrape(port)
            assert m["xdpwatch_interfaces_watched"] == 3
            assert m["xdpwatch_interfaces_attached_total"] == 3 + 1 + 20
            assert m["xdpwatch_interfaces_detached_total"] == 1 + 20
            assert m["xdpwatch_interfaces_skipped_total"] == 1
            assert m[f'xdpwatch_packets_total{{class="total",interface="{a.name}"}}'] <= sent[a.name][1]

            # -- the foreign program, untouched through every re-read, goes: f is watched then
            assert libbpf.xdp_query(ifindex_of(f.name)).prog_id == foreign
            sh("ip", "link", "set", "dev", f.name, "xdpgeneric", "off")
            p.wait_for_log(f"watching {f.name} (ifindex", timeout=5)
            # -- the named interface outside the pattern goes and comes back: watched again
            n.delete()
            p.wait_for_log(f"stopped watching {n.name} (gone)", timeout=5)
            made.append(Veth(n.name))
            wait_for(lambda: p.log_count(f"watching {n.name} (ifindex") == 2, 5, f"{n.name} watched again")
            assert p.stop() == 0
        errors = [line for line in p.stderr_lines if " ERROR " in line or " WARNING " in line]
        assert "Traceback" not in p.stderr and len(errors) == 1 and f"not watching {f.name}: " in errors[0], errors
        for iface, (nbytes, npackets) in sent.items():
            assert p.total(iface) == (npackets, nbytes), iface
            assert p.counts(iface)[-1]["interval"]["final"] is True
        assert p.total(g.name) == (0, 0) and p.total(f.name) == (0, 0)
        starts = {d["source"]["port"]: d["observer"]["ingress"]["interface"]["name"]
                  for d in p.docs if d.get("event", {}).get("action") == "flow_start"}
        assert starts == {40001: a.name, 40002: a.name, 50001: b.name, 50002: b.name, 50003: b.name}
        ends = [d for d in p.docs if d.get("event", {}).get("action") == "flow_end"]
        assert sorted(d["source"]["port"] for d in ends) == [40001, 40002, 50001, 50002, 50003]
        assert p.summary()["interfaces"][a.name] == {"packets": sent[a.name][1], "bytes": sent[a.name][0]}
        # after the stop: nothing of ours anywhere
        assert all(libbpf.xdp_query(ifindex_of(v.name)).prog_id == 0 for v in (a, b, f, n))
    finally:
        for v in made:
            v.delete()
