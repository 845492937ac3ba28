from __future__ import annotations

import pytest

from .env import Sshd, TestBroker, TestNet


@pytest.fixture
def broker_factory():
    brokers: list[TestBroker] = []

    def make(**kw) -> TestBroker:
        brokers.append(TestBroker(**kw))
        return brokers[-1]

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture
def testnet():
    net = TestNet()
    yield net
    net.cleanup()


@pytest.fixture
def sshd(testnet):
    s = Sshd(testnet)
    yield s
    s.stop()
