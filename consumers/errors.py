"""Errors of the consumers: one line for the user, an exit code. Never printed here.
Their root is xdpwatch/errors.py, whose BrokerError is the Kafka wing's."""

from xdpwatch.errors import XdpwatchError


class ConsumerError(XdpwatchError):
    """The consumer cannot go on: a file it cannot write, rules it cannot read, ..."""


class UndeliveredError(ConsumerError):
    """Some messages could not be delivered to Kafka."""

    exit_code = 3


class SkippedInputError(ConsumerError):
    """The command finished, but some input was unreadable and skipped (each was reported)."""

    exit_code = 4
