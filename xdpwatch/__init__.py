"""xdpwatch: network security telemetry from XDP into Kafka."""

__version__ = "0.1.0"
