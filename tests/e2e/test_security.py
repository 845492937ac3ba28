"""Secrets given with -X never show up: not in errors, logs or --help."""

from __future__ import annotations

import subprocess

import pytest

from .env import free_port
from .procs import XDPWATCH

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
