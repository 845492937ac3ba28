"""Reaching Kafka, and creating the topics xdpwatch writes to."""

from __future__ import annotations

import collections
import logging

from xdpwatch.errors import BrokerError
from xdpwatch.kafka.config import client

log = logging.getLogger(__name__)


def reach(kafka, conf: dict, errors, timeout: float = 15.0, topic: str | None = None):
    """The cluster's metadata (`kafka.list_topics(topic)`), or BrokerError: Kafka cannot be
    reached, in librdkafka's own words where it said more than 'transport failure' (a
    refused TLS certificate, a failed SASL login...): the error reports of `kafka`, made by
    config.client with `errors`."""
    from confluent_kafka import KafkaError, KafkaException

    try:
        return kafka.list_topics(topic, timeout=timeout)
    except KafkaException as e:
        kafka.poll(0)  # serves the error callbacks queued meanwhile
        cause = next((x.str() for x in errors if x.code() != KafkaError._ALL_BROKERS_DOWN), e.args[0].str())
        raise BrokerError(f"cannot reach Kafka at {conf['bootstrap.servers']} within {timeout:.0f}s ({cause}); "
                          "check --bootstrap-servers, that the broker is up, and the TLS/SASL settings (-X)") from None


def ensure_topics(conf: dict, topics: list[str], partitions: int = 3, replication: int = 1, timeout: float = 15.0,
                  single_partition: tuple[str, ...] = ()) -> None:
    """Fail fast when Kafka cannot be reached; create those of `topics` that are missing,
    with `partitions`, and those of `single_partition` with one (one order for all their
    messages). Existing topics are left as they are. BrokerError when one cannot be created."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    errors: collections.deque = collections.deque(maxlen=20)
    admin = client(AdminClient, conf, errors)
    existing = reach(admin, conf, errors, timeout).topics
    wanted = {t: partitions for t in topics} | {t: 1 for t in single_partition}
    missing = [t for t in wanted if t not in existing]
    if not missing:
        return
    futures = admin.create_topics([NewTopic(t, num_partitions=wanted[t], replication_factor=replication)
                                   for t in missing], request_timeout=timeout)
    for topic, fut in futures.items():
        try:
            fut.result()
            log.info("created topic %s (%d partitions)", topic, wanted[topic])
        except KafkaException as e:
            err = e.args[0]
            if err.name() != "TOPIC_ALREADY_EXISTS":
                raise BrokerError(f"topic {topic} does not exist and creating it failed ({err.str()}); "
                                  "create it yourself or let xdpwatch's user create topics") from None
