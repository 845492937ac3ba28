"""Alert rules on crafted events with event time under our control, first as an attacker
would shape them: spoofed SYNs, invented sources and observers, counts meant to spin."""

from __future__ import annotations

import pytest

from xdpwatch import schemas
from xdpwatch.consumers.alert import DEFAULT_RULES, Detector, Limits, Rules, load_rules
from xdpwatch.consumers.errors import ConsumerError
from xdpwatch.schemas import format_time

T0 = 1_800_000_000.0
GW = {"hostname": "gw", "ingress": {"interface": {"name": "eth0"}}}


def flow(action: str, t: float, src: str, dst: str = "192.0.2.1", n: int = 0, handshake: str | None = None) -> dict:
    doc = {"@timestamp": format_time(t), "event": {"id": f"{action}-{src}-{dst}-{n}", "action": action},
           "source": {"ip": src, "port": 40000 + n}, "destination": {"ip": dst, "port": 22},
           "tcp": {"flags": ["SYN"]}, "observer": GW}
    if handshake is not None:
        doc["tcp"]["handshake"] = handshake
    return doc


def established(t: float, src: str, dst: str = "192.0.2.1", n: int = 0) -> dict:
    """A connection whose client completed the TCP handshake: its address is real."""
    return flow("flow_established", t, src, dst, n, "complete")


def syn(t: float, src: str, dst: str = "192.0.2.1", n: int = 0, handshake: str | None = "syn") -> dict:
    """The first packet of a flow: a SYN anyone can send with any source address."""
    return flow("flow_start", t, src, dst, n, handshake)


def flow_end(t: float, src: str, failures, outcome: str = "failure", n: int = 0,
             handshake: str | None = "complete") -> dict:
    doc = flow("flow_end", t, src, n=n, handshake=handshake)
    doc["ssh"] = {"auth": {"outcome": outcome, "failures": failures}}
    return doc


def counts(t: float, packets: int, drops: int = 0, n: int = 0, host: str = "gw") -> dict:
    return {"@timestamp": format_time(t), "event": {"id": f"pc-{host}-{n}"}, "interval": {"duration_ms": 1000.0},
            "packets": {"total": packets}, "drops": {"ringbuf": drops},
            "observer": {"hostname": host, "ingress": {"interface": {"name": "eth0"}}}}


def detect(events, rules: Rules | None = None, detector: Detector | None = None):
    alerts = []
    d = detector or Detector(rules or load_rules(""), alerts.append)
    if detector is not None:
        d.emit = alerts.append
    for stream, doc in events:
        d.on_event(stream, doc)
    for a in alerts:
        assert schemas.errors("alerts", a) == []
    return alerts


def named(alerts, rule: str) -> list[dict]:
    return [a for a in alerts if a["rule"]["name"] == rule]


# ---------------------------------------------------------------- what a spoofer can send
def test_spoofed_syns_never_raise_bruteforce_or_scan():
    # 100 SYNs "from" a victim, to 10 servers, in 10 s: a spoofer needs no handshake for that.
    ev = [("ssh-flows", syn(T0 + i / 10, "198.51.100.77", dst=f"192.0.2.{i % 10}", n=i)) for i in range(100)]
    # ... and flows first seen from the SSH-port side, or already under way, claim nothing.
    ev += [("ssh-flows", syn(T0 + 11 + i / 10, "198.51.100.78", n=i, handshake="none")) for i in range(100)]
    # ... and flow_ends of flows whose handshake never completed, with refused logins.
    ev += [("ssh-flows", flow_end(T0 + 12 + i, "198.51.100.79", 7, n=i, handshake=h))
           for i, h in enumerate(["none", "syn", "syn_ack", None] * 3)]
    alerts = detect(ev)
    assert named(alerts, "ssh_bruteforce") == named(alerts, "ssh_scan") == named(alerts, "ssh_auth_failures") == []
    assert [a["source"]["ip"] for a in alerts] == ["198.51.100.77"]  # only the SYN-flood rule, below


def test_syn_flood_alerts_on_claimed_sources_and_says_so():
    ev = [("ssh-flows", syn(T0 + i / 3, "198.51.100.77", n=i)) for i in range(30)]  # 30 in 10 s
    alerts = detect(ev)
    assert [a["rule"]["name"] for a in alerts] == ["ssh_syn_flood"]
    a = alerts[0]
    e = a["xdpwatch"]["evidence"]
    assert a["source"]["ip"] == "198.51.100.77" and e["count"] == 20 and e["window_s"] == 10
    assert e["first_event_id"] == "flow_start-198.51.100.77-192.0.2.1-0"
    assert e["last_event_id"] == "flow_start-198.51.100.77-192.0.2.1-19" and a["@timestamp"] == format_time(T0 + 19 / 3)
    assert "unverified" in a["message"] and "spoofed" in a["message"]
    assert a["threat"]["technique"]["id"].startswith("T1499") and a["event"]["severity"] < 70


def test_syn_flood_counts_old_producers_but_not_flows_seen_from_the_server_side():
    old = [("ssh-flows", syn(T0 + i / 3, "198.51.100.7", n=i, handshake=None)) for i in range(20)]
    assert [a["rule"]["name"] for a in detect(old)] == ["ssh_syn_flood"]
    server_side = [("ssh-flows", syn(T0 + i / 3, "198.51.100.7", n=i, handshake="none")) for i in range(30)]
    assert detect(server_side) == []
    slow = [("ssh-flows", syn(T0 + i, "198.51.100.7", n=i)) for i in range(30)]  # 30 in 30 s: never 20 in 10
    assert detect(slow) == []


def test_auth_failures_are_added_not_looped_and_bounded_by_the_contract():
    # A loop per unit spun forever on 2**62; the schema now caps failures at 7, and the rule
    # adds a flow's count at once: one flow with 7 refused logins, threshold 5: one alert.
    alerts = detect([("ssh-flows", flow_end(T0, "203.0.113.7", 7))])
    assert [(a["rule"]["name"], a["xdpwatch"]["evidence"]["count"]) for a in alerts] == [("ssh_auth_failures", 7)]
    # Whatever gets past a schema (2**62), it is one addition, and 3.0 (a valid JSON
    # Schema integer, which crashed range()) counts as 3.
    huge = detect([("ssh-flows", flow_end(T0, "203.0.113.7", 2**62))])
    assert [a["xdpwatch"]["evidence"]["count"] for a in huge] == [2**62]
    floats = detect([("ssh-flows", flow_end(T0 + i, "203.0.113.7", 3.0, n=i)) for i in range(2)])
    assert [a["xdpwatch"]["evidence"]["count"] for a in floats] == [6]


# ---------------------------------------------------------------- what real clients do
def test_bruteforce_fires_at_threshold_once_per_cooldown():
    ev = [("ssh-flows", established(T0 + i, "203.0.113.9", n=i)) for i in range(25)]
    brute = named(detect(ev), "ssh_bruteforce")
    assert len(brute) == 1
    a = brute[0]
    assert a["source"]["ip"] == "203.0.113.9" and a["xdpwatch"]["evidence"]["count"] == 10
    assert a["xdpwatch"]["evidence"]["first_event_id"] == "flow_established-203.0.113.9-192.0.2.1-0"
    assert a["xdpwatch"]["evidence"]["last_event_id"] == "flow_established-203.0.113.9-192.0.2.1-9"
    assert a["xdpwatch"]["evidence"]["first_seen"] == format_time(T0) and a["xdpwatch"]["evidence"]["destinations"] == ["192.0.2.1"]
    assert a["@timestamp"] == format_time(T0 + 9) and a["threat"]["technique"]["id"] == "T1110"
    # After the cooldown (300 s of event time) the same source can alert again.
    later = [("ssh-flows", established(T0 + 400 + i, "203.0.113.9", n=100 + i)) for i in range(10)]
    assert len(named(detect(ev + later), "ssh_bruteforce")) == 2


def test_established_and_its_flow_start_count_once():
    # A real client's flow gives flow_start then flow_established: 10 connections are 10, not 20.
    ev = []
    for i in range(9):
        ev += [("ssh-flows", syn(T0 + i, "203.0.113.9", n=i)), ("ssh-flows", established(T0 + i + 0.01, "203.0.113.9", n=i))]
    assert named(detect(ev), "ssh_bruteforce") == []
    assert len(named(detect(ev + [("ssh-flows", established(T0 + 10, "203.0.113.9", n=99))]), "ssh_bruteforce")) == 1


def test_bruteforce_window_uses_event_time_not_arrival():
    # 10 connections spread over 90 s: never 10 within 60 s.
    ev = [("ssh-flows", established(T0 + i * 10, "203.0.113.9", n=i)) for i in range(10)]
    assert named(detect(ev), "ssh_bruteforce") == []


def test_sources_are_independent():
    ev = [("ssh-flows", established(T0 + i, f"203.0.113.{i % 2}", n=i)) for i in range(18)]
    assert named(detect(ev), "ssh_bruteforce") == []


def test_scan_counts_distinct_destinations():
    ev = [("ssh-flows", established(T0 + i, "198.51.100.4", dst=f"192.0.2.{i % 6}", n=i)) for i in range(6)]
    scans = named(detect(ev), "ssh_scan")
    assert len(scans) == 1 and scans[0]["xdpwatch"]["evidence"]["count"] == 5
    assert scans[0]["xdpwatch"]["evidence"]["destinations"] == [f"192.0.2.{i}" for i in range(5)]
    assert scans[0]["xdpwatch"]["evidence"]["first_event_id"] == "flow_established-198.51.100.4-192.0.2.0-0"


def test_scan_keeps_the_most_recent_destinations_within_the_window():
    # 4 servers, then the same 4 again 50 s later, then a 5th at 70 s: the first visits left the
    # window, the repeats did not: 5 distinct destinations within 60 s, the evidence from the repeats.
    ev = [("ssh-flows", established(T0 + i, "198.51.100.4", dst=f"192.0.2.{i}", n=i)) for i in range(4)]
    ev += [("ssh-flows", established(T0 + 50 + i, "198.51.100.4", dst=f"192.0.2.{i}", n=10 + i)) for i in range(4)]
    ev += [("ssh-flows", established(T0 + 70, "198.51.100.4", dst="192.0.2.9", n=20))]
    scans = named(detect(ev), "ssh_scan")
    assert len(scans) == 1
    e = scans[0]["xdpwatch"]["evidence"]
    assert e["count"] == 5 and e["first_event_id"] == "flow_established-198.51.100.4-192.0.2.0-10"
    assert e["first_seen"] == format_time(T0 + 50) and e["last_seen"] == format_time(T0 + 70)


def test_auth_failures_count_refused_logins_not_connections():
    # Two connections with 3 refused passwords each: 6 failures, over the default 5, while
    # the connection-count rule (10 connections) stays quiet.
    ev = [("ssh-flows", flow_end(T0 + i, "203.0.113.7", 3, n=i)) for i in range(2)]
    ev += [("ssh-flows", flow_end(T0 + 3, "203.0.113.8", 0, "success", n=9))]  # a login: nothing
    alerts = detect(ev)
    assert [(a["rule"]["name"], a["source"]["ip"], a["xdpwatch"]["evidence"]["count"]) for a in alerts] == [
        ("ssh_auth_failures", "203.0.113.7", 6)]
    assert alerts[0]["threat"]["technique"]["id"] == "T1110"
    assert alerts[0]["xdpwatch"]["evidence"]["first_event_id"] == "flow_end-203.0.113.7-192.0.2.1-0"
    # Outside the window they do not add up.
    spread = [("ssh-flows", flow_end(T0 + i * 40, "203.0.113.7", 2, n=i)) for i in range(4)]
    assert detect(spread) == []


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


# ---------------------------------------------------------------- state an attack cannot grow
def test_windows_hold_what_rules_need_not_documents():
    d = Detector(load_rules(""), lambda a: None)
    for i in range(1000):
        d.on_event("ssh-flows", established(T0 + i / 100, "203.0.113.9", dst=f"192.0.2.{i % 200}", n=i))
        d.on_event("ssh-flows", syn(T0 + i / 100, "203.0.113.9", n=i))
        d.on_event("ssh-flows", flow_end(T0 + i / 100, "203.0.113.9", 1, n=i))
    s = d.sources["203.0.113.9"]
    assert len(s.brute) == 10 and len(s.scan) == 5 and len(s.syn) == 20 and len(s.fails) == 5
    for entries in (s.brute, s.scan, s.syn, s.fails):
        assert all(type(x) is tuple and len(x) == 3 and not any(isinstance(v, dict) for v in x) for x in entries)
    assert len({dst for _, _, dst in s.scan}) == 5  # distinct, the most recent ones
    assert [dst for _, _, dst in s.scan] == [f"192.0.2.{i % 200}" for i in range(995, 1000)]


def test_tracked_sources_are_capped_least_recently_active_first():
    rules = load_rules("[limits]\nmax_sources = 100\n")
    d = Detector(rules, lambda a: None)
    d.on_event("ssh-flows", established(T0, "203.0.113.9", n=0))  # a real client, active again below
    for i in range(1000):
        d.on_event("ssh-flows", syn(T0 + i / 1000, f"10.0.{i // 256}.{i % 256}", n=i))
        if i % 50 == 0:
            d.on_event("ssh-flows", established(T0 + i / 1000, "203.0.113.9", n=i + 1))
    assert len(d.sources) == 100 and d.evicted["sources"] == 901  # 1001 sources seen, 100 kept
    assert "203.0.113.9" in d.sources and "10.0.3.231" in d.sources and "10.0.0.0" not in d.sources
    assert len(d.sources["203.0.113.9"].brute) == 10  # the active source kept its window


def test_sources_silent_for_the_longest_window_are_forgotten():
    d = Detector(load_rules(""), lambda a: None)
    for i in range(1000):
        d.on_event("ssh-flows", syn(T0 + i / 1000, f"10.0.{i // 256}.{i % 256}", n=i))
    d.on_event("ssh-flows", established(T0 + 61, "203.0.113.9"))
    assert list(d.sources) == ["203.0.113.9"] and d.evicted["sources"] == 0  # expired, not evicted


def test_cooldowns_are_pruned_when_they_end():
    d = Detector(load_rules("[ssh_syn_flood]\nthreshold = 1\ncooldown = 5\n"), lambda a: None)
    for i in range(5000):
        d.on_event("ssh-flows", syn(T0 + i / 100, f"10.0.{i // 256}.{i % 256}", n=i))
    # 5000 alerts with a 5 s cooldown over 50 s: only those of the last few seconds are kept
    assert ("ssh_syn_flood", "10.0.19.135") in d.raised.times and ("ssh_syn_flood", "10.0.0.0") not in d.raised.times
    assert len(d.raised.times) <= 2 * 500 + 1024 and d.evicted["cooldowns"] == 0


def test_cooldowns_are_capped():
    d = Detector(load_rules("[ssh_syn_flood]\nthreshold = 1\n[limits]\nmax_sources = 100\n"), lambda a: None)
    for i in range(5000):
        d.on_event("ssh-flows", syn(T0 + i / 1000, f"10.0.{i // 256}.{i % 256}", n=i))
    assert len(d.raised.times) <= 2 * 100 + 1024 and d.evicted["cooldowns"] > 0


def test_observers_are_capped():
    d = Detector(load_rules("[limits]\nmax_observers = 10\n"), lambda a: None)
    for i in range(1000):
        d.on_event("packet-counts", counts(T0 + i, 1000, n=i, host=f"invented-{i}"))
    assert len(d.baselines) == 10 and d.evicted["observers"] == 990
    assert list(d.baselines)[-1] == "invented-999/eth0"


def test_same_events_give_the_same_alerts_and_ids_in_two_detectors():
    ev = [("ssh-flows", established(T0 + i, "203.0.113.9", dst=f"192.0.2.{i % 7}", n=i)) for i in range(12)]
    ev += [("ssh-flows", syn(T0 + i / 10, "198.51.100.77", n=i)) for i in range(40)]
    ev += [("ssh-flows", flow_end(T0 + i, "203.0.113.7", 2, n=i)) for i in range(5)]
    ev += [("packet-counts", counts(T0 + i, 10, drops=i % 2, n=i)) for i in range(5)]
    first, second = detect(ev), detect(ev)
    assert sorted({a["rule"]["name"] for a in first}) == ["kernel_drops", "ssh_auth_failures", "ssh_bruteforce",
                                                          "ssh_scan", "ssh_syn_flood"]
    assert first == second


def test_feeding_without_emitting_moves_the_same_state():
    # A restart can rebuild state from past events without raising their alerts again; the
    # cooldowns it rebuilds keep the next events quiet, as they would have been.
    ev = [("ssh-flows", established(T0 + i, "203.0.113.9", n=i)) for i in range(12)]
    quiet, loud = Detector(load_rules(""), lambda a: pytest.fail("emitted")), Detector(load_rules(""), lambda a: None)
    for stream, doc in ev:
        quiet.on_event(stream, doc, emit=False)
        loud.on_event(stream, doc)
    assert quiet.raised.times == loud.raised.times == {("ssh_bruteforce", "203.0.113.9"): [T0 + 9]}
    # ... and raises can be told from outside (e.g. read back from the alerts topic).
    fresh = Detector(load_rules(""), lambda a: None)
    fresh.raised.times[("ssh_bruteforce", "203.0.113.9")] = [T0 + 200]
    assert detect(ev, detector=fresh) == []


# ---------------------------------------------------------------- the rules file
def test_rules_file_parsing():
    assert load_rules(DEFAULT_RULES) == Rules()
    assert Rules().ssh_syn_flood.threshold == 20 and Rules().ssh_syn_flood.window == 10
    assert Rules().limits == Limits(max_sources=100_000, max_observers=10_000)
    r = load_rules("[ssh_bruteforce]\nthreshold = 3\n[traffic_spike]\nenabled = false\n[limits]\nmax_sources = 7\n")
    assert r.ssh_bruteforce.threshold == 3 and r.traffic_spike.enabled is False and r.ssh_scan == Rules().ssh_scan
    assert r.limits.max_sources == 7
    for bad, msg in [("[nope]\n", "unknown section"), ("[ssh_scan]\nthreshhold = 3\n", "no setting 'threshhold'"),
                     ("[ssh_scan]\nthreshold = -1\n", "non-negative"), ("[ssh_scan\n", "not valid TOML"),
                     ("[ssh_scan]\nenabled = 1\n", "bool"), ("[limits]\nmax_sources = 0\n", "at least 1"),
                     ("[ssh_syn_flood]\nthreshold = 2.5\n", "int")]:
        with pytest.raises(ConsumerError, match=msg):
            load_rules(bad)


def test_degenerate_settings_do_not_crash():
    # window 0 and threshold 0 are accepted settings: every event alerts (once per cooldown).
    rules = load_rules("".join(f"[{r}]\nthreshold = 0\nwindow = 0\ncooldown = 0\n"
                               for r in ("ssh_bruteforce", "ssh_scan", "ssh_auth_failures", "ssh_syn_flood")))
    ev = [("ssh-flows", established(T0, "203.0.113.9")), ("ssh-flows", syn(T0, "203.0.113.9")),
          ("ssh-flows", flow_end(T0, "203.0.113.9", 1))]
    assert sorted(a["rule"]["name"] for a in detect(ev, rules)) == ["ssh_auth_failures", "ssh_bruteforce",
                                                                    "ssh_scan", "ssh_syn_flood"]
    with pytest.raises(ConsumerError, match="must be a section"):
        load_rules("ssh_scan = 3\n")
    with pytest.raises(ConsumerError, match="non-negative"):
        load_rules("[ssh_scan]\nwindow = nan\n")
