"""An attacker with write access to the control topic, against the real producer
(`xdpwatch produce --enforce` on a test veth, real broker validating every record): 20,000
block commands (more than the kernel's blocklist holds), commands dated 2099 and 9999, a
week-long block dated ahead, blocks of this host's own address and of the Kafka broker.
The producer stays up and attached, decides every command exactly once on the enforcement
topic, never blocks past 7 days, and a restart replays it all and attaches."""

from __future__ import annotations

import collections
import json
import subprocess
import time

import orjson
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from xdpwatch import schemas
from xdpwatch.kafka.read import Reader

from .env import NOBODY_MAC, consume_all
from .procs import XDPWATCH, ProducerProc

pytestmark = pytest.mark.e2e

FLOOD = 20_000
CAPACITY = 16384  # bpf/config.h BLOCKLIST_SIZE
WEEK = 7 * 86400
DECISIONS = ("block_applied", "command_rejected")


def command(cid: str, prefix: str, at: str, ttl_s: int = 3600) -> bytes:
    return orjson.dumps({"@timestamp": at, "command": {"id": cid, "action": "block", "prefix": prefix,
                                                       "ttl_s": ttl_s, "issued_by": "operator:attacker"}})


def host_ipv4() -> tuple[str, str]:
    """One global IPv4 address of this host (root namespace), with its interface."""
    for link in json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout):
        for a in link.get("addr_info", []):
            if a["family"] == "inet" and a.get("scope") == "global":
                return a["local"], link["ifname"]
    raise AssertionError("this host has no global IPv4 address: the test needs one to try blocking it")


class Tail:
    """A topic read from its beginning as records arrive (assign, no group)."""

    def __init__(self, bootstrap: str, topic: str):
        from confluent_kafka import OFFSET_BEGINNING

        self.reader = Reader({"bootstrap.servers": bootstrap}, "test-tail")
        self.reader.follow([(topic, p, OFFSET_BEGINNING) for p in self.reader.partitions(topic)])
        self.docs: list[dict] = []

    def until(self, done, timeout: float, what: str) -> list[dict]:
        """Read until `done(docs so far)`; fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not done(self.docs):
            assert time.monotonic() < deadline, f"{what}: not after {timeout}s ({len(self.docs)} records)"
            for m in self.reader.poll(1000, 0.2):
                assert m.error() is None, m.error()
                self.docs.append(orjson.loads(m.value()))
        return self.docs

    def close(self) -> None:
        self.reader.close()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_no_command_stops_the_enforcer_and_a_restart_attaches(testnet, broker_factory):
    from confluent_kafka import Producer

    net = testnet
    broker = broker_factory(value_schemas={f"xdpwatch.{s}": schemas.load(s) for s in schemas.names()})
    produce = ["--iface", net.iface, "--bootstrap-servers", broker.bootstrap, "--interval", "0.5", "--enforce"]
    host_ip, host_if = host_ipv4()
    broker_ip = broker.bootstrap.split(":")[0]

    with ProducerProc(*produce) as producer:
        producer.wait_attached()
        assert "never blocked (besides the allowlist)" in producer.stderr
        rss_before = rss_mb(producer.proc.pid)
        now = time.time()
        special = {
            "c-2099": command("c-2099", "203.0.113.1", "2099-01-01T00:00:00Z"),
            "c-9999": command("c-9999", "203.0.113.2", "9999-12-31T23:59:59Z"),
            "c-host": command("c-host", host_ip, schemas.format_time(now)),
            "c-broker": command("c-broker", broker_ip, schemas.format_time(now)),
            "c-week-ahead": command("c-week-ahead", "203.0.113.3", schemas.format_time(now + 120), ttl_s=WEEK),
        }
        # 198.19.0.0/16: the benchmarking range's upper half, which no test sends traffic from.
        flood = {f"flood-{i}": command(f"flood-{i}", f"198.19.{i >> 8}.{i & 255}", schemas.format_time(now)) for i in range(FLOOD)}
        sent = {**special, **flood}
        kafka = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20, "enable.idempotence": True})
        headers = schemas.headers("control")
        started = time.monotonic()
        for value in sent.values():
            kafka.produce("xdpwatch.control", value, headers=headers)
            kafka.poll(0)
        assert kafka.flush(60) == 0
        del kafka

        enforcement = Tail(broker.bootstrap, "xdpwatch.enforcement")
        enforcement.until(lambda docs: sum(d["event"]["action"] in DECISIONS for d in docs) >= len(sent), 300,
                          f"{len(sent)} decisions on xdpwatch.enforcement")
        handled_s = time.monotonic() - started
        enforcement.close()
        rss = rss_mb(producer.proc.pid)
        assert producer.proc.poll() is None, producer.stderr[-3000:]

        # Still attached and counting: frames from the (unblocked) client are counted exactly.
        frames = [bytes(Ether(src=net.cli_mac, dst=NOBODY_MAC) / IP(src=net.cli_ip, dst=net.srv_ip) /
                        UDP(sport=5000, dport=9) / b"alive")] * 25

        counts = Tail(broker.bootstrap, "xdpwatch.packet-counts")
        net.send_frames(frames)
        counts.until(lambda docs: sum(d["packets"]["total"] for d in docs) == 25, 30, "the 25 frames counted")
        counts.close()
        assert producer.stop() == 0, producer.stderr[-3000:]

    # Read again, whole, after the stop: no command got a second decision later.
    everything = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.enforcement", timeout=120)]
    decisions = [d for d in everything if d["event"]["action"] in DECISIONS]
    assert all(schemas.errors("enforcement", d) == [] for d in everything)
    per_command = collections.Counter(d["xdpwatch"]["enforcement"].get("command_id") for d in decisions)
    assert per_command == collections.Counter(list(sent)), "exactly one decision per command"
    by_id = {d["xdpwatch"]["enforcement"]["command_id"]: d for d in decisions}
    why = {cid: by_id[cid]["xdpwatch"]["enforcement"].get("rejection") for cid in sent}
    assert "issued in the future" in why["c-2099"] and "issued in the future" in why["c-9999"]
    assert why["c-host"].startswith(f"{host_ip} is an address of this host"), why["c-host"]
    assert why["c-broker"].startswith(f"{broker_ip} is the Kafka broker {broker.bootstrap}"), why["c-broker"]

    applied = [d for d in decisions if d["event"]["action"] == "block_applied"]
    full = [cid for cid, w in why.items() if w == f"blocklist full: {CAPACITY} entries (IPv4)"]
    assert len(applied) == CAPACITY and len(full) == FLOOD - (CAPACITY - 1)  # c-week-ahead took one place
    assert why["c-week-ahead"] is None
    week_ahead = schemas.parse_time(by_id["c-week-ahead"]["xdpwatch"]["enforcement"]["expires"])
    assert now + WEEK <= week_ahead < now + 120 + WEEK  # clamped to received + 7 days
    latest = max(schemas.parse_time(d["xdpwatch"]["enforcement"]["expires"]) for d in applied)
    assert latest <= time.time() + WEEK, "no block past 7 days"

    # A restart replays all 20,005 commands before attaching: the same blocks, then attached.
    with ProducerProc(*produce) as producer:
        producer.wait_attached()
        restored = next(line for line in producer.stderr_lines if "restored " in line)
        assert f"restored {CAPACITY} blocks from {len(sent)} commands" in restored, restored
        assert producer.stop() == 0, producer.stderr[-3000:]
    print(f"\n[hostile control] {len(sent)} commands decided in {handled_s:.1f}s (produce to last decision read "
          f"back), producer RSS {rss_before:.0f} MB before, {rss:.0f} MB after; restart: {restored.split('restored ', 1)[1]}")



def test_a_block_that_comes_to_cover_an_address_of_this_host_is_lifted(testnet, broker_factory):
    """The never-block list is read again while the producer runs: when this host takes an
    address inside a blocked prefix, the block is lifted (with the reason) within a refresh."""
    net = testnet
    broker = broker_factory(value_schemas={f"xdpwatch.{s}": schemas.load(s) for s in schemas.names()})
    bs = ["--bootstrap-servers", broker.bootstrap]
    with ProducerProc("--iface", net.iface, *bs, "--interval", "0.5", "--enforce") as producer:
        producer.wait_attached()
        r = subprocess.run([XDPWATCH, "block", "198.19.255.0/24", "--ttl", "1h", *bs], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        producer.wait_for_log("blocking 198.19.255.0/24", timeout=30)
        # Our own test interface (removed with the test network) takes an address in it.
        subprocess.run(["ip", "addr", "add", "198.19.255.1/32", "dev", net.iface], check=True)
        producer.wait_for_log("block removed 198.19.255.0/24", timeout=30)
        assert producer.stop() == 0, producer.stderr[-3000:]
    removed = [d for d in (orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.enforcement"))
               if d["event"]["action"] == "block_removed"]
    assert removed[0]["xdpwatch"]["enforcement"]["prefix"] == "198.19.255.0/24"
    assert removed[0]["event"]["reason"] == ("198.19.255.1 is an address of this host: a block overlapping it "
                                             "is lifted")
