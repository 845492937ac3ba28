"""Kafka clients and their settings.

`client` makes every confluent-kafka client of xdpwatch: its log goes through the
`librdkafka` logger (formatted and redacted like every log line), and a setting librdkafka
refuses is one KafkaConfigError.

The librdkafka settings of every command that talks to Kafka come from three places, each
overriding the one before:

1. `--kafka-config FILE`: a properties file like kcat's `-F` (`key=value` lines, `#`
   comments, blank lines). It may hold secrets, so it is refused unless it is a regular
   file that only its owner (this user or root) can read or write.
2. Environment variables `XDPWATCH_KAFKA_<PROPERTY>`: the property name upper-case with
   `.` written as `_` (`XDPWATCH_KAFKA_SASL_PASSWORD` is `sasl.password`). No librdkafka
   property that is set as text has `_` in its name except `log_level` and
   `enabled_events`, neither a secret: set those with `-X`. `XDPWATCH_KAFKA_CONFIG` is the
   file's path, not a property.
3. `-X key=value` on the command line, which every local user can read in `ps` and
   /proc/PID/cmdline: `resolve` names the secrets given there, so the CLI can warn.

The brokers come from --bootstrap-servers alone: the file and the environment may not set
them. Errors never quote a value or a line of the file (it may be a secret)."""

from __future__ import annotations

import collections
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from xdpwatch.errors import KafkaConfigError

ENV_PREFIX = "XDPWATCH_KAFKA_"
FILE_ENVVAR = "XDPWATCH_KAFKA_CONFIG"
MAX_FILE_BYTES = 1 << 20

# Properties whose value is a secret (librdkafka 2.16's sensitive properties, less the
# user name and file paths, plus the Java client's sasl.jaas.config, which librdkafka
# refuses but users paste). Any other key containing password, secret or passphrase
# counts too, so a property added later is covered.
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


def client(kind, conf: dict, errors: collections.deque | None = None):
    """A confluent-kafka `kind` (Producer, Consumer, AdminClient) on `conf`; the errors it
    reports are appended to `errors` when given (admin.reach quotes them). A setting
    librdkafka refuses raises KafkaConfigError."""
    from confluent_kafka import KafkaException

    if errors is not None:
        conf = {**conf, "error_cb": errors.append}
    try:
        return kind(conf, logger=LIBRDKAFKA_LOG)
    except KafkaException as e:
        raise KafkaConfigError(f"invalid Kafka setting: {e.args[0].str()}") from None


SECRET_PROPERTIES = frozenset({
    "sasl.password",
    "sasl.jaas.config",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "ssl.key.pem",
    "ssl.key.password",
    "ssl.keystore.password",
})
_SECRET_WORDS = ("password", "secret", "passphrase")
_BROKER_LIST = ("bootstrap.servers", "metadata.broker.list")


def is_secret(key: str) -> bool:
    key = key.lower()
    return key in SECRET_PROPERTIES or any(w in key for w in _SECRET_WORDS)


@dataclass
class KafkaSettings:
    conf: dict[str, str] = field(default_factory=dict)
    exposed: list[str] = field(default_factory=list)  # secret keys given with -X

    def secrets(self) -> list[str]:
        """The values of every secret setting, wherever it came from."""
        return [v for k, v in self.conf.items() if is_secret(k)]


def parse_properties(text: str, source: str) -> dict[str, str]:
    """`key=value` lines; `#` starts a comment line; whitespace around keys and values
    is ignored; the first `=` separates. Raises KafkaConfigError naming the line number."""
    conf = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise KafkaConfigError(f"{source} line {n}: expected key=value (a librdkafka setting)")
        conf[key.strip()] = value.strip()
    return conf


def read_properties(path: Path) -> dict[str, str]:
    """The settings in `path`, refused (KafkaConfigError) unless it is a regular file
    owned by this user or root with no permission for group or others."""
    try:  # O_NONBLOCK: a FIFO is refused below instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise KafkaConfigError(f"cannot read --kafka-config {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KafkaConfigError(f"--kafka-config {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KafkaConfigError(
                f"--kafka-config {path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}) and may "
                f"hold secrets: make it readable by its owner only (chmod 600 {path})")
        if st.st_uid not in (os.geteuid(), 0):
            raise KafkaConfigError(f"--kafka-config {path} is owned by uid {st.st_uid}, neither this user nor root: "
                                   "whoever owns it decides where xdpwatch connects")
        data = b""
        while len(data) <= MAX_FILE_BYTES and (chunk := os.read(fd, 1 << 16)):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise KafkaConfigError(f"--kafka-config {path} is larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise KafkaConfigError(f"--kafka-config {path} is not UTF-8 text (byte {e.start})") from None
    return parse_properties(text, f"--kafka-config {path}")


def from_environ(environ) -> dict[str, str]:
    """Settings from XDPWATCH_KAFKA_<PROPERTY> variables (see the module's docstring)."""
    return {name[len(ENV_PREFIX):].lower().replace("_", "."): value
            for name, value in environ.items()
            if name.startswith(ENV_PREFIX) and name != FILE_ENVVAR and len(name) > len(ENV_PREFIX)}


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """`-X key=value` options (as kcat takes them). Raises ValueError without quoting the
    argument (it may be a secret)."""
    conf = {}
    for i, p in enumerate(pairs, 1):
        k, sep, v = p.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"expects key=value (a librdkafka setting); -X number {i} is not "
                             "(its text is not shown: it may hold a secret)")
        conf[k.strip()] = v
    return conf


def resolve(pairs: list[str], path: Path | None, environ) -> KafkaSettings:
    """The file's settings, overridden by the environment's, overridden by -X."""
    from_file = read_properties(path) if path is not None else {}
    env = from_environ(environ)
    for where, conf in ((f"--kafka-config {path}", from_file), ("the environment", env)):
        if any(k in conf for k in _BROKER_LIST):
            raise KafkaConfigError(f"{where} sets the brokers: give them with --bootstrap-servers "
                                   "(or XDPWATCH_BOOTSTRAP_SERVERS) instead")
    cli = parse_pairs(pairs)
    return KafkaSettings({**from_file, **env, **cli}, [k for k in cli if is_secret(k)])


def env_name(key: str) -> str:
    """The environment variable that sets `key`."""
    return ENV_PREFIX + key.upper().replace(".", "_")
