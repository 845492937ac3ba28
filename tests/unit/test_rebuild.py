"""State rebuilt after a crash gives exactly the alerts of an uninterrupted run (the pure part of
exactly once; tests/e2e/test_exactly_once.py runs it through Kafka and kill -9).

A crash at any point of a stream: the consumer's committed offset C is behind it, and the
alerts published before the crash may be any prefix of the run's alerts from C on. The
restarted detector is fed the events before C without alerting, told which alerts are
already published, then runs on from C: what it publishes plus what was published must be
the uninterrupted run's alerts, each once, and it must hand on every alert raised from C on
(a block may be due for one already published)."""

from __future__ import annotations

import random

import pytest

from xdpwatch.consumers.alert import Detector, Raised, load_rules

from .test_alert_rules import T0, counts, established, flow_end, syn

ROUNDS = 25  # crash points per seed (1,200 passed once, locally)
RULES = load_rules("""
[ssh_bruteforce]
threshold = 6
window = 10
cooldown = 15
[ssh_scan]
threshold = 4
window = 30
cooldown = 40
[ssh_auth_failures]
threshold = 5
window = 20
cooldown = 25
[ssh_syn_flood]
threshold = 12
window = 10
cooldown = 30
[traffic_spike]
warmup = 10
min_rate = 100
cooldown = 5
""")


def stream(seed: int) -> list[tuple[str, dict]]:
    """Connections from 6 sources at uneven rates to a few servers, refused logins, and an
    interface whose rate jumps now and then: about 1,500 events over 100 s of event time."""
    rnd = random.Random(seed)
    out = []
    for i in range(6):
        src, t, n = f"203.0.113.{i + 1}", rnd.uniform(0, 2), 0
        while t < 100:
            dst = f"192.0.2.{1 + n % (2 + i)}"
            out.append((t, "ssh-flows", syn(T0 + t, src, dst, n=n)))
            out.append((t + 0.001, "ssh-flows", established(T0 + t + 0.001, src, dst, n=n)))
            if i % 2:
                out.append((t + 0.3, "ssh-flows", flow_end(T0 + t + 0.3, src, rnd.randint(0, 3), n=n)))
            t += rnd.expovariate(1 / (0.3 + 0.2 * i))
            n += 1
    for k in range(100):
        out.append((k + 0.5, "packet-counts", counts(T0 + k + 0.5, 3000 if k % 23 == 22 else 100 + k % 5, n=k)))
    return [(stream_, doc) for _, stream_, doc in sorted(out, key=lambda e: e[0])]


def run(events, start: int = 0, raised: Raised | None = None) -> tuple[list[dict], list[tuple[int, dict]]]:
    """(alerts raised from `start` on, with the index of the event that raised each) after
    feeding events[:start] without alerting."""
    out: list[tuple[int, dict]] = []
    d = Detector(RULES, lambda a: out.append((i, a)), raised)
    for stream_, doc in events[:start]:
        d.on_event(stream_, doc, emit=False, cooldowns=False)
    for i in range(start, len(events)):
        d.on_event(*events[i])
    return [a for _, a in out], out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_crash_anywhere_gives_the_alerts_of_an_uninterrupted_run(seed):
    events = stream(seed)
    reference, raised_at = run(events)
    assert {a["rule"]["name"] for a in reference} >= {"ssh_bruteforce", "ssh_scan", "ssh_auth_failures",
                                                       "ssh_syn_flood", "traffic_spike"}
    rnd = random.Random(seed)
    for _ in range(ROUNDS):
        committed = rnd.randrange(len(events))
        crash = rnd.randrange(committed, len(events) + 1)  # events handled before the crash
        raised = Raised()  # what the alerts topic holds: the alerts published before the crash
        for i, a in raised_at:
            if i < crash:
                raised.add_published(a)
        again, _ = run(events, committed, raised)
        fresh = [a for a in again if a["event"]["id"] not in raised.published]
        assert [a["event"]["id"] for a in reference if a["event"]["id"] in raised.published] + \
            [a["event"]["id"] for a in fresh] == [a["event"]["id"] for a in reference], (committed, crash)
        # Every alert of the run raised from C on is raised again and handed on, published or not.
        assert [a["event"]["id"] for a in again] == [a["event"]["id"] for i, a in raised_at if i >= committed]


def test_without_the_published_alerts_the_cooldowns_come_from_the_replay():
    """Output to stdout or a file (nothing to read back): the replay starts the cooldowns, so
    a restart right after an alert does not raise it again (at least once in general)."""
    events = stream(4)
    reference, raised_at = run(events)
    i, first = raised_at[0]
    d = Detector(RULES, (out := []).append)
    for stream_, doc in events[:i + 1]:
        d.on_event(stream_, doc, emit=False, cooldowns=True)
    for stream_, doc in events[i + 1:]:
        d.on_event(stream_, doc)
    assert first["event"]["id"] not in {a["event"]["id"] for a in out}
