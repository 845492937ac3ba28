"""Secrets never show up: not in errors, logs or --help, wherever they were given (-X, a
--kafka-config file, XDPWATCH_KAFKA_* variables); from a file or the environment they reach
librdkafka without ever being on the command line. TLS to Kafka with hostname verification
left on: delivers to the right certificate, refuses another."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from xdpwatch.kafka.config import env_name

from ..sockets import listening
from .env import TlsFront, WireTap, consume_all, free_port, make_certs, wait_for
from .procs import XDPWATCH, ProducerProc

pytestmark = pytest.mark.e2e

SECRET = "Hunter2-s3cr3t-xdpwatch"
SASL_SETTINGS = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": "PLAIN", "sasl.username": "xdpwatch",
                 "sasl.password": SECRET}
SASL = [arg for k, v in SASL_SETTINGS.items() for arg in ("-X", f"{k}={v}")]


def secret_file(directory: Path) -> Path:
    f = directory / "kafka.properties"
    f.write_text("# xdpwatch's Kafka credentials\n" + "".join(f"{k}={v}\n" for k, v in SASL_SETTINGS.items()))
    f.chmod(0o600)
    return f


def without_xdpwatch_env(**extra) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("XDPWATCH_")}, **extra}


@pytest.mark.parametrize("argv", [
    ["produce", "--iface", "lo", "--log-level", "debug"],
    ["alert", "--output", "stdout", "--dead-letter", "/dev/null", "--log-level", "debug"],
    ["archive", "--dir", "/tmp/xw-secret-archive", "--dead-letter", "/dev/null", "--log-level", "debug"],
], ids=["produce", "alert", "archive"])
@pytest.mark.parametrize("given", ["-X", "file", "env"])
def test_password_never_printed(argv, given, tmp_path):
    port = free_port()  # nothing listens there: the command must fail, and say so
    how, env = {"-X": (SASL, {}), "file": (["--kafka-config", str(secret_file(tmp_path))], {}),
                "env": ([], {env_name(k): v for k, v in SASL_SETTINGS.items()})}[given]
    r = subprocess.run([XDPWATCH, *argv, "--bootstrap-servers", f"127.0.0.1:{port}", *how],
                       capture_output=True, text=True, timeout=60, env=without_xdpwatch_env(**env))
    assert r.returncode == 1, r.stderr
    assert "cannot reach Kafka" in r.stderr and "Traceback" not in r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert ("puts a secret on the command line" in r.stderr) == (given == "-X")


def test_password_not_in_help(tmp_path):
    env = without_xdpwatch_env(XDPWATCH_X=SECRET, XDPWATCH_KAFKA_SASL_PASSWORD=SECRET,
                               XDPWATCH_KAFKA_CONFIG=str(secret_file(tmp_path)))
    for cmd in ("produce", "alert", "archive", "replay", "block", "unblock", "blocks"):
        r = subprocess.run([XDPWATCH, cmd, "--help"], capture_output=True, text=True, env=env)
        assert r.returncode == 0 and "--kafka-config" in r.stdout and SECRET not in r.stdout


def test_settings_from_file_and_environment_reach_kafka_never_the_command_line(testnet, broker_factory, tmp_path):
    """The producer takes its settings from a 0600 file and the environment: the broker hears
    the file's client.id and the environment's client.software.name (through a tap in
    front of it); the secrets among them (inert with a plaintext listener: no SASL here)
    are not in the process's command line nor its logs, and the file cannot be read by
    others. Its metrics listen on loopback only."""
    tap = WireTap()
    broker = broker_factory(advertise=tap.port)
    tap.target = broker.port
    conf = tmp_path / "kafka.properties"
    conf.write_text(f"# Kafka settings\nclient.id=xw-from-file\nssl.key.password={SECRET}\n")
    conf.chmod(0o600)
    env = {"XDPWATCH_KAFKA_SASL_PASSWORD": SECRET + "-env", "XDPWATCH_KAFKA_CLIENT_SOFTWARE_NAME": "xw-from-env"}
    metrics = free_port()
    with ProducerProc("--iface", testnet.iface, "--bootstrap-servers", f"127.0.0.1:{tap.port}",
                      "--kafka-config", str(conf), "--interval", "0.3", "--metrics-port", str(metrics),
                      "--log-level", "debug", env=env) as producer:
        producer.wait_attached()
        pid = producer.proc.pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"--kafka-config" in cmdline and SECRET.encode() not in cmdline  # what `ps` shows every user
        assert os.stat(f"/proc/{pid}/environ").st_mode & 0o077 == 0  # the environment: owner (and root) only
        assert listening(metrics) == {"127.0.0.1"}
        wait_for(lambda: b"xw-from-file" in tap.heard and b"xw-from-env" in tap.heard, 30,
                 "the broker to hear the file's client.id and the environment's client.software.name")
        time.sleep(1)
        rc = producer.stop()
    assert rc == 0, producer.stderr
    assert SECRET not in producer.stderr and "puts a secret on the command line" not in producer.stderr
    delivered = producer.summary()["events"]["delivered"]
    assert delivered >= 3
    assert len(consume_all(broker.bootstrap, "xdpwatch.packet-counts")) == delivered
    tap.close()


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
    delivered = producer.summary()["events"]["delivered"]
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
