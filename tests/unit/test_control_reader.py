"""ControlReader.catch_up alone (the Kafka wing's Reader.read, following), on a scripted
consumer: it streams, ends at each partition's end, and gives up only when no message came
for the stall timeout, however long the whole read takes. (Against the real broker:
tests/e2e/test_hostile_control.py.)"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError

from xdpwatch.errors import BrokerError
from xdpwatch.kafka.read import ControlReader, Reader


class Msg:
    def __init__(self, partition: int, value: bytes | None = None, eof: bool = False):
        self._p, self._v, self._eof = partition, value, eof

    def error(self):
        return KafkaError(KafkaError._PARTITION_EOF) if self._eof else None

    def value(self):
        return self._v

    def partition(self):
        return self._p

    def topic(self):
        return "xdpwatch.control"


class ScriptedConsumer:
    """consume() answers from a script: a list of messages, or a number of seconds of silence."""

    def __init__(self, script):
        self.script = list(script)

    def assign(self, partitions):
        pass

    resume = pause = unassign = assign

    def consume(self, n, timeout):
        if not self.script:
            time.sleep(timeout)
            return []
        step = self.script.pop(0)
        if isinstance(step, (int, float)):
            time.sleep(step)
            return []
        return step


def reader(script, partitions=(0,), stall_timeout=1.0) -> ControlReader:
    r = ControlReader.__new__(ControlReader)  # no broker: the consumer is scripted
    r.topic, r._partitions = "xdpwatch.control", list(partitions)
    r._reader = Reader.__new__(Reader)
    r._reader._c, r._reader.stall_timeout = ScriptedConsumer(script), stall_timeout
    return r


def test_slow_but_steady_progress_is_read_to_the_end():
    script = []
    for i in range(6):  # 6 x 0.3 s = longer than the stall timeout in total, never silent that long
        script += [0.3, [Msg(0, b"c%d" % i)]]
    script += [[Msg(1, b"other"), Msg(1, eof=True)], [Msg(0, eof=True)], [Msg(0, b"never read")]]
    got = list(reader(script, partitions=(0, 1), stall_timeout=0.5).catch_up())
    assert got == [b"c0", b"c1", b"c2", b"c3", b"c4", b"c5", b"other"]


def test_silence_before_the_end_is_a_broker_error():
    r = reader([[Msg(0, b"c0")], [Msg(1, b"c1"), Msg(1, eof=True)]], partitions=(0, 1))
    got = []
    with pytest.raises(BrokerError, match=r"reading the control topic xdpwatch.control stalled: no message for 1s "
                                          r"before its end \(partitions \[0\]\); is the broker up\?"):
        for v in r.catch_up():
            got.append(v)
    assert got == [b"c0", b"c1"]  # what came before is handed over first


def test_an_empty_topic_ends_at_once():
    assert list(reader([[Msg(0, eof=True)]]).catch_up()) == []
