"""Kafka settings from a file, the environment and -X: parsing, precedence, the file's
permission checks, the warning for a secret on the command line, and secrets kept out of
errors and logs. Metrics listen on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from xdpwatch import observability
from xdpwatch.demo.lab import free_port

from ..sockets import listening
from xdpwatch.kafka.config import (SECRET_PROPERTIES, KafkaConfigError, env_name, from_environ, is_secret,
                                   parse_properties, read_properties, resolve)

XDPWATCH = [sys.executable, "-m", "xdpwatch"]
SECRET = "Hunter2-unit-s3cr3t"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDPWATCH_")}
    return {**env, **extra}


def test_properties_file_format_like_kcat():
    text = ("# a comment\n\n  security.protocol = SASL_SSL  \n"
            "sasl.password=a=b#c\n   # indented comment\nclient.id=x\r\n")
    assert parse_properties(text, "f") == {"security.protocol": "SASL_SSL", "sasl.password": "a=b#c", "client.id": "x"}


@pytest.mark.parametrize("line", [f"sasl.password {SECRET}", f"={SECRET}"])
def test_a_bad_line_is_named_by_number_never_quoted(line):
    with pytest.raises(KafkaConfigError) as e:
        parse_properties(f"client.id=x\n{line}\n", "--kafka-config f")
    assert str(e.value) == "--kafka-config f line 2: expected key=value (a librdkafka setting)"


def test_environment_names_map_to_properties():
    env = {"XDPWATCH_KAFKA_SASL_PASSWORD": SECRET, "XDPWATCH_KAFKA_SSL_KEY_PASSWORD": "k",
           "XDPWATCH_KAFKA_CONFIG": "/etc/xdpwatch/kafka.properties",  # the file's path, not a property
           "XDPWATCH_KAFKA_": "ignored", "XDPWATCH_BOOTSTRAP_SERVERS": "b:9092", "KAFKA_SASL_PASSWORD": "other"}
    assert from_environ(env) == {"sasl.password": SECRET, "ssl.key.password": "k"}
    assert env_name("sasl.oauthbearer.client.secret") == "XDPWATCH_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"


def test_precedence_file_then_environment_then_command_line(tmp_path):
    f = write(tmp_path / "k.properties", "client.id=file\nsasl.username=file\nsasl.password=file\n")
    env = {"XDPWATCH_KAFKA_SASL_USERNAME": "env", "XDPWATCH_KAFKA_SASL_PASSWORD": "env"}
    s = resolve(["sasl.password=cli"], f, env)
    assert s.conf == {"client.id": "file", "sasl.username": "env", "sasl.password": "cli"}
    assert s.exposed == ["sasl.password"]  # only what the command line carries
    s = resolve([], f, env)
    assert s.conf["sasl.password"] == "env" and s.exposed == [] and s.secrets() == ["env"]
    assert resolve(["a=1"], None, {}).conf == {"a": "1"}


@pytest.mark.parametrize("where", ["file", "env"])
def test_brokers_come_only_from_bootstrap_servers(tmp_path, where):
    f = write(tmp_path / "k", "bootstrap.servers=evil:9092\n") if where == "file" else None
    env = {"XDPWATCH_KAFKA_BOOTSTRAP_SERVERS": "evil:9092"} if where == "env" else {}
    with pytest.raises(KafkaConfigError, match="give them with --bootstrap-servers"):
        resolve([], f, env)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o610])
def test_a_file_open_to_group_or_others_is_refused(tmp_path, mode):
    f = write(tmp_path / "k", f"sasl.password={SECRET}\n", mode)
    with pytest.raises(KafkaConfigError) as e:
        read_properties(f)
    assert str(e.value) == (f"--kafka-config {f} is open to group or others (mode {mode:04o}) and may hold secrets: "
                            f"make it readable by its owner only (chmod 600 {f})")


def test_only_a_regular_file_of_ours_is_read(tmp_path):
    f = write(tmp_path / "k", f"sasl.password={SECRET}\n", 0o400)
    assert read_properties(f) == {"sasl.password": SECRET}
    (tmp_path / "link").symlink_to(f)  # a mounted secret is often a symlink: its target is checked
    assert read_properties(tmp_path / "link") == {"sasl.password": SECRET}
    os.mkfifo(tmp_path / "fifo", 0o600)  # refused at once, not waited on
    for path in (tmp_path, tmp_path / "fifo", Path("/dev/null")):
        with pytest.raises(KafkaConfigError, match="is not a regular file"):
            read_properties(path)
    with pytest.raises(KafkaConfigError, match="cannot read --kafka-config .*: No such file or directory"):
        read_properties(tmp_path / "missing")
    (tmp_path / "big").write_bytes(b"#" * ((1 << 20) + 1))
    (tmp_path / "big").chmod(0o600)
    with pytest.raises(KafkaConfigError, match="larger than 1 MiB"):
        read_properties(tmp_path / "big")
    (tmp_path / "bin").write_bytes(b"client.id=\xff\n")
    (tmp_path / "bin").chmod(0o600)
    with pytest.raises(KafkaConfigError, match="is not UTF-8 text"):
        read_properties(tmp_path / "bin")


def test_a_file_owned_by_another_user_is_refused(tmp_path):
    f = write(tmp_path / "k", "client.id=x\n")
    os.chown(f, 65534, 65534)
    with pytest.raises(KafkaConfigError, match="owned by uid 65534, neither this user nor root"):
        read_properties(f)


def test_secret_keys():
    for key in SECRET_PROPERTIES | {"ssl.truststore.password", "some.future.client.secret"}:
        assert is_secret(key), key
    for key in ("sasl.username", "security.protocol", "ssl.ca.location", "ssl.key.location", "client.id"):
        assert not is_secret(key), key


def _librdkafka_properties() -> dict[str, str]:
    """Every property of the librdkafka that confluent-kafka ships, with its type column."""
    import confluent_kafka

    libdir = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    lib = ctypes.CDLL(str(next(libdir.glob("librdkafka*.so*"))))
    libc = ctypes.CDLL("libc.so.6")
    libc.fdopen.restype = ctypes.c_void_p
    with tempfile.TemporaryFile("w+") as out:  # the table is larger than a pipe holds
        fp = libc.fdopen(os.dup(out.fileno()), b"w")
        lib.rd_kafka_conf_properties_show(ctypes.c_void_p(fp))
        libc.fclose(ctypes.c_void_p(fp))
        out.seek(0)
        table = out.read()
    props = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 6 and cells[0] and cells[0] != "Property" and not cells[0].startswith("-"):
            props[cells[0]] = cells[-1]
    return props


def test_environment_mapping_reaches_every_secret_property():
    """`_` in a variable stands for `.`: sound because no librdkafka property that is set
    as text has `_` in its name but log_level and enabled_events, neither a secret."""
    props = _librdkafka_properties()
    assert len(props) > 150 and "sasl.password" in props
    textual = {n for n, desc in props.items() if "_" in n and "Type: see dedicated API" not in desc
               and "Type: pointer" not in desc}
    assert textual == {"log_level", "enabled_events"}
    # Every secret we know is a property of this librdkafka (but the Java one it refuses).
    assert SECRET_PROPERTIES - {"sasl.jaas.config"} <= set(props)
    assert {n for n in props if is_secret(n) and "_" in n} <= {"ssl_key"}  # set through an API only


def test_secrets_are_blanked_out_of_logs_and_errors(capsys):
    observability.setup_logging("info")
    observability.hide([SECRET, "abc"])  # too short to hide: would blank out ordinary text
    logging.getLogger("librdkafka").warning("SASL failed for password %s", SECRET)
    err = capsys.readouterr().err
    assert SECRET not in err and "SASL failed for password [redacted]" in err
    assert observability.redact(f"x{SECRET}y abc") == "x[redacted]y abc"


def run(*args, env=None, timeout=60):
    return subprocess.run([*XDPWATCH, *args], capture_output=True, text=True, timeout=timeout, env=env or clean_env())


COMMANDS = ["produce", "alert", "archive", "replay", "block", "unblock", "blocks"]


def args_of(command: str, tmp_path: Path) -> list[str]:
    (tmp_path / "empty-archive").mkdir(exist_ok=True)
    return {"produce": ["--iface", "lo"], "archive": ["--dir", str(tmp_path / "a"), "--dead-letter", "/dev/null"],
            "alert": ["--output", "stdout", "--dead-letter", "/dev/null"],
            "replay": ["--dir", str(tmp_path / "empty-archive"), "--output", "kafka"], "block": ["192.0.2.1"],
            "unblock": ["192.0.2.1"]}.get(command, [])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_kafka_command_refuses_an_open_file_in_one_line(tmp_path, command):
    f = write(tmp_path / "kafka.properties", f"sasl.password={SECRET}\n", 0o644)
    r = run(command, *args_of(command, tmp_path), "--bootstrap-servers", "127.0.0.1:1", "--kafka-config", str(f))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (
        f"xdpwatch: error: --kafka-config {f} is open to group or others (mode 0644) and may hold secrets: "
        f"make it readable by its owner only (chmod 600 {f})")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_kafka_command_applies_file_and_environment(tmp_path, command):
    """A setting librdkafka does not know, from the file or the environment, reaches the
    Kafka client: it refuses it in one line (no traceback), and no secret is printed."""
    for file_text, env in (("no.such.property=1\n", {}), ("", {"XDPWATCH_KAFKA_NO_SUCH_PROPERTY": "1"})):
        f = write(tmp_path / "kafka.properties", f"sasl.password={SECRET}\n{file_text}")
        r = run(command, *args_of(command, tmp_path), "--bootstrap-servers", "127.0.0.1:1", "--kafka-config", str(f),
                env=clean_env(XDPWATCH_KAFKA_SSL_KEY_PASSWORD=SECRET + "-2", **env))
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == 'xdpwatch: error: invalid Kafka setting: No such configuration property: "no.such.property"'


def test_a_secret_on_the_command_line_gets_one_warning(tmp_path):
    # An unknown property makes the command stop right after reading its settings.
    r = run("blocks", "--bootstrap-servers", "127.0.0.1:1", "-X", "no.such.property=1",
            "-X", f"sasl.password={SECRET}", "-X", "client.id=fine")
    assert r.returncode == 1 and SECRET not in r.stderr
    warnings = [line for line in r.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "-X sasl.password puts a secret on the command line, where every local user can read it (ps, "
        "/proc/PID/cmdline): put it in a --kafka-config file (mode 0600) or in the environment variable "
        "XDPWATCH_KAFKA_SASL_PASSWORD"), r.stderr
    # The same secret from a file or the environment: no warning.
    f = write(tmp_path / "k", f"sasl.password={SECRET}\n")
    for how, env in ((["--kafka-config", str(f)], {}), ([], {"XDPWATCH_KAFKA_SASL_PASSWORD": SECRET})):
        r = run("blocks", "--bootstrap-servers", "127.0.0.1:1", "-X", "no.such.property=1", *how, env=clean_env(**env))
        assert r.returncode == 1 and "WARNING" not in r.stderr and SECRET not in r.stderr, r.stderr


def test_a_malformed_option_is_not_quoted():
    r = run("blocks", "--bootstrap-servers", "127.0.0.1:1", "-X", "client.id=x", "-X", f"sasl.password:{SECRET}")
    assert r.returncode == 2 and "-X number 2 is not" in r.stderr and SECRET not in r.stderr


@pytest.mark.parametrize("address,expected", [(None, {"127.0.0.1"}), ("0.0.0.0", {"0.0.0.0"})])
def test_metrics_listen_on_loopback_unless_told(tmp_path, address, expected):
    """The archiver serves metrics before it reaches Kafka (unreachable here: it keeps trying
    for its connection timeout), so its listening socket can be looked at meanwhile."""
    port = free_port()
    env = clean_env(**({"XDPWATCH_METRICS_ADDRESS": address} if address else {}))
    proc = subprocess.Popen([*XDPWATCH, "archive", "--dir", str(tmp_path / "a"), "--bootstrap-servers", "127.0.0.1:1",
                             "--dead-letter", str(tmp_path / "dl"), "--metrics-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not listening(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listening(port) == expected, proc.stderr.read1().decode() if proc.poll() is not None else ""
    finally:
        proc.kill()
        proc.wait()
