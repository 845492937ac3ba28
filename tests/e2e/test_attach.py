"""Attachment safety through the CLI: never touch a foreign XDP program, replace a stale
one of ours, detach on exit, refuse without privileges."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from xdpwatch.producer import libbpf
from xdpwatch.producer.loader import ifindex_of

from .env import NOBODY_MAC, SOAK
from .procs import XDPWATCH, ProducerProc

pytestmark = pytest.mark.e2e

# Attach a program with bcc's netlink attach_xdp, then exit: the program stays attached,
# as one left behind by a crashed process would.
NETLINK_ATTACH = textwrap.dedent("""
    import sys
    from bcc import BPF
    name, iface = sys.argv[1], sys.argv[2]
    b = BPF(text="int %s(struct xdp_md *ctx) { return XDP_PASS; }" % name)
    b.attach_xdp(iface, b.load_func(name, BPF.XDP), BPF.XDP_FLAGS_SKB_MODE)
""")


def attach_by_netlink(prog_name: str, iface: str) -> int:
    subprocess.run([sys.executable, "-c", NETLINK_ATTACH, prog_name, iface], check=True, capture_output=True)
    q = libbpf.xdp_query(ifindex_of(iface))
    assert q.prog_id and libbpf.prog_name(q.prog_id) == prog_name
    return q.prog_id


def produce_args(net) -> list[str]:
    return ["--iface", net.iface, "--output", "stdout", "--interval", "0.5"]


def test_foreign_program_is_never_replaced(testnet):
    prog_id = attach_by_netlink("foreign_fw", testnet.iface)
    r = subprocess.run([XDPWATCH, "produce", *produce_args(testnet)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"xdpwatch: error: {testnet.iface} already has XDP program 'foreign_fw' (id {prog_id}) attached; "
        "xdpwatch never replaces a program it does not own: detach it or choose another interface")
    assert libbpf.xdp_query(ifindex_of(testnet.iface)).prog_id == prog_id  # untouched


def test_stale_program_of_ours_is_replaced_and_all_is_gone_after_stop(testnet):
    stale = attach_by_netlink("xdpwatch", testnet.iface)
    with ProducerProc(*produce_args(testnet)) as p:
        p.wait_attached()
        assert f"removed stale xdpwatch program id {stale}" in p.stderr
        live = libbpf.xdp_query(ifindex_of(testnet.iface)).prog_id
        assert live and live != stale
        assert p.stop() == 0
    assert libbpf.xdp_query(ifindex_of(testnet.iface)).prog_id == 0


def test_second_producer_on_the_same_interface_is_refused(testnet):
    with ProducerProc(*produce_args(testnet)) as first:
        first.wait_attached()
        r = subprocess.run([XDPWATCH, "produce", *produce_args(testnet)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert "another xdpwatch producer is running on" in r.stderr and "Traceback" not in r.stderr
        assert first.stop() == 0


def test_sigkill_leaves_nothing_attached(testnet):
    with ProducerProc(*produce_args(testnet)) as p:
        p.wait_attached()
        assert libbpf.xdp_query(ifindex_of(testnet.iface)).prog_id
        p.proc.kill()
        p.proc.wait()
    # The BPF link dies with the process; the kernel detaches it asynchronously.
    from .env import wait_for
    wait_for(lambda: libbpf.xdp_query(ifindex_of(testnet.iface)).prog_id == 0, 5, "the link to be released")


def test_without_privileges_the_error_names_what_is_missing():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        XDPWATCH, "produce", "--iface", "lo", "--output", "stdout"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/tmp"})
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("xdpwatch: error: not allowed to") and "CAP_BPF" in last, r.stderr
    assert "Traceback" not in r.stderr


def test_sigkill_while_traffic_flows_leaves_nothing(testnet):
    """A producer killed at any moment leaves nothing behind: 8 kill -9 in a row (100 with
    `make test-soak`) with traffic on the interface, then a clean run has exactly one program attached (ours), and
    none after it stops."""
    import threading
    import time

    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    net = testnet
    e = Ether(src=net.cli_mac, dst=NOBODY_MAC)
    frames = [bytes(e / IP(src=net.cli_ip, dst=net.srv_ip) / UDP(dport=9999) / (b"x" * 64))] * 50 + \
             [bytes(e / IP(src=net.cli_ip, dst=net.srv_ip) / TCP(sport=40000 + i, dport=22, flags="S")) for i in range(50)]
    stop, sent = threading.Event(), [0]
    rounds = 100 if SOAK else 8

    def traffic():  # bounded: at most 30 batches of 100 frames per round
        while not stop.is_set() and sent[0] < 30 * rounds:
            net.send_frames(frames)
            sent[0] += 1

    t = threading.Thread(target=traffic)
    t.start()
    try:
        for i in range(rounds):
            p = ProducerProc(*produce_args(net))
            p.wait_attached()
            q = libbpf.xdp_query(ifindex_of(net.iface))
            assert libbpf.prog_name(q.prog_id) == "xdpwatch", f"round {i}"
            p.proc.kill()
            p.proc.wait()
            time.sleep(0.1 * (i % 3))  # restart at once, or a moment later
    finally:
        stop.set()
        t.join()
    with ProducerProc(*produce_args(net)) as p:
        p.wait_attached()
        q = libbpf.xdp_query(ifindex_of(net.iface))
        assert q.prog_id and libbpf.prog_name(q.prog_id) == "xdpwatch"
        assert p.stop() == 0
    assert libbpf.xdp_query(ifindex_of(net.iface)).prog_id == 0
    assert sent[0] > rounds  # traffic did flow during the kills


def test_runs_as_an_unprivileged_user_with_three_capabilities(testnet):
    """As user nobody with only CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (ambient): loads,
    attaches, counts exactly, detaches. Not root, not CAP_SYS_ADMIN."""
    import json
    import signal
    import time

    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from .env import wait_for

    net = testnet
    caps = "cap_bpf,cap_net_admin,cap_perfmon"
    script = (f"grep CapEff /proc/self/status >&2; exec {XDPWATCH} produce --iface {net.iface} "
              "--output stdout --interval 0.3")
    p = subprocess.Popen(["capsh", f"--caps={caps},cap_setuid,cap_setgid,cap_setpcap+eip", "--keep=1",
                          "--user=nobody", f"--addamb={caps}", "--", "-c", script],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": "/tmp"})
    try:
        wait_for(lambda: p.poll() is not None or libbpf.xdp_query(ifindex_of(net.iface)).prog_id, 60,
                 "the unprivileged producer to attach")
        assert p.poll() is None, p.stderr.read()
        e = Ether(src=net.cli_mac, dst=NOBODY_MAC)
        net.send_frames([bytes(e / IP(src=net.cli_ip, dst=net.srv_ip) / UDP(dport=9999))] * 30)
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    eff = int(err.split("CapEff:")[1].split()[0], 16)
    assert eff == (1 << 39) | (1 << 12) | (1 << 38), hex(eff)  # exactly CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON
    docs = [json.loads(line) for line in out.splitlines()]
    assert sum(d["packets"]["udp"] for d in docs if "packets" in d) == 30
    assert libbpf.xdp_query(ifindex_of(net.iface)).prog_id == 0
