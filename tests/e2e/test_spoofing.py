"""The attacker's test of prevention, end to end: a real sshd, the real XDP program on a veth,
`xdpwatch produce --enforce`, `xdpwatch alert --block-on` for every rule that can block, and
three kinds of traffic from the client's namespace:

- 30 SYNs in 10 s "from" an address that never answers (the server's SYN-ACKs to it leave
  through the watched interface, so the producer sees them), plus ACKs guessing the server's
  sequence number: a spoofer framing a victim;
- packets from port 22 "of" six made-up servers to the SSH server's host, to many ports: the
  trick that made the observed host look like a brute-forcer and a scanner;
- a real client logging in again and again.

Neither the spoofed address nor the host is blocked or named by a rule that can block; the
SYN flood raises its own alert, which cannot block; the real client is blocked and its next
SYN is dropped in XDP."""

from __future__ import annotations

import collections
import random
import subprocess
import time

import orjson
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from xdpwatch import schemas

from .env import NOBODY_MAC, consume_all, sh
from .procs import ProducerProc, XdpwatchProc
from .test_prevention import attack_until_blocked, sshd_connections

pytestmark = pytest.mark.e2e

BLOCKING_RULES = ("ssh_bruteforce", "ssh_scan", "ssh_auth_failures")


def test_spoofed_sources_are_never_blocked_and_a_real_one_is(testnet, sshd, broker_factory, tmp_path):
    net = testnet
    victim = f"198.18.{net.n}.77"  # never answers: its MAC is nobody's
    servers = [f"203.0.113.{i}" for i in range(1, 7)]  # "SSH servers" that do not exist
    # The server resolves the victim, so its SYN-ACKs really leave through the watched veth.
    sh("ip", "-n", net.srv_ns, "neigh", "replace", victim, "lladdr", NOBODY_MAC, "dev", "eth0", "nud", "permanent")
    broker = broker_factory(value_schemas={f"xdpwatch.{s}": schemas.load(s) for s in schemas.names()})
    bs = ["--bootstrap-servers", broker.bootstrap]
    alerts_out = tmp_path / "alerts.jsonl"
    block_on = [a for rule in BLOCKING_RULES for a in ("--block-on", rule)]
    eth = Ether(src=net.cli_mac, dst=net.srv_mac)
    rnd = random.Random(13)

    with ProducerProc("--iface", net.iface, *bs, "--interval", "0.5", "--flow-fin-linger", "0.5",
                      "--enforce") as producer, \
         XdpwatchProc("alert", *bs, "--from-beginning", "--output", str(alerts_out), *block_on, "--block-ttl", "1m",
                      "--dead-letter", str(tmp_path / "dl.jsonl"), "-X", "session.timeout.ms=6000") as alert:
        producer.wait_attached()
        # The spoofer: 3 SYNs a second for 10 s, then guessed ACKs for each.
        syns = []
        for second in range(10):
            batch = [eth / IP(src=victim, dst=net.srv_ip) / TCP(sport=20000 + 3 * second + i, dport=22, flags="S",
                                                               seq=rnd.getrandbits(32)) for i in range(3)]
            net.send_frames([bytes(f) for f in batch])
            syns += batch
            time.sleep(1)
        net.send_frames([bytes(eth / IP(src=victim, dst=net.srv_ip) / TCP(sport=s[TCP].sport, dport=22, flags="A",
                                                                         seq=s[TCP].seq + 1, ack=rnd.getrandbits(32)))
                         for s in syns for _ in range(2)])
        # Packets from port 22 of six "servers" to the SSH server's host, ten ports each.
        net.send_frames([bytes(eth / IP(src=w, dst=net.srv_ip) / TCP(sport=22, dport=50000 + p, flags=flags,
                                                                   seq=rnd.getrandbits(32), ack=rnd.getrandbits(32)))
                         for w in servers for p in range(10) for flags in ("SA", "A")])
        # A real client: failed password logins until it is blocked.
        expires = attack_until_blocked(net, sshd, producer, attempts=15)
        before = sshd_connections(sshd)
        assert expires - time.time() > 10
        r = net.exec(net.cli_ns, sshd.client_cmd("echo in", connect_timeout=3), capture_output=True, text=True,
                     timeout=30)
        assert r.returncode == 255 and "timed out" in r.stderr, (r.returncode, r.stderr)
        assert sshd_connections(sshd) == before  # its SYNs were dropped in XDP
        time.sleep(2)  # the flows of the spoofed SYNs reach the alert consumer
        assert producer.stop() == 0, producer.stderr
        assert alert.stop() == 0, alert.stderr

    alerts = [orjson.loads(line) for line in alerts_out.read_bytes().splitlines()]
    assert all(schemas.errors("alerts", a) == [] for a in alerts)
    named = {(a["rule"]["name"], a.get("source", {}).get("ip")) for a in alerts}
    for address in (victim, net.srv_ip, *servers):
        assert not {rule for rule, ip in named if ip == address} & set(BLOCKING_RULES), (address, named)
    assert ("ssh_syn_flood", victim) in named  # alerted, as unverified
    # The real client: alerted by a blocking rule. Which one comes first is a race between
    # two true alerts (ssh_auth_failures counts at each flow_end, ssh_bruteforce per
    # connection) and the block that follows the first one ends the attack.
    assert {rule for rule, ip in named if ip == net.cli_ip} & set(BLOCKING_RULES), named

    commands = [orjson.loads(m.value)["command"] for m in consume_all(broker.bootstrap, "xdpwatch.control")]
    enforcement = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.enforcement")]
    assert {c["prefix"] for c in commands} == {net.cli_ip}
    applied = [e["xdpwatch"]["enforcement"] for e in enforcement if e["event"]["action"] == "block_applied"]
    assert {e["prefix"] for e in applied} == {f"{net.cli_ip}/32"}  # (one block per rule that fired)
    counts = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.packet-counts")]
    dropped = sum(d["enforcement"]["blocked"]["packets"] for d in counts)
    assert dropped >= 1

    # How far the spoofed handshakes got: the server's SYN-ACKs were seen leaving, no ACK
    # acknowledged them; the packets from port 22 never opened a client's handshake.
    flows = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.ssh-flows")]
    spoofed = [d for d in flows if d["source"]["ip"] == victim]
    states = collections.Counter(d["tcp"]["handshake"] for d in spoofed)
    assert len({d["source"]["port"] for d in spoofed}) == 30 and states["complete"] == 0, states
    assert states["syn_ack"] > 0, states
    from_22 = [d for d in flows if d["destination"]["ip"] in servers]
    assert len({(d["destination"]["ip"], d["source"]["port"]) for d in from_22}) == 60
    assert {d["tcp"]["handshake"] for d in from_22} == {"none"}
    assert not [d for d in flows if d["event"]["action"] == "flow_established" and d["source"]["ip"] != net.cli_ip]
    print(f"\n[spoofing] 30 spoofed SYNs and 60 guessed ACKs (handshake states of their flow events: "
          f"{dict(states)}) and 120 packets from port 22: no block, alerts {sorted(named)}; the real client "
          f"blocked, {dropped} packets dropped")
