"""Secrets given with -X never show up: not in errors, logs or --help. TLS to Kafka with
hostname verification left on: delivers to the right certificate, refuses another."""

from __future__ import annotations

import subprocess
import time

import pytest

from .env import TlsFront, consume_all, free_port, make_certs
from .procs import XDPWATCH, ProducerProc

pytestmark = pytest.mark.e2e

SECRET = "Hunter2-s3cr3t-xdpwatch"
SASL = ["-X", "security.protocol=SASL_PLAINTEXT", "-X", "sasl.mechanisms=PLAIN",
        "-X", "sasl.username=xdpwatch", "-X", f"sasl.password={SECRET}"]


@pytest.mark.parametrize("argv", [
    ["produce", "--iface", "lo", "--log-level", "debug"],
    ["alert", "--output", "stdout", "--dead-letter", "/dev/null", "--log-level", "debug"],
    ["archive", "--dir", "/tmp/xw-secret-archive", "--dead-letter", "/dev/null", "--log-level", "debug"],
], ids=["produce", "alert", "archive"])
def test_password_never_printed(argv):
    port = free_port()  # nothing listens there: the command must fail, and say so
    r = subprocess.run([XDPWATCH, *argv, "--bootstrap-servers", f"127.0.0.1:{port}", *SASL],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "cannot reach Kafka" in r.stderr and "Traceback" not in r.stderr
    assert SECRET not in r.stdout + r.stderr


def test_password_not_in_help():
    for cmd in ("produce", "alert", "archive", "replay"):
        r = subprocess.run([XDPWATCH, cmd, "--help"], capture_output=True, text=True, env={"XDPWATCH_X": SECRET})
        assert r.returncode == 0 and SECRET not in r.stdout


@pytest.fixture
def tls_broker(tmp_path, broker_factory):
    """A broker reachable only through TLS (certificate for IP 127.0.0.1, from a test CA)."""
    def make(san: str):
        certs = make_certs(tmp_path, san)
        front = TlsFront(certs["cert"], certs["key"])
        broker = broker_factory(advertise=front.port)
        front.target = broker.port
        fronts.append(front)
        return front, broker, certs

    fronts: list[TlsFront] = []
    yield make
    for f in fronts:
        f.close()


def test_tls_with_hostname_verification_delivers(testnet, tls_broker):
    front, _, certs = tls_broker("IP:127.0.0.1")
    tls = ["-X", "security.protocol=SSL", "-X", f"ssl.ca.location={certs['ca']}"]
    front.handshake_errors.clear()  # the lab's plaintext readiness probe was refused: fine
    with ProducerProc("--iface", testnet.iface, "--bootstrap-servers", f"127.0.0.1:{front.port}",
                      "--interval", "0.3", *tls) as producer:
        producer.wait_attached()
        time.sleep(1)
        rc = producer.stop()
    assert rc == 0, producer.stderr
    delivered = int(producer.stderr.split("delivered ")[1].split(",")[0])
    assert delivered >= 3 and front.handshake_errors == []
    # What went through TLS is in the broker (read back through TLS too).
    records = consume_all(f"127.0.0.1:{front.port}", "xdpwatch.packet-counts",
                          conf={"security.protocol": "SSL", "ssl.ca.location": str(certs["ca"])})
    assert len(records) == delivered and front.handshake_errors == []


@pytest.mark.parametrize("command", ["produce", "alert", "archive"])
def test_tls_refuses_a_certificate_for_another_name(testnet, tls_broker, tmp_path, command):
    """Signed by the trusted CA but issued to another host: librdkafka's hostname check
    (left on) refuses it; the command says why and exits 1 (the producer before attaching)."""
    front, _, certs = tls_broker("DNS:kafka.elsewhere.invalid")
    args = {"produce": ["--iface", testnet.iface],
            "alert": ["--output", "stdout", "--dead-letter", "/dev/null"],
            "archive": ["--dir", str(tmp_path / "archive"), "--dead-letter", "/dev/null"]}[command]
    r = subprocess.run([XDPWATCH, command, *args, "--bootstrap-servers", f"127.0.0.1:{front.port}",
                        "-X", "security.protocol=SSL", "-X", f"ssl.ca.location={certs['ca']}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "cannot reach Kafka" in r.stderr and "Traceback" not in r.stderr
    assert "SSL handshake failed" in r.stderr and "certificate verify failed" in r.stderr  # says why
    assert front.handshake_errors, "the TLS handshake was attempted and failed"
