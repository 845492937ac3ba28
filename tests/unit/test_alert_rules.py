"""Alert rules on crafted events with event time under our control."""

from __future__ import annotations

import pytest

from xdpwatch import schemas
from xdpwatch.consumers.alert import DEFAULT_RULES, Detector, Rules, iso, load_rules
from xdpwatch.consumers.errors import ConsumerError

T0 = 1_800_000_000.0


def flow_start(t: float, src: str, dst: str = "192.0.2.1", n: int = 0) -> dict:
    return {"@timestamp": iso(t), "event": {"id": f"ev-{src}-{dst}-{n}", "action": "flow_start"},
            "source": {"ip": src, "port": 40000 + n}, "destination": {"ip": dst, "port": 22},
            "observer": {"hostname": "gw", "ingress": {"interface": {"name": "eth0"}}}}


def counts(t: float, packets: int, drops: int = 0, n: int = 0) -> dict:
    return {"@timestamp": iso(t), "event": {"id": f"pc-{n}"}, "interval": {"duration_ms": 1000.0},
            "packets": {"total": packets}, "drops": {"ringbuf": drops},
            "observer": {"hostname": "gw", "ingress": {"interface": {"name": "eth0"}}}}


def detect(events, rules: Rules | None = None):
    alerts = []
    d = Detector(rules or load_rules(""), alerts.append)
    for stream, doc in events:
        d.on_event(stream, doc)
    for a in alerts:
        assert schemas.errors("alerts", a) == []
    return alerts


def test_bruteforce_fires_at_threshold_once_per_cooldown():
    ev = [("ssh-flows", flow_start(T0 + i, "203.0.113.9", n=i)) for i in range(25)]
    alerts = detect(ev)
    brute = [a for a in alerts if a["rule"]["name"] == "ssh_bruteforce"]
    assert len(brute) == 1
    a = brute[0]
    assert a["source"]["ip"] == "203.0.113.9" and a["xdpwatch"]["evidence"]["count"] == 10
    assert a["xdpwatch"]["evidence"]["first_event_id"] == "ev-203.0.113.9-192.0.2.1-0"
    assert a["xdpwatch"]["evidence"]["last_event_id"] == "ev-203.0.113.9-192.0.2.1-9"
    assert a["@timestamp"] == iso(T0 + 9) and a["threat"]["technique"]["id"] == "T1110"
    # After the cooldown (300 s of event time) the same source can alert again.
    later = [("ssh-flows", flow_start(T0 + 400 + i, "203.0.113.9", n=100 + i)) for i in range(10)]
    assert len([a for a in detect(ev + later) if a["rule"]["name"] == "ssh_bruteforce"]) == 2


def test_bruteforce_window_uses_event_time_not_arrival():
    # 10 starts spread over 90 s: never 10 within 60 s.
    ev = [("ssh-flows", flow_start(T0 + i * 10, "203.0.113.9", n=i)) for i in range(10)]
    assert [a for a in detect(ev) if a["rule"]["name"] == "ssh_bruteforce"] == []


def test_sources_are_independent():
    ev = [("ssh-flows", flow_start(T0 + i, f"203.0.113.{i % 2}", n=i)) for i in range(18)]
    assert [a for a in detect(ev) if a["rule"]["name"] == "ssh_bruteforce"] == []


def test_scan_counts_distinct_destinations():
    ev = [("ssh-flows", flow_start(T0 + i, "198.51.100.4", dst=f"192.0.2.{i % 6}", n=i)) for i in range(6)]
    scans = [a for a in detect(ev) if a["rule"]["name"] == "ssh_scan"]
    assert len(scans) == 1 and scans[0]["xdpwatch"]["evidence"]["count"] == 5
    assert scans[0]["xdpwatch"]["evidence"]["destinations"] == [f"192.0.2.{i}" for i in range(5)]


def test_traffic_spike_after_warmup_only():
    base = [("packet-counts", counts(T0 + i, 1000 + (i % 3) * 10, n=i)) for i in range(30)]
    spike = [("packet-counts", counts(T0 + 30, 50_000, n=30))]
    assert detect(base) == []
    alerts = detect(base + spike)
    assert [a["rule"]["name"] for a in alerts] == ["traffic_spike"]
    ev = alerts[0]["xdpwatch"]["evidence"]
    assert ev["count"] == 50_000 and 1000 <= ev["baseline_mean"] <= 1020
    # During warm-up nothing fires, whatever the rate.
    assert detect(base[:5] + [("packet-counts", counts(T0 + 5, 50_000, n=99))]) == []


def test_kernel_drops_warn():
    alerts = detect([("packet-counts", counts(T0, 10, drops=7))])
    assert [(a["rule"]["name"], a["xdpwatch"]["evidence"]["count"]) for a in alerts] == [("kernel_drops", 7)]


def test_same_events_give_the_same_alert_ids():
    ev = [("ssh-flows", flow_start(T0 + i, "203.0.113.9", n=i)) for i in range(12)]
    assert [a["event"]["id"] for a in detect(ev)] == [a["event"]["id"] for a in detect(ev)]


def test_rules_file_parsing():
    assert load_rules(DEFAULT_RULES) == Rules()
    r = load_rules("[ssh_bruteforce]\nthreshold = 3\n[traffic_spike]\nenabled = false\n")
    assert r.ssh_bruteforce.threshold == 3 and r.traffic_spike.enabled is False and r.ssh_scan == Rules().ssh_scan
    for bad, msg in [("[nope]\n", "unknown section"), ("[ssh_scan]\nthreshhold = 3\n", "no setting 'threshhold'"),
                     ("[ssh_scan]\nthreshold = -1\n", "non-negative"), ("[ssh_scan\n", "not valid TOML"),
                     ("[ssh_scan]\nenabled = 1\n", "bool")]:
        with pytest.raises(ConsumerError, match=msg):
            load_rules(bad)


def flow_end(t: float, src: str, failures: int, outcome: str = "failure", n: int = 0) -> dict:
    return {"@timestamp": iso(t), "event": {"id": f"end-{src}-{n}", "action": "flow_end"},
            "source": {"ip": src, "port": 41000 + n}, "destination": {"ip": "192.0.2.1", "port": 22},
            "ssh": {"auth": {"outcome": outcome, "failures": failures}},
            "observer": {"hostname": "gw", "ingress": {"interface": {"name": "eth0"}}}}


def test_auth_failures_count_refused_logins_not_connections():
    # Two connections with 3 refused passwords each: 6 failures, over the default 5, while
    # the connection-count rule (10 starts) stays quiet.
    ev = [("ssh-flows", flow_end(T0 + i, "203.0.113.7", 3, n=i)) for i in range(2)]
    ev += [("ssh-flows", flow_end(T0 + 3, "203.0.113.8", 0, "success", n=9))]  # a login: nothing
    alerts = detect(ev)
    assert [(a["rule"]["name"], a["source"]["ip"], a["xdpwatch"]["evidence"]["count"]) for a in alerts] == [
        ("ssh_auth_failures", "203.0.113.7", 6)]
    assert alerts[0]["threat"]["technique"]["id"] == "T1110"
    # Outside the window they do not add up.
    spread = [("ssh-flows", flow_end(T0 + i * 40, "203.0.113.7", 2, n=i)) for i in range(4)]
    assert detect(spread) == []
