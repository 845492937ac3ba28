"""Errors of the consumers: one line for the user, an exit code. Never printed here."""


class ConsumerError(Exception):
    exit_code = 1


class UndeliveredError(ConsumerError):
    """Some messages could not be delivered to Kafka."""

    exit_code = 3


class SkippedInputError(ConsumerError):
    """The command finished, but some input was unreadable and skipped (each was reported)."""

    exit_code = 4
