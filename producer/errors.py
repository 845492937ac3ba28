"""Typed errors of the producer. Each message says what went wrong and what to do; the CLI
prints it as one line and exits with `exit_code`. The library never prints or exits."""


class XdpwatchError(Exception):
    exit_code = 1


class ConfigError(XdpwatchError):
    """An option value that cannot work."""


class InterfaceError(XdpwatchError):
    """The interface does not exist or cannot take our program."""


class PrivilegeError(XdpwatchError):
    """Not allowed to load or attach BPF programs."""


class BpfError(XdpwatchError):
    """The XDP program failed to compile, load, or be read."""


class AttachError(XdpwatchError):
    """Attaching to the interface failed (including: a program we do not own is there)."""


class BrokerError(XdpwatchError):
    """Kafka is unreachable, or topics cannot be created or used."""


class DeliveryError(XdpwatchError):
    """Some events could not be delivered before shutdown."""

    exit_code = 3
