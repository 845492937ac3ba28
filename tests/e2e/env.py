"""Real components for end-to-end tests: a Kafka-protocol broker, a test network made of
namespaces we create, and an OpenSSH server. Each fails loudly when a prerequisite is
missing (run `make setup`); none is ever skipped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
TANSU = VENV_BIN / "tansu"
SENDFRAMES = Path(__file__).resolve().parent.parent / "sendframes.py"


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------- broker
class Broker:
    """Tansu on a free loopback port, in memory. With `value_schemas`, it validates every
    record's value against the JSON Schema of its topic and refuses invalid ones."""

    def __init__(self, value_schemas: dict[str, dict] | None = None):
        if not TANSU.exists():
            raise AssertionError(f"{TANSU} missing: run `make setup`")
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="xw-broker-"))
        argv = [str(TANSU), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}", "--storage-engine", "memory://tansu/"]
        if value_schemas:
            registry = self.dir / "registry"
            registry.mkdir()
            for topic, schema in value_schemas.items():
                record = {"type": "object", "properties": {"value": schema}}
                (registry / f"{topic}.json").write_text(json.dumps(record))
            argv += ["--schema-registry", "file://./registry"]  # relative: absolute is misread
        self.log = open(self.dir / "broker.log", "wb")
        env = {k: v for k, v in os.environ.items() if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL")}
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(self._ready, 20, f"the broker on {self.bootstrap}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"broker did not start:\n{(self.dir / 'broker.log').read_text()[-3000:]}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"broker exited {self.proc.returncode}:\n{(self.dir / 'broker.log').read_text()[-3000:]}")
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=1)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def consume_all(bootstrap: str, topic: str, *, min_messages: int = 0, idle_timeout: float = 2.0,
                timeout: float = 30.0) -> list[Record]:
    """Every record of `topic` from the beginning (assign, no group), ordered by partition and
    offset. Returns once `min_messages` arrived and nothing new came for `idle_timeout`."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "xw-test-reader", "enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise AssertionError(f"topic {topic}: {meta.error}")
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error():
                    raise AssertionError(f"consume {topic}: {m.error()}")
                out.append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or []))
                last_new = time.monotonic()
            if len(out) >= min_messages and time.monotonic() - last_new >= idle_timeout:
                break
        else:
            raise AssertionError(f"{topic}: {len(out)} messages after {timeout}s, expected at least {min_messages}")
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()


# ---------------------------------------------------------------------------- network
class TestNet:
    """client namespace ── veth ── [root: bridge] ── veth ── server namespace

    The root-side end of the client's veth (`iface`) is where the XDP program attaches: its
    ingress is everything the client sends. IPv6 is off and neighbours are static, so the
    only frames on it are the ones a test sends. Frames addressed to a MAC nobody owns are
    seen by XDP, forwarded by the bridge, and dropped unanswered by the server namespace.
    """

    __test__ = False

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise AssertionError("end-to-end tests need root (network namespaces, XDP)")
        n = os.getpid() % 250 + 1
        while Path(f"/sys/class/net/xwbr{n}").exists():
            n = n % 250 + 1
        self.n = n
        self.bridge, self.iface, self.srv_port_if = f"xwbr{n}", f"xwc{n}", f"xws{n}"
        self.cli_ns, self.srv_ns = f"xw{n}-cli", f"xw{n}-srv"
        self.cli_if = self.srv_if = "eth0"
        self.cli_ip, self.srv_ip = f"198.18.{n}.2", f"198.18.{n}.1"
        self.cli_mac, self.srv_mac = f"02:00:00:{n:02x}:00:02", f"02:00:00:{n:02x}:00:01"
        self.cleanup()
        try:
            self._build()
        except BaseException:
            self.cleanup()
            raise

    def _build(self) -> None:
        ip = lambda *a: sh("ip", *a)  # noqa: E731
        ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self._no_ipv6(None, self.bridge)
        for ns, root_if, addr, mac in ((self.cli_ns, self.iface, self.cli_ip, self.cli_mac),
                                       (self.srv_ns, self.srv_port_if, self.srv_ip, self.srv_mac)):
            ip("netns", "add", ns)
            ip("link", "add", root_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._no_ipv6(None, root_if)
            self._no_ipv6(ns, "eth0")
            ip("link", "set", root_if, "master", self.bridge)
            ip("-n", ns, "link", "set", "eth0", "address", mac)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("link", "set", root_if, "up")
        ip("-n", self.cli_ns, "neigh", "replace", self.srv_ip, "lladdr", self.srv_mac, "dev", "eth0", "nud", "permanent")
        ip("-n", self.srv_ns, "neigh", "replace", self.cli_ip, "lladdr", self.cli_mac, "dev", "eth0", "nud", "permanent")
        ip("link", "set", self.bridge, "up")

    @staticmethod
    def _no_ipv6(ns: str | None, dev: str) -> None:
        prefix = ["ip", "netns", "exec", ns] if ns else []
        sh(*prefix, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")

    def cleanup(self) -> None:
        for ns in (self.cli_ns, self.srv_ns):
            sh("ip", "netns", "del", ns, check=False)
        for dev in (self.iface, self.srv_port_if, self.bridge):
            sh("ip", "link", "del", dev, check=False)

    def exec(self, ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)

    def send_frames(self, frames: list[bytes]) -> None:
        payload = b"".join(struct.pack("!I", len(f)) + f for f in frames)
        r = self.exec(self.cli_ns, [sys.executable, str(SENDFRAMES), self.cli_if], input=payload,
                      capture_output=True, timeout=60)
        if r.returncode != 0 or int(r.stdout) != len(frames):
            raise AssertionError(f"sendframes: rc={r.returncode} out={r.stdout!r} err={r.stderr!r}")

    @staticmethod
    def link_stats(dev: str) -> dict[str, int]:
        info = json.loads(sh("ip", "-s", "-j", "link", "show", "dev", dev).stdout)[0]["stats64"]
        return {"rx_packets": info["rx"]["packets"], "rx_bytes": info["rx"]["bytes"],
                "tx_packets": info["tx"]["packets"], "tx_bytes": info["tx"]["bytes"]}


# ---------------------------------------------------------------------------- sshd
class Sshd:
    """A real OpenSSH server in the server namespace, with its own keys and config."""

    def __init__(self, net: TestNet):
        self.net = net
        self.dir = Path(tempfile.mkdtemp(prefix="xw-sshd-"))
        d = self.dir
        for tool in ("/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen", "/usr/bin/sshpass"):
            if not Path(tool).exists():
                raise AssertionError(f"{tool} missing: run `make setup`")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key"))
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)
        (d / "sshd_config").write_text(f"""\
ListenAddress {net.srv_ip}:22
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel VERBOSE
""")
        self.proc = subprocess.Popen(["ip", "netns", "exec", net.srv_ns, "/usr/sbin/sshd", "-D", "-e",
                                      "-f", str(d / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "wb"))
        wait_for(self._listening, 10, f"sshd on {net.srv_ip}:22")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"sshd exited {self.proc.returncode}: {(self.dir / 'sshd.log').read_text()}")
        r = sh("ip", "netns", "exec", self.net.srv_ns, "ss", "-Hltn", f"src {self.net.srv_ip}:22", check=False)
        return bool(r.stdout.strip())

    def client_cmd(self, remote_command: str) -> list[str]:
        """argv for a real ssh login; run it in the client namespace (net.exec)."""
        return ["ssh", "-i", str(self.dir / "client_key"), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                f"root@{self.net.srv_ip}", remote_command]

    def failed_login_cmd(self, password: str = "wrong") -> list[str]:
        """argv for a real password login that fails (root may not log in with a password)."""
        return ["sshpass", "-p", password, "ssh", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "PubkeyAuthentication=no",
                "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
                f"root@{self.net.srv_ip}", "true"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
