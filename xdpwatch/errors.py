"""The root of every error xdpwatch raises for its user, and the errors of the Kafka wing.

Each message says what went wrong and what to do. The CLI prints it as one line
(`xdpwatch: error: ...`) and exits with its `exit_code`; the library never prints or exits.
Errors of one part live with it and subclass XdpwatchError: producer/errors.py,
consumers/errors.py, and MetricsPortError, DemoError and LabError next to what raises them.
"""


class XdpwatchError(Exception):
    """One line for the user; `exit_code` for the shell (1: a user, configuration or
    environment error)."""

    exit_code = 1


class KafkaConfigError(XdpwatchError):
    """Kafka settings that cannot be used: no brokers given, a settings file or variable that
    is refused, a setting librdkafka does not accept."""


class BrokerError(XdpwatchError):
    """Kafka cannot be reached, or a topic cannot be created, read or written."""
