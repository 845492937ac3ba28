"""The never-block list's sources: /proc/net text as the kernel writes it (samples from real
hosts), and the Kafka brokers' names."""

from __future__ import annotations

import ipaddress

import pytest

from xdpwatch.producer.hostnet import (Protected, broker_protected, host_protected, parse_fib_trie, parse_if_inet6,
                                       parse_ipv6_route, parse_route, split_server)

# A host with eth0 (192.0.2.2/24 and a secondary 192.0.2.77), docker0 (172.17.0.1/16) and a
# /32 on a dummy interface (no link route names it).
FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.2
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 172.17.0.0/16 2 0 2
        |-- 172.17.0.1
           /32 host LOCAL
        |-- 172.17.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.77
           /32 host LOCAL tos=0
        |-- 192.0.2.255
           /32 link BROADCAST
     |-- 203.0.113.200
        /32 host LOCAL
"""
ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth0\t0000000A\t0A0200C0\t0003\t0\t0\t0\t000000FF\t0\t0\t0
"""
IF_INET6 = """\
fd000000000000000000000000000002 04 40 00 82     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""
IPV6_ROUTE = """\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000009 00000400 00000002 00000000 00000003     wlan0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
"""

net = ipaddress.ip_network


def test_fib_trie_local_entries_in_both_tables_once():
    assert parse_fib_trie(FIB_TRIE) == {net("127.0.0.0/8"), net("127.0.0.1/32"), net("172.17.0.1/32"),
                                        net("192.0.2.2/32"), net("192.0.2.77/32"), net("203.0.113.200/32")}


def test_route_link_routes_and_default_gateway():
    links, gateways = parse_route(ROUTE)
    assert links == [(net("192.0.2.0/24"), "eth0"), (net("172.17.0.0/16"), "docker0")]
    assert gateways == [(ipaddress.ip_address("192.0.2.1"), "eth0")]  # 10.0.0.0/8 via .10 is not a default


def test_ipv6_addresses_and_default_gateways():
    assert parse_if_inet6(IF_INET6) == [(ipaddress.ip_address("fd00::2"), "eth0"),
                                        (ipaddress.ip_address("fe80::fc:ff:fe00:1"), "eth0"),
                                        (ipaddress.ip_address("::1"), "lo")]
    assert parse_ipv6_route(IPV6_ROUTE) == [(ipaddress.ip_address("fd00::1"), "eth0"),
                                            (ipaddress.ip_address("fe80::9"), "wlan0")]  # not the reject route


def test_host_protected_names_each_address(tmp_path):
    for name, text in (("fib_trie", FIB_TRIE), ("route", ROUTE), ("if_inet6", IF_INET6), ("ipv6_route", IPV6_ROUTE)):
        (tmp_path / name).write_text(text)
    got = {str(p) for p in host_protected(tmp_path)}
    assert got == {
        "127.0.0.0/8 is an address of this host", "127.0.0.1 is an address of this host",
        "172.17.0.1 is an address of this host (docker0)", "192.0.2.2 is an address of this host (eth0)",
        "192.0.2.77 is an address of this host (eth0)", "203.0.113.200 is an address of this host",
        "fd00::2 is an address of this host (eth0)", "fe80::fc:ff:fe00:1 is an address of this host (eth0)",
        "::1 is an address of this host (lo)", "192.0.2.1 is a default gateway (eth0)",
        "fd00::1 is a default gateway (eth0)", "fe80::9 is a default gateway (wlan0)"}
    # IPv6 off: no IPv6 files, still an answer; IPv4 files missing: an error, never an empty list.
    (tmp_path / "if_inet6").unlink()
    (tmp_path / "ipv6_route").unlink()
    assert all(p.net.version == 4 for p in host_protected(tmp_path))
    (tmp_path / "fib_trie").unlink()
    with pytest.raises(OSError):
        host_protected(tmp_path)


def test_this_hosts_own_proc_net_is_read():
    """The running kernel's files parse, and loopback is among this host's addresses."""
    got = host_protected()
    assert any(p.net == net("127.0.0.1/32") for p in got), got


@pytest.mark.parametrize("server,expected", [
    ("kafka:9092", ("kafka", 9092)), ("SSL://kafka.example:9093", ("kafka.example", 9093)),
    ("[::1]:9092", ("::1", 9092)), ("127.0.0.1", ("127.0.0.1", 9092)), (" b:1 ", ("b", 1))])
def test_bootstrap_servers(server, expected):
    assert split_server(server) == expected


def test_brokers_resolve_and_an_unknown_name_is_left_out(caplog):
    got = broker_protected(["127.0.0.1:9092", "[::1]:9093", "127.0.0.1:9092", "no-such-host.invalid:9092", "x:y"])
    assert got == [Protected(net("127.0.0.1/32"), "the Kafka broker 127.0.0.1:9092"),
                   Protected(net("::1/128"), "the Kafka broker [::1]:9093")]
    assert "no-such-host.invalid:9092" in caplog.text and "'x:y'" in caplog.text


def test_lines_that_do_not_parse_are_skipped():
    assert parse_if_inet6("garbage\nzz 01\n" + IF_INET6) == parse_if_inet6(IF_INET6)
    assert parse_route(ROUTE + "eth9\tzz\t0\n\n") == parse_route(ROUTE)
    assert parse_ipv6_route("x y\n" + IPV6_ROUTE) == parse_ipv6_route(IPV6_ROUTE)
    assert parse_fib_trie("  |-- 1.2.3.4\n     /99 host LOCAL\n" + FIB_TRIE) == parse_fib_trie(FIB_TRIE)
