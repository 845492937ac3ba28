"""Typed errors of the producer (xdpwatch/errors.py is their root; its BrokerError is the
Kafka wing's). Each message says what went wrong and what to do; the CLI prints it as one
line and exits with `exit_code`. The library never prints or exits."""

from xdpwatch.errors import XdpwatchError


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


class DeliveryError(XdpwatchError):
    """Some events could not be delivered before shutdown."""

    exit_code = 3
