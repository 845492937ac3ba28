"""Errors of the consumers: one line for the user, an exit code. Never printed here."""


class ConsumerError(Exception):
    exit_code = 1
