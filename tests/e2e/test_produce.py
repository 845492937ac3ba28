"""End to end: `xdpwatch produce` on a veth in namespaces the test creates, the real XDP
program, a real Kafka-protocol broker validating every record against schemas/, exact
crafted traffic and a real sshd session."""

from __future__ import annotations

import collections
import subprocess
import sys
import time

import orjson
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from xdpwatch import schemas
from xdpwatch.producer import libbpf
from xdpwatch.producer.loader import ifindex_of

from .env import NOBODY_MAC, documents
from .procs import ProducerProc

pytestmark = pytest.mark.e2e

PREFIX = "xdpwatch"
COUNTS, FLOWS = f"{PREFIX}.packet-counts", f"{PREFIX}.ssh-flows"


@pytest.fixture
def broker(broker_factory):
    return broker_factory(value_schemas={COUNTS: schemas.load("packet-counts"),
                                         FLOWS: schemas.load("ssh-flows")})


class Traffic:
    """Crafted frames with the classes each must land in, to compute exact expectations."""

    def __init__(self, net):
        self.net = net
        self.frames: list[bytes] = []
        self.expected = collections.Counter()

    def eth(self):
        return Ether(src=self.net.cli_mac, dst=NOBODY_MAC)

    def add(self, pkt, *classes: str, times: int = 1) -> None:
        raw = bytes(pkt)
        for _ in range(times):
            self.frames.append(raw)
            for c in ("total", *classes):
                self.expected[("packets", c)] += 1
                self.expected[("bytes", c)] += len(raw)

    def send(self) -> None:
        self.net.send_frames(self.frames)
        self.frames = []


def flow_events(docs):
    by_flow = collections.defaultdict(list)
    for key, d in docs:
        by_flow[(d["source"]["ip"], d["source"]["port"])].append((key, d))
    return by_flow


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_exact_counts_and_flows_from_crafted_traffic(testnet, broker, mode):
    net = testnet
    cli, srv = net.cli_ip, net.srv_ip
    t = Traffic(net)
    e = t.eth
    # Background traffic of every class.
    for size in (0, 100, 1000):
        t.add(e() / IP(src=cli, dst=srv) / UDP(sport=5353, dport=9999) / (b"u" * size), "ipv4", "udp", times=10)
    t.add(e() / IP(src=cli, dst=srv) / ICMP() / b"ping", "ipv4", "icmp", times=7)
    t.add(e() / ARP(op=1, hwsrc=net.cli_mac, psrc=cli, pdst="198.18.255.254"), "arp", times=2)
    t.add(e() / Dot1Q(vlan=7) / IP(src=cli, dst=srv) / UDP(dport=53), "vlan", "ipv4", "udp", times=3)
    t.add(e() / IP(src=cli, dst=srv) / TCP(sport=33000, dport=80, flags="S"), "ipv4", "tcp", times=4)
    t.add(e() / IP(src=cli, dst=srv, proto=47) / b"gre-ish", "ipv4", "l4_other", times=2)
    t.add(bytes(e() / IP(src=cli, dst=srv, proto=6))[:14 + 20 + 10], "ipv4", "tcp", "malformed", times=2)

    def ssh(sport, flags, payload=b"", ip=IP, src=cli, dst=srv):
        t.add(e() / ip(src=src, dst=dst) / TCP(sport=sport, dport=22, flags=flags) / payload,
              "ipv4" if ip is IP else "ipv6", "tcp", "ssh")
        return len(t.frames[-1])

    flows = {}
    # A: ended by FIN (then the closing ACK, inside the linger)
    flows[41001] = sum(ssh(41001, f, p) for f, p in [("S", b""), ("A", b""), ("PA", b"x" * 40), ("PA", b"y" * 500),
                                                       ("FA", b""), ("A", b"")])
    # B: ended by RST
    flows[41002] = sum(ssh(41002, f) for f in ["S", "A", "PA", "R"])
    # C: goes idle
    flows[41003] = sum(ssh(41003, f) for f in ["S", "A"])
    # D: joined mid-connection (no SYN seen), goes idle
    flows[41004] = sum(ssh(41004, f, b"z" * 64) for f in ["PA", "PA", "A"])
    # E: IPv6, ended by RST
    flows[41005] = sum(ssh(41005, f, ip=IPv6, src="2001:db8::2", dst="2001:db8::1") for f in ["S", "A", "R"])

    args = ["--iface", net.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.5",
            "--flow-idle-timeout", "3", "--flow-active-timeout", "600", "--flow-fin-linger", "1",
            "--xdp-mode", mode, "--topic-partitions", "2"]
    with ProducerProc(*args) as producer:
        producer.wait_attached()
        assert producer.stderr.count(f"in {mode} mode") == 1
        t.send()
        time.sleep(5)  # idle timeout 3 s + sweeps
        rc = producer.stop()
    assert rc == 0, producer.stderr
    s = producer.summary()
    e = s["events"]
    assert e["failed"] == e["undelivered"] == 0
    # The last log line says the same, for people.
    assert (f"stopped: {s['packets']} packets, {s['ssh_flows']} SSH flows ({s['flows_evicted']} evicted), "
            f"{s['ringbuf_drops']} ring-buffer drops; events produced {e['produced']}, delivered {e['delivered']}, "
            f"failed 0, undelivered 0, spooled {e['spooled']}, dropped {e['dropped']}, "
            f"already in Kafka {e['already_in_kafka']}") in producer.stderr
    # Detached: nothing left on the interface.
    assert libbpf.xdp_query(ifindex_of(net.iface)).prog_id == 0

    counts = [d for _, d in documents(broker, COUNTS, min_messages=2)]
    got = collections.Counter()
    for d in counts:
        for kind in ("packets", "bytes"):
            for cls, n in d[kind].items():
                got[(kind, cls)] += n
    assert +got == +t.expected
    print(f"\n[{mode}] {got[('packets', 'total')]} frames / {got[('bytes', 'total')]} bytes counted of "
          f"{t.expected[('packets', 'total')]} / {t.expected[('bytes', 'total')]} sent, in {len(counts)} intervals")
    assert counts[-1]["interval"].get("final") is True and sum(1 for d in counts if d["interval"].get("final")) == 1
    assert sum(d["flows"]["started"] for d in counts) == 5
    assert sum(d["drops"]["ringbuf"] for d in counts) == 0
    assert sum(d["flows"]["evicted"] for d in counts) == 0
    assert len(counts) >= 8  # 0.5 s intervals over ~5 s: deltas, not one cumulative record

    docs = documents(broker, FLOWS, min_messages=10)
    assert len({d["event"]["id"] for _, d in docs}) == len(docs) == 10
    ev = flow_events(docs)
    expect = {41001: ("fin", 6, False), 41002: ("rst", 4, False), 41003: ("idle", 2, False),
              41004: ("idle", 3, True), 41005: ("rst", 3, False)}
    for port, (reason, packets, midstream) in expect.items():
        client = "2001:db8::2" if port == 41005 else cli
        events = ev[(client, port)]
        assert [d["event"]["action"] for _, d in events] == ["flow_start", "flow_end"], port
        (k1, start), (k2, end) = events
        assert k1 == k2 == client.encode()
        assert end["event"]["reason"] == reason
        assert end["network"]["packets"] == packets and end["network"]["bytes"] == flows[port]
        assert start["network"]["packets"] == 1
        assert start["flow"]["id"] == end["flow"]["id"]
        assert end["flow"]["midstream"] is midstream
        assert end["destination"] == {"ip": "2001:db8::1" if port == 41005 else srv, "port": 22,
                                      "packets": 0, "bytes": 0}  # nothing answers: no server -> client
        assert end["source"]["packets"] == packets and end["source"]["bytes"] == flows[port]
        assert end["network"]["direction"] == "inbound"
        assert end["network"]["type"] == ("ipv6" if port == 41005 else "ipv4")


def test_real_ssh_session_is_one_flow_with_exact_counts(testnet, sshd, broker):
    net = testnet
    # What each side announces, as the binaries report it, before the producer watches.
    client_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.split(",")[0].strip()
    server_banner = net.exec(net.cli_ns, [sys.executable, "-c", (
        "import socket; s = socket.create_connection(('%s', 22), 5); print(s.makefile('rb').readline()"
        ".decode().rstrip()); s.sendall(b'SSH-2.0-probe\\r\\n')") % net.srv_ip],
        capture_output=True, text=True, timeout=30).stdout.strip()
    assert server_banner.startswith("SSH-2.0-OpenSSH_"), server_banner
    args = ["--iface", net.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.5",
            "--flow-idle-timeout", "30", "--flow-active-timeout", "1", "--flow-fin-linger", "1"]
    with ProducerProc(*args) as producer:
        producer.wait_attached()
        native = "in native mode" in producer.stderr
        before = net.link_stats(net.iface)
        out = net.exec(net.cli_ns, sshd.client_cmd("sleep 2.5; echo done"), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
        time.sleep(3)  # FIN linger 1 s + sweep
        after = net.link_stats(net.iface)
        rc = producer.stop()
    assert rc == 0, producer.stderr

    rx_packets = after["rx_packets"] - before["rx_packets"]
    # With a native XDP program attached, veth's rx_bytes leaves out the Ethernet header.
    rx_bytes = after["rx_bytes"] - before["rx_bytes"] + (14 * rx_packets if native else 0)
    tx_packets, tx_bytes = after["tx_packets"] - before["tx_packets"], after["tx_bytes"] - before["tx_bytes"]

    docs = documents(broker, FLOWS, min_messages=3)
    actions = [d["event"]["action"] for _, d in docs]
    assert actions[0] == "flow_start" and actions[-1] == "flow_end" and actions.count("flow_end") == 1
    # The handshake was seen in full (SYN arrived, SYN-ACK left, ACK arrived): reported once.
    assert actions[1] == "flow_established" and actions.count("flow_established") == 1
    assert [d["tcp"]["handshake"] for _, d in docs[:2]] == ["syn", "complete"]
    assert docs[1][1]["network"]["packets"] == 3  # SYN, SYN-ACK, ACK
    assert actions.count("flow_update") >= 1  # the session lasted > 2 s with a 1 s active timeout
    assert len({d["flow"]["id"] for _, d in docs}) == 1
    end = docs[-1][1]
    assert end["event"]["reason"] == "fin"
    assert end["source"]["ip"] == net.cli_ip and end["destination"]["ip"] == net.srv_ip
    assert end["destination"]["port"] == 22
    assert end["flow"]["midstream"] is False and end["network"]["direction"] == "inbound"
    assert {"SYN", "ACK", "FIN", "PSH"} <= set(end["tcp"]["flags"])
    # Exact: the session is the only traffic on this interface (static ARP, no IPv6): what
    # arrives (rx: client -> server, XDP) and what leaves (tx: server -> client, TCX egress).
    print(f"\n[ssh] flow {end['network']['packets']} packets / {end['network']['bytes']} bytes; "
          f"client->server {end['source']['packets']} / {end['source']['bytes']} = veth rx {rx_packets} / {rx_bytes}; "
          f"server->client {end['destination']['packets']} / {end['destination']['bytes']} = veth tx "
          f"{tx_packets} / {tx_bytes}; {len(docs)} flow events")
    assert end["source"]["packets"] == rx_packets > 10 and end["source"]["bytes"] == rx_bytes
    assert end["destination"]["packets"] == tx_packets > 10 and end["destination"]["bytes"] == tx_bytes
    assert end["network"]["packets"] == rx_packets + tx_packets
    assert end["network"]["bytes"] == rx_bytes + tx_bytes
    # Software versions, parsed from the banners captured in the kernel.
    software, _, comments = client_v.partition(" ")  # e.g. "OpenSSH_9.2p1 Debian-2+deb12u5"
    assert end["ssh"]["client"] == {"banner": f"SSH-2.0-{client_v}", "protocol": "2.0", "software": software,
                                    "comments": comments, "truncated": False}
    assert end["ssh"]["server"]["banner"] == server_banner and end["ssh"]["server"]["truncated"] is False
    print(f"[ssh] client {end['ssh']['client']['banner']!r} (ssh -V: {client_v!r}); server "
          f"{end['ssh']['server']['banner']!r}; login {end['ssh']['auth']}")
    assert end["ssh"]["auth"] == {"outcome": "success", "confidence": "high", "failures": 0}  # key-based
    assert end["tcp"]["handshake"] == "complete"
    updates = [d["network"]["packets"] for _, d in docs if d["event"]["action"] == "flow_update"]
    assert updates == sorted(updates) and updates[-1] <= end["network"]["packets"]

    counts = [d for _, d in documents(broker, COUNTS, min_messages=2)]
    assert sum(d["packets"]["ssh"] for d in counts) == rx_packets
    assert sum(d["packets"]["total"] for d in counts) == rx_packets
    assert sum(d["flows"]["started"] for d in counts) == 1


def test_failed_password_logins_are_guessed_as_failures(testnet, sshd, broker):
    """Wrong passwords, a real sshpass against a real sshd: each flow ends with
    ssh.auth.outcome failure, and the refused attempts add up to sshd's own count."""
    net = testnet
    args = ["--iface", net.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.5",
            "--flow-fin-linger", "0.5"]
    with ProducerProc(*args) as producer:
        producer.wait_attached()
        for password in ("wrong", "also-wrong"):
            r = net.exec(net.cli_ns, sshd.failed_login_cmd(password), capture_output=True, text=True, timeout=60)
            assert r.returncode != 0, r.stdout
        time.sleep(2)
        assert producer.stop() == 0, producer.stderr
    ends = [d for _, d in documents(broker, FLOWS, min_messages=4) if d["event"]["action"] == "flow_end"]
    refused = (sshd.dir / "sshd.log").read_text().count("Failed password for root")
    auths = [d["ssh"]["auth"] for d in ends]
    print(f"\n[ssh] wrong passwords: sshd logged {refused} failures; flows say {auths}")
    assert [a["outcome"] for a in auths] == ["failure", "failure"]
    assert [d["tcp"]["handshake"] for d in ends] == ["complete", "complete"]
    assert sum(a["failures"] for a in auths) == refused


def test_metrics_and_json_logs(testnet, broker):
    from .env import free_port, scrape

    net = testnet
    port = free_port()
    t = Traffic(net)
    t.add(t.eth() / IP(src=net.cli_ip, dst=net.srv_ip) / UDP(sport=5353, dport=9999) / b"m", "ipv4", "udp", times=25)
    t.add(t.eth() / IP(src=net.cli_ip, dst=net.srv_ip) / TCP(sport=41010, dport=22, flags="S"), "ipv4", "tcp", "ssh")
    args = ["--iface", net.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.3",
            "--metrics-port", str(port), "--log-format", "json"]
    with ProducerProc(*args) as producer:
        producer.wait_attached()
        t.send()
        time.sleep(1.5)  # a few intervals: the snapshot covers every frame
        m = scrape(port)
        rc = producer.stop()
    assert rc == 0, producer.stderr
    def get(name: str, **labels: str) -> float:
        lbl = ",".join(f'{k}="{v}"' for k, v in sorted({"interface": net.iface, **labels}.items()))
        return m[f"{name}{{{lbl}}}"]

    assert get("xdpwatch_packets_total", **{"class": "udp"}) == 25
    assert get("xdpwatch_packets_total", **{"class": "ssh"}) == 1
    assert get("xdpwatch_bytes_total", **{"class": "total"}) == t.expected[("bytes", "total")]
    assert get("xdpwatch_flows_started_total") == 1 and get("xdpwatch_flows_active") == 1
    assert get("xdpwatch_ringbuf_drops_total") == 0 and get("xdpwatch_flow_table_capacity") == 65536
    assert get("xdpwatch_events_produced_total") >= get("xdpwatch_events_delivered_total") >= 2
    assert get("xdpwatch_events_failed_total") == 0
    assert "process_resident_memory_bytes" in m
    logs = [orjson.loads(line) for line in producer.stderr_lines if line.startswith("{")]
    assert len(logs) == len(producer.stderr_lines) >= 2  # every line is JSON
    assert {"@timestamp", "log.level", "log.logger", "message"} <= set(logs[0])
    assert any("attached XDP program" in d["message"] for d in logs)


def test_refused_events_are_counted_and_the_exit_code_says_so(testnet, broker_factory):
    """The broker refuses every packet-counts record (its schema there demands a field we
    never send): each refusal is counted, none passes for delivered, exit code 3."""
    broker = broker_factory(value_schemas={COUNTS: {"type": "object", "required": ["no-such-field"]}})
    args = ["--iface", testnet.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.3"]
    with ProducerProc(*args) as producer:
        producer.wait_attached()
        time.sleep(1.5)
        rc = producer.stop()
    assert rc == 3, producer.stderr
    last = producer.stderr_lines[-1]
    produced = int(last.split("events were not delivered")[0].split(" of ")[1])
    assert last.startswith(f"xdpwatch: error: {produced} of {produced} events were not delivered")
    e = producer.summary()["events"]
    assert (e["produced"], e["delivered"], e["failed"], e["undelivered"]) == (produced, 0, produced, 0)
    assert produced >= 4  # an interval every 0.3 s, plus the final one
    assert "INVALID_RECORD" in producer.stderr or "failed to validate" in producer.stderr.lower()
