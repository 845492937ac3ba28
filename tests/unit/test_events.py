"""Event shaping: every document the producer makes is valid against schemas/."""

from __future__ import annotations

import re

import pytest

from xdpwatch import schemas
from xdpwatch.producer.events import CLASSES, Clock, CounterDeltas, EventShaper, community_id
from xdpwatch.producer.flows import FlowReport
from xdpwatch.producer.records import NR_COUNTERS, CounterId, FlowKey, FlowValue, Handshake, tcp_flag_names


class FixedClock(Clock):
    def resync(self):
        self._offset = 1_700_000_000 * 10**9


def ipv4_key(client, cport, server, sport=22) -> FlowKey:
    k = FlowKey(family=4, proto=6, client_port=cport, server_port=sport)
    k.client_addr[:4] = list(map(int, client.split(".")))
    k.server_addr[:4] = list(map(int, server.split(".")))
    return k


def test_community_id_matches_the_spec_test_vector():
    # From the Community ID spec's baseline: TCP 128.232.110.120:34855 -> 66.35.250.204:80
    k = ipv4_key("128.232.110.120", 34855, "66.35.250.204", 80)
    assert community_id(k) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


def test_deltas_sum_to_the_cumulative_total():
    d = CounterDeltas([(0, 0)] * 2)
    seq = [[(5, 500), (1, 10)], [(5, 500), (3, 30)], [(12, 1200), (3, 30)]]
    deltas = [d.delta(c) for c in seq]
    assert deltas == [[(5, 500), (1, 10)], [(0, 0), (2, 20)], [(7, 700), (0, 0)]]
    assert [sum(x[i][0] for x in deltas) for i in range(2)] == [12, 3]


@pytest.fixture
def shaper():
    return EventShaper("eth0", FixedClock(), hostname="gw1")


def test_packet_counts_document(shaper):
    delta = [(i + 1, (i + 1) * 100) for i in range(NR_COUNTERS)]
    doc = shaper.packet_counts(10**18, 10**18 + 10**9, delta, evicted=2, active=5, final=True)
    assert schemas.errors("packet-counts", doc) == []
    assert doc["packets"]["ssh"] == CounterId.SSH + 1 and doc["bytes"]["total"] == 100
    assert doc["drops"] == {"ringbuf": CounterId.RINGBUF_DROPS + 1}
    assert doc["flows"] == {"started": CounterId.FLOWS_STARTED + 1, "evicted": 2, "active": 5}
    assert doc["interval"]["duration_ms"] == 1000.0 and doc["interval"]["final"] is True
    assert set(doc["packets"]) == set(CLASSES)
    assert schemas.key_of("packet-counts", doc) == b"gw1/eth0"


@pytest.mark.parametrize("action,reason", [("flow_start", None), ("flow_established", None), ("flow_update", None),
                                           ("flow_end", "fin"), ("flow_end", "rst"), ("flow_end", "idle"),
                                           ("flow_end", "shutdown"), ("flow_end", "evicted")])
def test_flow_documents_are_valid(shaper, action, reason):
    v = FlowValue(first_ns=5 * 10**9, last_ns=7 * 10**9, packets=12, bytes=3456, tcp_flags=0x1B,
                  directions=1, midstream=0)
    doc = shaper.flow(FlowReport(action, reason, ipv4_key("192.0.2.7", 51000, "192.0.2.1"), v))
    assert schemas.errors("ssh-flows", doc) == []
    assert schemas.key_of("ssh-flows", doc) == b"192.0.2.7"
    assert doc["source"] == {"ip": "192.0.2.7", "port": 51000, "packets": 12, "bytes": 3456}
    assert doc["destination"] == {"ip": "192.0.2.1", "port": 22, "packets": 0, "bytes": 0}
    assert doc["network"]["packets"] == 12 and doc["network"]["bytes"] == 3456
    assert doc["network"]["direction"] == "inbound"
    assert doc["tcp"]["flags"] == ["FIN", "SYN", "PSH", "ACK"]
    assert doc["event"]["duration"] == 2 * 10**9
    assert doc["event"]["start"] == "2023-11-14T22:13:25.000000Z"
    assert ("reason" in doc["event"]) == (action == "flow_end")
    assert doc["tcp"]["handshake"] == "none"


@pytest.mark.parametrize("state,name", [(Handshake.NONE, "none"), (Handshake.SYN, "syn"),
                                        (Handshake.SYN_ACK, "syn_ack"), (Handshake.COMPLETE, "complete")])
def test_flow_documents_say_how_far_the_handshake_went(shaper, state, name):
    from xdpwatch.producer.records import DIR_TO_CLIENT, DIR_TO_SERVER

    v = FlowValue(first_ns=5 * 10**9, last_ns=6 * 10**9, packets=3, bytes=200, tcp_flags=0x12, directions=1,
                  handshake=state, nsizes=6)
    v.server_sizes[:6] = [41, 1088, 1564, 44, 52, 52]
    banners = {DIR_TO_SERVER: b"SSH-2.0-x\r\n"}
    docs = {a: shaper.flow(FlowReport(a, "fin" if a == "flow_end" else None, ipv4_key("192.0.2.7", 1, "192.0.2.1"),
                                      v, banners))
            for a in ("flow_start", "flow_established", "flow_end")}
    for doc in docs.values():
        assert schemas.errors("ssh-flows", doc) == [] and doc["tcp"]["handshake"] == name
    est = docs["flow_established"]
    assert est["event"]["type"] == ["connection", "info"] and est["@timestamp"] == est["event"]["end"]
    assert "auth" not in est["ssh"] and docs["flow_end"]["ssh"]["auth"]["failures"] == 1


def test_the_most_failures_the_kernel_can_count_fit_the_schema(shaper):
    from xdpwatch.producer.records import SERVER_SIZES

    v = FlowValue(first_ns=1, last_ns=2, packets=30, bytes=3000, directions=1, nsizes=SERVER_SIZES,
                  handshake=Handshake.COMPLETE)
    v.server_sizes[:] = [41, 1088, 1564, 44] + [52] * (SERVER_SIZES - 4)
    doc = shaper.flow(FlowReport("flow_end", "fin", ipv4_key("192.0.2.7", 1, "192.0.2.1"), v, {2: b"SSH-2.0-y\r\n"}))
    assert doc["ssh"]["auth"]["failures"] == SERVER_SIZES - 5 == 7
    assert schemas.errors("ssh-flows", doc) == []
    doc["ssh"]["auth"]["failures"] = 8
    assert schemas.errors("ssh-flows", doc) != []


def test_ipv6_flow_and_ids(shaper):
    k = FlowKey(family=6, proto=6, client_port=40000, server_port=22)
    k.client_addr[:] = list(bytes.fromhex("20010db8000000000000000000000007"))
    k.server_addr[:] = list(bytes.fromhex("20010db8000000000000000000000001"))
    v = FlowValue(first_ns=1, last_ns=1, packets=1, bytes=74, tcp_flags=0x02, directions=3)
    ids = set()
    for _ in range(3):
        doc = shaper.flow(FlowReport("flow_start", None, k, v))
        ids.add(doc["event"]["id"])
    assert schemas.key_of("ssh-flows", doc) == b"2001:db8::7" and doc["network"]["type"] == "ipv6"
    assert doc["network"]["direction"] == "internal"
    assert schemas.errors("ssh-flows", doc) == []
    assert len(ids) == 3 and all(re.fullmatch(r"gw1-\w+-[0-9a-f]+-\d+", i) for i in ids)


def test_schema_rejects_what_consumers_could_not_use(shaper):
    v = FlowValue(first_ns=1, last_ns=1, packets=1, bytes=74, tcp_flags=0x02, directions=1)
    doc = shaper.flow(FlowReport("flow_update", None, ipv4_key("192.0.2.7", 1, "192.0.2.1"), v))
    doc["event"]["reason"] = "fin"  # only flow_end has a reason
    doc["source"]["ip"] = "not-an-ip"
    errs = schemas.errors("ssh-flows", doc)
    assert any(e.startswith("event") for e in errs) and any(e.startswith("source/ip") for e in errs)


def test_tcp_flag_names_in_header_order():
    assert tcp_flag_names(0xFF) == ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"]
    assert tcp_flag_names(0) == []


@pytest.mark.parametrize("raw,fields", [
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u5\r\n",
     {"banner": "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u5", "truncated": False, "protocol": "2.0",
      "software": "OpenSSH_9.2p1", "comments": "Debian-2+deb12u5"}),
    (b"SSH-2.0-dropbear_2022.83\n", {"banner": "SSH-2.0-dropbear_2022.83", "truncated": False, "protocol": "2.0",
                                    "software": "dropbear_2022.83"}),
    (b"SSH-1.99-Cisco-1.25\r\n", {"banner": "SSH-1.99-Cisco-1.25", "truncated": False, "protocol": "1.99",
                                 "software": "Cisco-1.25"}),
    (b"SSH-2.0-" + b"A" * 56, {"banner": "SSH-2.0-" + "A" * 56, "truncated": True, "protocol": "2.0",
                               "software": "A" * 56}),
    (b"SSH-2.0-\x1b[31mevil\x00\xff x\r\n", {"banner": "SSH-2.0-?[31mevil?? x", "truncated": False,
                                             "protocol": "2.0", "software": "?[31mevil??", "comments": "x"}),
    (b"SSH-", {"banner": "SSH-", "truncated": True, "protocol": ""}),
])
def test_ssh_identification(raw, fields):
    from xdpwatch.producer.ssh import ssh_identification

    assert ssh_identification(raw) == fields


def test_flow_documents_carry_both_banners(shaper):
    from xdpwatch.producer.records import DIR_TO_CLIENT, DIR_TO_SERVER

    v = FlowValue(first_ns=5 * 10**9, last_ns=7 * 10**9, packets=12, bytes=3456, directions=1)
    r = FlowReport("flow_end", "fin", ipv4_key("192.0.2.7", 51000, "192.0.2.1"), v,
                   {DIR_TO_SERVER: b"SSH-2.0-PuTTY_Release_0.81\r\n", DIR_TO_CLIENT: b"SSH-2.0-OpenSSH_9.6\r\n"})
    doc = shaper.flow(r)
    assert schemas.errors("ssh-flows", doc) == []
    assert doc["ssh"]["client"]["software"] == "PuTTY_Release_0.81" and doc["ssh"]["server"]["software"] == "OpenSSH_9.6"


# The server's payload sizes measured with OpenSSH 9.2 in the lab (chacha20-poly1305).
KEY_LOGIN = [41, 1088, 1564, 44, 52, 100, 28, 264, 192, 72, 124]
WRONG_PASSWORD = [41, 1088, 1564, 44, 52, 52]


@pytest.mark.parametrize("sizes,ended,expect", [
    (KEY_LOGIN, True, {"outcome": "success", "confidence": "high", "failures": 0}),
    (KEY_LOGIN[:7], False, {"outcome": "success", "confidence": "high", "failures": 0}),
    (WRONG_PASSWORD, True, {"outcome": "failure", "confidence": "medium", "failures": 1}),
    (WRONG_PASSWORD + [52, 52], True, {"outcome": "failure", "confidence": "medium", "failures": 3}),
    (WRONG_PASSWORD + [52, 28], True, {"outcome": "success", "confidence": "high", "failures": 2}),
    (WRONG_PASSWORD, False, {"outcome": "unknown", "failures": 1}),      # still going: may yet succeed
    ([41, 1088, 1564], True, {"outcome": "unknown", "failures": 0}),     # a scanner: key exchange only
    ([41, 1088, 1564, 44, 52, 100, 300, 400, 500, 600, 700, 800], True,
     {"outcome": "success", "confidence": "low", "failures": 0}),        # kept talking, nothing smaller
])
def test_login_outcome(sizes, ended, expect):
    from xdpwatch.producer.ssh import login_outcome

    assert login_outcome(sizes, ended) == expect
