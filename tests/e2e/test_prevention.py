"""The prevention loop with real parts: failed password logins from a namespace against a
real sshd → `xdpwatch produce --enforce` → Kafka → `xdpwatch alert --block-on
ssh_bruteforce` → block command → the producer puts the source in the kernel's blocklist →
further connections are dropped in XDP (sshd sees none; counters show the drops) → after
the TTL the source can connect again. Plus the safety rails: allowlist and policy."""

from __future__ import annotations

import subprocess
import time

import orjson
import pytest

from xdpwatch import schemas

from .env import consume_all, wait_for
from .procs import XDPWATCH, ProducerProc, XdpwatchProc

pytestmark = pytest.mark.e2e

RULES = """
[ssh_bruteforce]
threshold = 5
window = 60
cooldown = 600
"""
TTL_S = 15


def sshd_connections(sshd) -> int:
    return (sshd.dir / "sshd.log").read_text().count("Connection from ")


def attack_until_blocked(net, sshd, producer, attempts: int = 8) -> float:
    """Failed password logins until the producer blocks the source; returns the block's
    expiry (POSIX seconds, from the producer's log). The threshold is reached when an
    attempt's handshake completes, so the block lands in the middle of that attempt: its
    packets are dropped and it times out. (The test once read the block's log line only
    after such an attempt had waited out the whole TTL in SYN retries, and took an expired
    block for a failed drop: the expiry is now read from the block itself.)"""
    marker = f"blocking {net.cli_ip}/32 until "
    for _ in range(attempts):
        if any(marker in x for x in producer.stderr_lines):
            break
        try:
            r = net.exec(net.cli_ns, sshd.failed_login_cmd(connect_timeout=3), capture_output=True, text=True,
                         timeout=8)
            assert r.returncode == 255, r.stderr
        except subprocess.TimeoutExpired:
            pass  # cut off by the block
    producer.wait_for_log(marker, timeout=30)
    line = next(x for x in producer.stderr_lines if marker in x)
    return schemas.parse_time(line.split(marker, 1)[1].split()[0])


def test_bruteforce_is_blocked_in_the_kernel_until_the_ttl_passes(testnet, sshd, broker_factory, tmp_path):
    net = testnet
    broker = broker_factory(value_schemas={f"xdpwatch.{s}": schemas.load(s) for s in schemas.names()})
    bs = ["--bootstrap-servers", broker.bootstrap]
    (tmp_path / "rules.toml").write_text(RULES)
    login = sshd.client_cmd("echo in", connect_timeout=3)

    with ProducerProc("--iface", net.iface, *bs, "--interval", "0.5", "--flow-fin-linger", "0.5",
                      "--enforce", "--allow", "10.0.0.0/8") as producer, \
         XdpwatchProc("alert", *bs, "--from-beginning", "--output", "stdout", "--rules", str(tmp_path / "rules.toml"),
                      "--block-on", "ssh_bruteforce", "--block-ttl", f"{TTL_S}s",
                      "--dead-letter", str(tmp_path / "dl.jsonl"), "-X", "session.timeout.ms=6000") as alert:
        producer.wait_attached()
        assert "enforcement on (dropping)" in producer.stderr
        r = net.exec(net.cli_ns, login, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "in", r.stderr  # allowed before
        expires = attack_until_blocked(net, sshd, producer)

        # Blocked: the connection attempt times out and sshd never hears of it.
        before = sshd_connections(sshd)
        started = time.time()
        assert expires - started > 5, f"only {expires - started:.1f}s of the block left to check it"
        r = net.exec(net.cli_ns, login, capture_output=True, text=True, timeout=30)
        assert r.returncode == 255 and "timed out" in r.stderr, (r.returncode, r.stderr)
        assert time.time() < expires  # the attempt ended within the block
        assert sshd_connections(sshd) == before
        listed = subprocess.run([XDPWATCH, "blocks", *bs], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and f"{net.cli_ip}/32" in listed.stdout and "enforce" in listed.stdout, listed

    # Out of policy: never applied, reported.
        for prefix in ("10.1.2.3", "0.0.0.0/0"):
            r = subprocess.run([XDPWATCH, "block", prefix, "--ttl", "1h", *bs], capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stderr
        wait_for(lambda: producer.stderr.count("rejected") >= 2, 30, "the producer to reject two commands")

        # After the TTL, the source may connect again.
        producer.wait_for_log(f"block expired {net.cli_ip}/32", timeout=TTL_S + 30)
        assert time.time() >= expires
        r = net.exec(net.cli_ns, login, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "in", r.stderr
        time.sleep(1.5)  # an interval or two
        assert producer.stop() == 0, producer.stderr
        assert alert.stop() == 0, alert.stderr

    alerts = [orjson.loads(line) for line in alert.proc.stdout.read().splitlines()]
    enforcement = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.enforcement")]
    assert all(schemas.errors("enforcement", d) == [] for d in enforcement)
    by_action: dict[str, list] = {}
    for d in enforcement:
        by_action.setdefault(d["event"]["action"], []).append(d["xdpwatch"]["enforcement"])
    applied, expired = by_action["block_applied"], by_action["block_expired"]
    assert [e["prefix"] for e in applied] == [e["prefix"] for e in expired] == [f"{net.cli_ip}/32"]
    assert applied[0]["issued_by"] == "alert:ssh_bruteforce" and applied[0]["mode"] == "enforce"
    brute = [a for a in alerts if a["rule"]["name"] == "ssh_bruteforce"]
    assert len(brute) == 1 and applied[0]["alert_id"] == brute[0]["event"]["id"]
    rejected = sorted(e["rejection"] for e in by_action["command_rejected"])
    assert len(rejected) == 2 and "overlaps the allowlist entry 10.0.0.0/8" in rejected[1] \
        and "wider than the policy allows" in rejected[0]

    # The drops: the timed-out connection's SYN and its retries, counted on the entry and in
    # the intervals alike.
    dropped = expired[0]["packets"]
    counts = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.packet-counts")]
    assert dropped >= 1
    assert sum(d["enforcement"]["blocked"]["packets"] for d in counts) == dropped
    assert all(d["enforcement"]["mode"] == "enforce" for d in counts)
    print(f"\n[prevention] failed logins -> alert {brute[0]['event']['id']} -> block {applied[0]['prefix']} "
          f"for {TTL_S}s: {dropped} packets dropped in XDP, sshd saw no connection; then connected again")


def test_blocks_are_rebuilt_from_the_control_topic_and_dry_run_only_counts(testnet, sshd, broker_factory):
    """A block issued while no producer runs is applied by the next one to start (before it
    attaches), by a dry-run producer only counted, lifted by unblock, and an unblocked
    source stays unblocked across a restart."""
    net = testnet
    broker = broker_factory(value_schemas={f"xdpwatch.{s}": schemas.load(s) for s in schemas.names()})
    bs = ["--bootstrap-servers", broker.bootstrap]
    login = sshd.client_cmd("echo in", connect_timeout=3)

    def can_login() -> bool:
        r = net.exec(net.cli_ns, login, capture_output=True, text=True, timeout=30)
        return r.returncode == 0 and r.stdout.strip() == "in"

    def xdpwatch(*argv: str) -> str:
        r = subprocess.run([XDPWATCH, *argv, *bs], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "block 198.18" in xdpwatch("block", net.cli_ip, "--ttl", "5m", "--reason", "case 42")
    produce = ["--iface", net.iface, *bs, "--interval", "0.5"]

    with ProducerProc(*produce, "--dry-run") as producer:
        producer.wait_attached()
        assert f"blocking {net.cli_ip}/32" in producer.stderr  # replayed before attaching
        assert can_login()
        time.sleep(1)
        assert producer.stop() == 0
    counts = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "xdpwatch.packet-counts")]
    would = sum(d["enforcement"]["blocked"]["packets"] for d in counts if d["enforcement"]["mode"] == "dry_run")
    assert would > 10  # the whole session was counted, none dropped

    with ProducerProc(*produce, "--enforce") as producer:
        producer.wait_attached()
        assert not can_login()
        xdpwatch("unblock", net.cli_ip, "--reason", "cleared")
        producer.wait_for_log(f"block removed {net.cli_ip}/32", timeout=30)
        assert can_login()
        assert producer.stop() == 0

    with ProducerProc(*produce, "--enforce") as producer:
        producer.wait_attached()
        assert "restored 0 blocks from 2 commands" in producer.stderr and "blocking" not in producer.stderr
        assert can_login()
        assert producer.stop() == 0
    assert "no blocks in place" in subprocess.run([XDPWATCH, "blocks", *bs], capture_output=True, text=True,
                                                  timeout=60).stderr
