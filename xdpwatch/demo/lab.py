"""Real components on one machine, for `xdpwatch demo` and the end-to-end tests (which add
what only they need: tests/e2e/env.py): the embedded Kafka-protocol broker (Tansu), a network
of namespaces joined by a bridge (with the XDP interface in between), and an OpenSSH server. Everything created here is ours (named
xw<N>…, addresses in 198.18.0.0/15, the benchmarking range) and removed by `cleanup`/`stop`.
A missing prerequisite raises LabError saying to run `make setup`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xdpwatch.errors import XdpwatchError

VENV_BIN = Path(sys.executable).parent
TANSU = VENV_BIN / "tansu"


class LabError(XdpwatchError):
    """A prerequisite is missing, or a component did not start or answer in time."""


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The Prometheus metrics on 127.0.0.1:PORT as {'name{labels}': value}; {} while nothing
    answers there yet."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))}


def terminate(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """End `proc`: SIGTERM, then SIGKILL if it is still there after `timeout` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------- broker
class Broker:
    """Tansu on a loopback port (`port`, or a free one), its storage in memory: the demo's
    broker. The tests' (tests/e2e/env.py TestBroker) outlives its process and validates
    records; it changes `options`."""

    def __init__(self, port: int | None = None):
        if not TANSU.exists():
            raise LabError(f"{TANSU} missing: run `make setup`")
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="xw-broker-"))
        self.env = {k: v for k, v in os.environ.items() if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL")}
        self.argv = [str(TANSU), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}", *self.options()]
        self.log = open(self.dir / "broker.log", "ab")
        self.start()

    def options(self) -> list[str]:
        """Tansu's options after its listener: where clients are told to connect, its storage."""
        return ["--advertised-listener-url", f"tcp://127.0.0.1:{self.port}", "--storage-engine", "memory://tansu/"]

    def start(self) -> None:
        """(Re)start the broker process on its port."""
        self.proc = subprocess.Popen(self.argv, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_for(self._ready, 20, f"the broker on {self.bootstrap}")
        except LabError:
            self.stop()
            raise LabError(f"broker did not start:\n{(self.dir / 'broker.log').read_text()[-3000:]}")

    def stop_process(self) -> None:
        """Stop the broker process: SIGTERM, SIGKILL after 5 s."""
        terminate(self.proc)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise LabError(f"broker exited {self.proc.returncode}:\n{(self.dir / 'broker.log').read_text()[-3000:]}")
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=1)
            return True
        except Exception:
            return False

    def topics(self) -> set[str]:
        from confluent_kafka.admin import AdminClient

        return set(AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=5).topics)

    def stop(self) -> None:
        self.stop_process()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------- network
class Net:
    """client namespace ── veth ── [root: bridge] ── veth ── server namespace

    The root-side end of the client's veth (`iface`) is where the XDP program attaches: its
    ingress is everything the client sends. IPv6 is off and neighbours are static, so the
    only frames on it are the ones a test sends. Frames addressed to a MAC nobody owns are
    seen by XDP, forwarded by the bridge, and dropped unanswered by the server namespace.
    """

    def __init__(self, n: int | None = None) -> None:
        """`n` (0-250) numbers the names and the subnet 198.18.N.0/24; None picks a free one
        from 1-250. A given `n` first removes whatever a previous run left under its names."""
        if os.geteuid() != 0:
            raise LabError("this needs root (network namespaces, XDP): run it with sudo")
        if n is None:
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

    @staticmethod
    def link_stats(dev: str) -> dict[str, int]:
        info = json.loads(sh("ip", "-s", "-j", "link", "show", "dev", dev).stdout)[0]["stats64"]
        return {"rx_packets": info["rx"]["packets"], "rx_bytes": info["rx"]["bytes"],
                "tx_packets": info["tx"]["packets"], "tx_bytes": info["tx"]["bytes"]}


# ---------------------------------------------------------------------------- sshd
class Sshd:
    """A real OpenSSH server in the server namespace, with its own keys and config."""

    def __init__(self, net: Net):
        self.net = net
        self.dir = Path(tempfile.mkdtemp(prefix="xw-sshd-"))
        d = self.dir
        for tool in ("/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen", "/usr/bin/sshpass"):
            if not Path(tool).exists():
                raise LabError(f"{tool} missing: run `make setup`")
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
            raise LabError(f"sshd exited {self.proc.returncode}: {(self.dir / 'sshd.log').read_text()}")
        r = sh("ip", "netns", "exec", self.net.srv_ns, "ss", "-Hltn", f"src {self.net.srv_ip}:22", check=False)
        return bool(r.stdout.strip())

    def client_cmd(self, remote_command: str, connect_timeout: int | None = None) -> list[str]:
        """argv for a real ssh login; run it in the client namespace (net.exec). With
        `connect_timeout`, ssh gives up connecting after that many seconds."""
        timeout = ["-o", f"ConnectTimeout={connect_timeout}"] if connect_timeout else []
        return ["ssh", *timeout, "-i", str(self.dir / "client_key"), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                f"root@{self.net.srv_ip}", remote_command]

    def failed_login_cmd(self, password: str = "wrong", connect_timeout: int | None = None) -> list[str]:
        """argv for a real password login that fails (root may not log in with a password)."""
        timeout = ["-o", f"ConnectTimeout={connect_timeout}"] if connect_timeout else []
        return ["sshpass", "-p", password, "ssh", *timeout, "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "PubkeyAuthentication=no",
                "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
                f"root@{self.net.srv_ip}", "true"]

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
