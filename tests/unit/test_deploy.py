"""docker-compose.yml and the Dockerfile agree with the CLI. No Docker engine runs here, so
the files are parsed and every command is checked against the real Typer app: options
exist and parse (with the service's environment), env vars are ones the command reads,
capabilities are the ones XDP needs (not privileged), the consumers run as the image's
non-root user with no capability and a read-only root filesystem, and the built package
carries the BPF sources and schemas the image needs."""

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
    assert p["cap_drop"] == ["ALL"]  # none of Docker's default set...
    assert set(p["cap_add"]) == {"BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"}  # ...only these
    assert p["user"] == "0:0"  # Docker grants added capabilities to root only
    assert "no-new-privileges:true" in p["security_opt"]
    assert not p.get("privileged")
    assert "XDPWATCH_METRICS_ADDRESS" not in env_of(p)  # host network: metrics stay on the host's loopback
    mounts = {v.split(":")[0]: v for v in p["volumes"]}
    assert mounts["/lib/modules"].endswith(":ro") and mounts["/usr/src"].endswith(":ro")
    assert env_of(p)["XDPWATCH_IFACE"] == "eth0"
    # The spool (events waiting for Kafka) outlives the container, where the producer looks.
    import inspect

    from xdpwatch.cli.produce import produce

    default = inspect.signature(produce).parameters["spool_dir"].default
    assert f"spool:{default}" in p["volumes"] and "spool" in COMPOSE["volumes"]


IMAGE_USER = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)


@pytest.mark.parametrize("name", ["alert", "archive"])
def test_consumers_run_unprivileged(name):
    c = SERVICES[name]
    assert c["user"] == IMAGE_USER[-1] == "10001:10001"  # not root, the image's own user
    assert c["cap_drop"] == ["ALL"] and not c.get("cap_add") and not c.get("privileged")
    assert c["read_only"] is True and c.get("tmpfs") == ["/tmp"]
    assert c["security_opt"] == ["no-new-privileges:true"]
    assert "network_mode" not in c  # the compose network only, no port on the host
    assert not c.get("ports")
    assert env_of(c)["XDPWATCH_METRICS_ADDRESS"] == "0.0.0.0"  # for a scraper on the compose network
    # Whatever it writes is a volume (read_only leaves only those and /tmp writable).
    for v in c.get("volumes", []):
        assert v.split(":")[0] in COMPOSE["volumes"], v


def test_image_user_and_archive_directory():
    """The image's user has the uid the consumers run as, and owns the archive directory
    (mode 0700, as the archiver requires) that the archive volume is mounted on."""
    assert re.search(r"groupadd --system --gid 10001 xdpwatch", DOCKERFILE)
    assert re.search(r"useradd --system --uid 10001 --gid 10001 .*--no-create-home", DOCKERFILE)
    archive_dir = env_of(SERVICES["archive"])["XDPWATCH_ARCHIVE_DIR"]
    assert re.search(rf"install -d -m 0700 -o 10001 -g 10001 {re.escape(archive_dir)}\b", DOCKERFILE)
    assert f"archive:{archive_dir}" in SERVICES["archive"]["volumes"]
    # The producer (root with no DAC_OVERRIDE) still passes through the parent directory.
    assert re.search(r"install -d -m 0755 /var/lib/xdpwatch\b", DOCKERFILE)
    # USER comes after every RUN: build steps as root, everything the image runs as 10001.
    assert DOCKERFILE.rindex("\nRUN ") < DOCKERFILE.rindex("\nUSER 10001:10001")


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
    bpf = [f"bpf/{p.name}" for p in (ROOT / "bpf").iterdir() if p.suffix in (".c", ".h")]
    assert "bpf/xdpwatch.bpf.c" in bpf and "bpf/parse.h" in bpf
    for f in (*bpf, "schemas/ssh-flow.v1.json",
              "schemas/packet-counts.v1.json", "schemas/alert.v1.json", "consumers/archive.py", "producer/loader.py"):
        assert f"xdpwatch/{f}" in names, f
    # Every module of every package folder (a subpackage missing from pyproject's list is not installed).
    import tomllib

    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    source = {f"{package.replace('.', '/')}/{p.relative_to(ROOT / folder)}"
              for package, folder in dirs.items() for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert {"xdpwatch/kafka/read.py", "xdpwatch/cli/produce.py", "xdpwatch/demo/traffic.py"} <= source
    assert source <= names, sorted(source - names)
