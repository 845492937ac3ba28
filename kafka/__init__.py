"""The Kafka wing: what xdpwatch does with a Kafka client, for the producer and the consumers
alike (they never import each other; both import this). It imports only xdpwatch.schemas
and xdpwatch.errors.

- config: clients, and their librdkafka settings from --kafka-config, XDPWATCH_KAFKA_* and -X
- admin: reaching Kafka (the one "cannot reach Kafka" error), creating topics
- produce: the settings every producer relies on, the acknowledged producer
- read: reading topics by offset or from a time to their end, and on; the control reader;
  finding event ids already in Kafka
"""
