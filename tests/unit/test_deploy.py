"""docker-compose.yml and the Dockerfile agree with the CLI. No Docker engine runs here, so
the files are parsed and every command is checked against the real Typer app: options
exist and parse (with the service's environment), env vars are ones the command reads,
capabilities are the ones XDP needs (not privileged), and the built package carries the
BPF sources and schemas the image needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer.main
import yaml

from xdpwatch.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]
XDPWATCH_SERVICES = {name: s for name, s in SERVICES.items() if s.get("image", "").startswith("xdpwatch")}
CLI = typer.main.get_command(app)


def substitute(value) -> str:
    """Compose's ${VAR:-default} with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def env_of(service: dict) -> dict[str, str]:
    return {k: substitute(v) for k, v in (service.get("environment") or {}).items()}


def test_services_and_images():
    assert set(SERVICES) == {"kafka", "producer", "alert", "archive"}
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, one node
    assert set(XDPWATCH_SERVICES) == {"producer", "alert", "archive"}
    assert SERVICES["producer"]["build"] == "."
    assert {s["image"] for s in XDPWATCH_SERVICES.values()} == {"xdpwatch:latest"}
    assert [s["command"][0] for s in XDPWATCH_SERVICES.values()] == ["produce", "alert", "archive"]


@pytest.mark.parametrize("name", sorted(XDPWATCH_SERVICES))
def test_every_command_is_a_valid_invocation(name, monkeypatch):
    service = XDPWATCH_SERVICES[name]
    env = env_of(service)
    for k in [k for k in os.environ if k.startswith("XDPWATCH_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = service["command"]
    sub = CLI.commands.get(argv[0])
    assert sub is not None, f"{name}: no command {argv[0]!r}"
    ctx = sub.make_context(argv[0], list(argv[1:]))  # raises on an unknown option, bad value, missing required
    if argv[0] != "archive":
        assert ctx.params["bootstrap_servers"], name
    # Every XDPWATCH_* variable the service sets is one this command reads.
    readable = {p.envvar for p in sub.params if isinstance(p.envvar, str)}
    assert {k for k in env if k.startswith("XDPWATCH_")} <= readable, name
    # Metrics on the port the image exposes.
    assert ctx.params["metrics_port"] == int(re.search(r"^EXPOSE (\d+)", DOCKERFILE, re.M)[1])


def test_producer_has_what_xdp_needs_and_no_more():
    p = SERVICES["producer"]
    assert p["network_mode"] == "host"  # it watches a host interface
    assert set(p["cap_add"]) == {"BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"}
    assert not p.get("privileged")
    mounts = {v.split(":")[0]: v for v in p["volumes"]}
    assert mounts["/lib/modules"].endswith(":ro") and mounts["/usr/src"].endswith(":ro")
    assert env_of(p)["XDPWATCH_IFACE"] == "eth0"
    # The spool (events waiting for Kafka) outlives the container, where the producer looks.
    import inspect

    from xdpwatch import cli

    default = inspect.signature(cli.produce).parameters["spool_dir"].default
    assert f"spool:{default}" in p["volumes"] and "spool" in COMPOSE["volumes"]


def test_kafka_listeners_match_what_clients_use():
    env = SERVICES["kafka"]["environment"]
    advertised = dict(a.split("://") for a in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert env_of(SERVICES["producer"])["XDPWATCH_BOOTSTRAP_SERVERS"] == advertised["HOST"]  # host network
    assert "127.0.0.1:9092:9092" in SERVICES["kafka"]["ports"]
    for name in ("alert", "archive"):
        assert env_of(SERVICES[name])["XDPWATCH_BOOTSTRAP_SERVERS"] == advertised["INTERNAL"]
    assert "archive" in COMPOSE["volumes"]
    assert "archive:" + env_of(SERVICES["archive"])["XDPWATCH_ARCHIVE_DIR"] in SERVICES["archive"]["volumes"]


def test_dockerfile_installs_bcc_and_the_package():
    assert re.search(r"^FROM debian:bookworm", DOCKERFILE, re.M)  # the platform the tests run on
    for pkg in ("python3-bpfcc", "libbpfcc", "libbpf1", "zstd"):
        assert re.search(rf"\b{pkg}\b", DOCKERFILE), pkg
    assert "--system-site-packages" in DOCKERFILE  # bcc comes from Debian, not PyPI
    copied = set(re.findall(r"^COPY (\S+) \1$", DOCKERFILE, re.M))
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = set(re.findall(r'^"xdpwatch[.\w]*" = "(\w+)"$', pyproject, re.M))
    assert package_dirs and package_dirs <= copied
    assert re.search(r'^ENTRYPOINT \["xdpwatch"\]$', DOCKERFILE, re.M)


def test_built_package_carries_bpf_sources_and_schemas(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("xdpwatch-*.whl"))).namelist())
    for f in ("bpf/xdpwatch.bpf.c", "bpf/xdpwatch.h", "bpf/config.h", "schemas/ssh-flow.v1.json",
              "schemas/packet-counts.v1.json", "schemas/alert.v1.json", "consumers/archive.py", "producer/loader.py"):
        assert f"xdpwatch/{f}" in names, f
