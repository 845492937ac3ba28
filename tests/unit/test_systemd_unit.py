"""deploy/systemd: the unit passes `systemd-analyze verify` without a word about it, says what
the README promises (its user, exactly three capabilities, no new privileges, restarts,
the 0600 Kafka settings, a read-only system), and its example configuration is what
`xdpwatch produce` reads. tests/e2e/test_systemd.py installs and runs it."""

from __future__ import annotations

import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from xdpwatch.cli import app
from xdpwatch.cli.produce import produce
from xdpwatch.kafka.config import is_secret, parse_properties

from .. import systemd_unit

DEPLOY = systemd_unit.ROOT / "deploy/systemd"
UNIT = systemd_unit.parse(systemd_unit.UNIT.read_text())
SERVICE = systemd_unit.service()
ENV_EXAMPLE = (DEPLOY / "producer.env").read_text()
PRODUCE = typer.main.get_command(app).commands["produce"]


def unit_copy(tmp_path: Path, text: str) -> Path:
    """The unit with its ExecStart pointed at this venv's xdpwatch: `systemd-analyze` checks
    that the binary exists and is executable."""
    unit = tmp_path / systemd_unit.UNIT.name
    unit.write_text(text.replace("/opt/xdpwatch/bin/xdpwatch", str(Path(sys.executable).with_name("xdpwatch"))))
    return unit


def verify_copy(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit_copy(tmp_path, text))],
                          capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_says_nothing(tmp_path):
    r = verify_copy(tmp_path, systemd_unit.UNIT.read_text())
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr


def test_verify_would_catch_a_mistake(tmp_path):
    """The check above is not vacuous: a misspelt directive and a bad value are reported."""
    text = systemd_unit.UNIT.read_text()
    r = verify_copy(tmp_path, text.replace("ProtectSystem=", "ProtectSystm=").replace("Restart=on-failure", "Restart=sometimes"))
    assert "Unknown key 'ProtectSystm'" in r.stderr and "Failed to parse service restart" in r.stderr


def test_runs_as_its_own_system_user():
    assert SERVICE["User"] == SERVICE["Group"] == "xdpwatch"
    assert "DynamicUser" not in SERVICE  # the 0600 settings file must be owned by the user the producer runs as
    sysusers = [line.split() for line in (DEPLOY / "xdpwatch.sysusers").read_text().splitlines()
                if line and not line.startswith("#")]
    assert sysusers[0][:2] == ["u", "xdpwatch"] and sysusers[0][-1] == "/usr/sbin/nologin"


def test_exactly_three_capabilities_and_no_new_privileges():
    three = {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"}
    assert set(SERVICE["AmbientCapabilities"].split()) == three
    assert set(SERVICE["CapabilityBoundingSet"].split()) == three
    assert len(UNIT["Service"]["AmbientCapabilities"]) == len(UNIT["Service"]["CapabilityBoundingSet"]) == 1
    assert SERVICE["NoNewPrivileges"] == "yes"


def test_restarts_on_failure_within_limits():
    assert SERVICE["Restart"] == "on-failure"
    assert re.fullmatch(r"[1-9]\d*s", SERVICE["RestartSec"])
    assert SERVICE["RestartPreventExitStatus"] == "2"  # a bad option: restarting cannot help
    assert int(UNIT["Unit"]["StartLimitBurst"][-1]) >= 3 and int(UNIT["Unit"]["StartLimitIntervalSec"][-1]) > 0
    # systemd's stop timeout outlasts the producer's own wait for Kafka at shutdown.
    shutdown_timeout = inspect.signature(produce).parameters["shutdown_timeout"].default
    assert int(SERVICE["TimeoutStopSec"].rstrip("s")) > shutdown_timeout


def test_kafka_settings_come_from_the_0600_file_in_etc_xdpwatch():
    argv = shlex.split(SERVICE["ExecStart"])
    assert argv[:2] == ["/opt/xdpwatch/bin/xdpwatch", "produce"]
    assert argv[argv.index("--kafka-config") + 1] == "${CONFIGURATION_DIRECTORY}/kafka.properties"
    assert SERVICE["ConfigurationDirectory"] == "xdpwatch"  # ${CONFIGURATION_DIRECTORY} = /etc/xdpwatch
    assert SERVICE["EnvironmentFile"] == "/etc/xdpwatch/producer.env"
    installer = (systemd_unit.ROOT / "scripts/install-systemd.sh").read_text()
    assert 'install_once deploy/systemd/kafka.properties "$etc/xdpwatch/kafka.properties" 0600 "$uid" "$gid"' in installer
    # The example holds no brokers (refused there) and parses; secrets stay out of producer.env.
    settings = parse_properties((DEPLOY / "kafka.properties").read_text(), "kafka.properties")
    assert "bootstrap.servers" not in settings
    env = systemd_unit.env_file(ENV_EXAMPLE)
    assert not [k for k in env if k.startswith("XDPWATCH_KAFKA_") or is_secret(k.lower().replace("_", "."))]


def test_writes_only_its_state_directory():
    assert SERVICE["ProtectSystem"] == "strict" and SERVICE["ProtectHome"] == "yes" and SERVICE["PrivateTmp"] == "yes"
    assert SERVICE["StateDirectory"] == "xdpwatch" and SERVICE["StateDirectoryMode"] == "0700"
    argv = shlex.split(SERVICE["ExecStart"])
    assert argv[argv.index("--spool-dir") + 1] == "${STATE_DIRECTORY}/spool"
    assert "ReadWritePaths" not in SERVICE  # StateDirectory= is the one writable place
    # bcc reads the kernel headers under /usr/lib/modules, which ProtectKernelModules= hides.
    assert "ProtectKernelModules" not in SERVICE


def test_security_exposure(tmp_path):
    """systemd's own score of the sandbox (0 safest, 10 unprotected): 3.3 for this unit;
    what is left is what XDP needs (capabilities, the host's network, netlink)."""
    unit = unit_copy(tmp_path, systemd_unit.UNIT.read_text())
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)[1])
    assert exposure <= 3.3, r.stdout


def test_example_environment_is_what_produce_reads(monkeypatch):
    """Every variable of producer.env (commented examples included) is one `produce` reads,
    and the active ones make a valid invocation of the unit's ExecStart."""
    readable = {p.envvar for p in PRODUCE.params if isinstance(p.envvar, str)}
    named = set(re.findall(r"^#?(XDPWATCH_\w+)=", ENV_EXAMPLE, re.M))
    assert {"XDPWATCH_IFACE_PATTERN", "XDPWATCH_EXCLUDE_IFACE_PATTERN", "XDPWATCH_IFACE",
            "XDPWATCH_BOOTSTRAP_SERVERS"} <= named
    assert named <= readable, sorted(named - readable)
    for k in [k for k in os.environ if k.startswith("XDPWATCH_")]:
        monkeypatch.delenv(k)
    for k, v in systemd_unit.env_file(ENV_EXAMPLE).items():
        monkeypatch.setenv(k, v)
    argv = [w.replace("${CONFIGURATION_DIRECTORY}", "/etc/xdpwatch").replace("${STATE_DIRECTORY}", "/var/lib/xdpwatch")
            for w in shlex.split(SERVICE["ExecStart"])]
    ctx = PRODUCE.make_context("produce", argv[2:])
    assert ctx.params["iface_pattern"] == r"(eth|ens|enp|eno)[0-9a-z]+" and ctx.params["iface"] == []
    assert ctx.params["bootstrap_servers"]


@pytest.mark.parametrize("value, expected", [("'a\\d+$'", "a\\d+$"), ("plain", "plain"), ("'x y'", "x y")])
def test_env_file_reader(value, expected):
    assert systemd_unit.env_file(f"# c\nK={value}\n") == {"K": expected}
