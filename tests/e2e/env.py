"""Real components for end-to-end tests: the lab (broker, namespaces, sshd, shared with
`xdpwatch demo`) plus what only tests need: a broker that outlives its process and checks
records against their schemas, exact frames, reading whole topics back, relays. Each fails
loudly when a prerequisite is missing (run `make setup`); none is ever skipped."""

from __future__ import annotations

import json
import os
import subprocess
import select
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from confluent_kafka import OFFSET_BEGINNING

from xdpwatch import schemas
from xdpwatch.kafka.read import Reader
from xdpwatch.demo.lab import (VENV_BIN, Broker, LabError, Net, Sshd, free_port, scrape, sh,  # noqa: F401
                               terminate, wait_for)

SENDFRAMES = Path(__file__).resolve().parent.parent / "sendframes.py"
NOBODY_MAC = "02:00:00:00:00:99"  # owned by no interface: frames are seen by XDP, answered by nobody
# `make test-soak` (XDPWATCH_SOAK=1) runs the long variants: longer outages, more crashes.
SOAK = os.environ.get("XDPWATCH_SOAK") == "1"


class TestBroker(Broker):
    """The lab's broker with what only tests need. With `durable`, its storage is an S3
    bucket served by a local moto server, so the broker process can be killed or stopped
    (`kill`, `stop_process`) and started again (`start`) on the same port with its topics,
    records and producer state intact. With `value_schemas`, it validates every record's
    value against the JSON Schema of its topic and refuses invalid ones. `advertise`: the
    port clients are told to use (a relay in front), if not its own; `port`: its own, if
    chosen already (the relay's target)."""

    __test__ = False

    def __init__(self, value_schemas: dict[str, dict] | None = None, durable: bool = False,
                 advertise: int | None = None, port: int | None = None):
        self.value_schemas, self.durable, self.advertise = value_schemas, durable, advertise
        self.s3: S3Server | None = None
        super().__init__(port)

    def options(self) -> list[str]:
        argv = ["--advertised-listener-url", f"tcp://127.0.0.1:{self.advertise or self.port}"]
        if self.value_schemas:
            registry = self.dir / "registry"
            registry.mkdir()
            for topic, schema in self.value_schemas.items():
                record = {"type": "object", "properties": {"value": schema}}
                (registry / f"{topic}.json").write_text(json.dumps(record))
            argv += ["--schema-registry", "file://./registry"]  # relative: absolute is misread
        if not self.durable:
            return argv + ["--storage-engine", "memory://tansu/"]
        self.s3 = S3Server(self.dir)
        self.env.update(self.s3.client_env())
        return argv + ["--storage-engine", "s3://tansu/"]

    def kill(self) -> None:
        """SIGKILL the broker process: a crash, as its clients see it."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        super().stop()
        if self.s3 is not None:
            self.s3.stop()


class S3Server:
    """moto's S3 server on a free loopback port with one bucket, `tansu`: storage for the
    broker that outlives the broker's process."""

    MOTO = VENV_BIN / "moto_server"

    def __init__(self, workdir: Path):
        if not self.MOTO.exists():
            raise LabError(f"{self.MOTO} missing: run `make setup`")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "s3.log", "wb")
        self.proc = subprocess.Popen([str(self.MOTO), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._create_bucket, 20, f"the S3 server on {self.url}", interval=0.2)
        except LabError:
            self.stop()
            raise

    def client_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT": self.url, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "xdpwatch",
                "AWS_SECRET_ACCESS_KEY": "xdpwatch", "AWS_DEFAULT_REGION": "eu-west-2"}

    def _create_bucket(self) -> bool:
        if self.proc.poll() is not None:
            raise LabError(f"moto_server exited {self.proc.returncode}:\n{Path(self.log.name).read_text()[-2000:]}")
        import urllib.request

        try:  # S3 CreateBucket: PUT /<bucket>
            urllib.request.urlopen(urllib.request.Request(f"{self.url}/tansu", method="PUT"), timeout=2)
            return True
        except OSError:
            return False

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def consume_all(bootstrap: str, topic: str, *, min_messages: int = 0, idle_timeout: float = 2.0,
                timeout: float = 30.0, conf: dict | None = None) -> list[Record]:
    """Every record of `topic` from the beginning (the Kafka wing's Reader: assigned, no group),
    ordered by partition and offset. Returns once `min_messages` arrived and nothing new came
    for `idle_timeout`."""
    reader = Reader({"bootstrap.servers": bootstrap, **(conf or {})}, "test")
    try:
        partitions = reader.partitions(topic)
        if not partitions:
            raise AssertionError(f"topic {topic} does not exist")
        reader.follow([(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            for m in reader.poll(500, 0.2):
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
        reader.close()


def documents(broker, topic, **kw):
    """Every message of `topic`: checked headers, decoded and schema-checked documents."""
    stream = topic.split(".", 1)[1]
    docs = []
    for m in consume_all(broker.bootstrap, topic, **kw):
        headers = dict(m.headers)
        assert headers["content-type"] == b"application/json"
        assert headers["schema-id"] == schemas.schema_id(stream).encode()
        doc = orjson.loads(m.value)
        assert schemas.errors(stream, doc) == []
        docs.append((m.key, doc))
    return docs


class TestNet(Net):
    __test__ = False

    def send_frames(self, frames: list[bytes]) -> None:
        payload = b"".join(struct.pack("!I", len(f)) + f for f in frames)
        r = self.exec(self.cli_ns, [sys.executable, str(SENDFRAMES), self.cli_if], input=payload,
                      capture_output=True, timeout=60)
        if r.returncode != 0 or int(r.stdout) != len(frames):
            raise AssertionError(f"sendframes: rc={r.returncode} out={r.stdout!r} err={r.stderr!r}")

    def ssh_syns(self, sports) -> list[bytes]:
        """One SYN to the server's port 22 from each source port: one new SSH flow each."""
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        head = Ether(src=self.cli_mac, dst=NOBODY_MAC) / IP(src=self.cli_ip, dst=self.srv_ip)
        return [bytes(head / TCP(sport=p, dport=22, flags="S")) for p in sports]


def make_certs(directory: Path, san: str) -> dict[str, Path]:
    """A throwaway CA and a server certificate signed by it for `san` ("IP:127.0.0.1" or
    "DNS:name"): PEM files ca.pem, server.pem, server.key in `directory`."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("xdpwatch test CA")).issuer_name(name("xdpwatch test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    kind, value = san.split(":", 1)
    alt = x509.IPAddress(ipaddress.ip_address(value)) if kind == "IP" else x509.DNSName(value)
    cert = (x509.CertificateBuilder().subject_name(name(value)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(cert.public_bytes(pem))
    files["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


class TlsFront:
    """A TLS listener on 127.0.0.1:`port` in front of a plaintext broker port (`target`, set
    once the broker runs): what a TLS-enabled Kafka looks like to a client. (Tansu 0.6.0
    takes --cert/--key but never uses them.)"""

    def __init__(self, cert: Path, key: Path):
        self.port = free_port()
        self.target: int | None = None
        self.handshake_errors: list[str] = []
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw) -> None:
        try:
            tls = self._ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.handshake_errors.append(str(e))
            raw.close()
            return
        up = socket.create_connection(("127.0.0.1", self.target))
        try:  # one thread per connection touches the TLS socket: OpenSSL objects are not shared
            while True:
                readable = [tls] if tls.pending() else select.select([tls, up], [], [])[0]
                for src, dst in ((tls, up), (up, tls)):
                    if src in readable:
                        data = src.recv(65536)
                        if not data:
                            return
                        dst.sendall(data)
        except OSError:
            pass
        finally:
            tls.close()
            up.close()

    def close(self) -> None:
        self._listener.close()


class WireTap:
    """A plaintext relay on 127.0.0.1:`port` to a broker port (`target`, set once the broker
    runs) that keeps every byte the clients sent: what the broker hears (client.id in each
    request header, client.software.name in ApiVersions)."""

    def __init__(self):
        self.port = free_port()
        self.target: int | None = None
        self.heard = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.target))
        except OSError:  # the broker is gone (the test is ending): the client sees a close
            client.close()
            return
        try:
            while True:
                for src in select.select([client, up], [], [])[0]:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is client:
                        with self._lock:
                            self.heard += data
                    (up if src is client else client).sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            up.close()

    def close(self) -> None:
        self._listener.close()


class Front:
    """A TCP relay on 127.0.0.1:`port` in front of the broker port `target` (start the broker
    on it with advertise=front.port, so that every connection comes through here).
    `mute()` swallows what the broker answers while its requests still reach it: produce
    requests are stored, their acknowledgements lost, as when a broker goes away mid-request;
    `unmute()` lets answers through again (connections muted meanwhile are cut)."""

    def __init__(self):
        self.port, self.target = free_port(), free_port()
        self.muted = False
        self._conns: list = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                up = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self._conns.append((client, up))
            for src, dst, answers in ((client, up, False), (up, client, True)):
                threading.Thread(target=self._pipe, args=(src, dst, answers), daemon=True).start()

    def _pipe(self, src, dst, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (answers and self.muted):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def mute(self) -> None:
        self.muted = True

    def unmute(self) -> None:
        """Answers flow again; connections that lost answers are closed (their clients reconnect)."""
        conns, self._conns = self._conns, []
        for client, up in conns:
            for s in (client, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.muted = False

    def close(self) -> None:
        self._listener.close()
        self.unmute()
