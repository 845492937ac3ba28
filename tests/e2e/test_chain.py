"""The whole chain with real parts: failed password logins with a real ssh client against a
real sshd, seen by the XDP program → `xdpwatch produce` → Kafka → `xdpwatch alert` raises
the brute-force alert, while `xdpwatch archive` keeps every message. Then the archive is
replayed into fresh topics and a second alert consumer gives exactly the same alerts."""

from __future__ import annotations

import subprocess
import time

import orjson
import pytest

from xdpwatch import schemas
from xdpwatch.consumers.archive import list_segments

from .env import consume_all, sh
from .procs import XDPWATCH, ProducerProc, XdpwatchProc

pytestmark = pytest.mark.e2e

ATTEMPTS = 12  # the default rule fires at 10 completed handshakes (flow_established) from one source within 60 s
FAST_GROUP = ["-X", "session.timeout.ms=6000"]


def test_bruteforce_alert_archive_and_replay_give_the_same_alerts(testnet, sshd, broker_factory, tmp_path):
    net = testnet
    broker = broker_factory(value_schemas={f"xdpwatch.{s}": schemas.load(s) for s in schemas.names()})
    bs = ["--bootstrap-servers", broker.bootstrap]
    live_alerts, archive_dir = tmp_path / "alerts.jsonl", tmp_path / "archive"

    with ProducerProc("--iface", net.iface, *bs, "--interval", "1", "--flow-fin-linger", "0.5") as producer:
        producer.wait_attached()
        alert = XdpwatchProc("alert", *bs, "--from-beginning", "--output", str(live_alerts),
                             "--dead-letter", str(tmp_path / "dl-alert.jsonl"), "--exit-when-idle", "5", *FAST_GROUP)
        archiver = XdpwatchProc("archive", *bs, "--dir", str(archive_dir), "--roll-seconds", "2",
                                "--dead-letter", str(tmp_path / "dl-archive.jsonl"), *FAST_GROUP)
        with alert, archiver:
            for _ in range(ATTEMPTS):
                r = net.exec(net.cli_ns, sshd.failed_login_cmd(), capture_output=True, text=True, timeout=30)
                assert r.returncode == 255 and "Permission denied" in r.stderr, (r.returncode, r.stderr)
            time.sleep(2)  # FIN linger and sweep: every flow ends while the producer runs
            assert producer.stop() == 0, producer.stderr
            assert alert.proc.wait(60) == 0, alert.stderr     # exits 5 s after the last message
            assert archiver.stop() == 0, archiver.stderr

    failed = (sshd.dir / "sshd.log").read_text().count("Failed password for root")
    assert failed == ATTEMPTS

    # The live alert: exactly one brute-force alert, for the client namespace's address.
    alerts = [orjson.loads(line) for line in live_alerts.read_bytes().splitlines()]
    assert all(schemas.errors("alerts", a) == [] for a in alerts)
    brute = [a for a in alerts if a["rule"]["name"] == "ssh_bruteforce"]
    assert len(brute) == 1, alerts
    assert brute[0]["source"]["ip"] == net.cli_ip
    # The variant on refused logins (guessed per flow by the producer) fires too, once.
    refused = [a for a in alerts if a["rule"]["name"] == "ssh_auth_failures"]
    assert len(refused) == 1 and refused[0]["source"]["ip"] == net.cli_ip, alerts
    assert refused[0]["xdpwatch"]["evidence"]["count"] == 5  # the threshold, reached on the 5th
    flows = consume_all(broker.bootstrap, "xdpwatch.ssh-flows")
    starts = [orjson.loads(m.value) for m in flows if b'"action":"flow_start"' in m.value]
    assert len(starts) == ATTEMPTS and {d["source"]["ip"] for d in starts} == {net.cli_ip}
    print(f"\n[chain] {failed} failed logins -> {len(starts)} flow_start -> alert "
          f"{brute[0]['message']!r}; {len(alerts)} alerts in all")

    # The archive holds every message of both topics, in offset order, exactly once.
    segs = list_segments(archive_dir)
    for topic in ("xdpwatch.ssh-flows", "xdpwatch.packet-counts"):
        records = consume_all(broker.bootstrap, topic)
        for part in {r.partition for r in records}:
            lines = [line for s in segs if s.topic == topic and s.partition == part
                     for line in sh("zstdcat", str(s.path)).stdout.encode().splitlines()]
            assert lines == [r.value for r in records if r.partition == part], f"{topic}[{part}]"

    # Replay into replay.* and alert on that: the same alerts, byte for byte.
    r = subprocess.run([XDPWATCH, "replay", "--dir", str(archive_dir), "--output", "kafka", *bs],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([XDPWATCH, "alert", *bs, "--topic-prefix", "replay", "--from-beginning", "--output", "stdout",
                        "--group-id", "case-42", "--dead-letter", str(tmp_path / "dl-replay.jsonl"),
                        "--exit-when-idle", "4", *FAST_GROUP], capture_output=True, timeout=90)
    assert r.returncode == 0, r.stderr
    replayed = [orjson.loads(line) for line in r.stdout.splitlines()]
    key = lambda a: a["event"]["id"]  # noqa: E731
    assert sorted(replayed, key=key) == sorted(alerts, key=key)
