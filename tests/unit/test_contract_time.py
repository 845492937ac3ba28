"""The contract's date-times, written and read in one place (schemas): ISO 8601 in UTC with
microseconds and a Z."""

from __future__ import annotations

import datetime as dt

import pytest

from xdpwatch.schemas import format_time, format_time_ns, parse_time

T0 = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.timezone.utc)


def test_format_is_utc_with_microseconds():
    assert format_time_ns(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"  # cut
    assert format_time(1_700_000_000.1234567) == "2023-11-14T22:13:20.123457Z"  # rounded
    assert format_time(T0.timestamp()) == format_time_ns(int(T0.timestamp()) * 10**9) == "2026-11-25T10:00:00.000000Z"


def test_parse_time():
    assert parse_time("2026-11-25T10:00:03Z") == (T0 + dt.timedelta(seconds=3)).timestamp()
    assert parse_time("2026-11-25") == (T0 - dt.timedelta(hours=10)).timestamp()
    assert parse_time("2026-11-25T11:00:00+01:00") == T0.timestamp()
    assert parse_time("2026-11-25t10:00:00.5z") == T0.timestamp() + 0.5  # RFC 3339 allows lower case
    with pytest.raises(ValueError, match=r"not an ISO 8601 time: 'now-1h' \(e.g. 2026-11-25T10:00:00Z\)"):
        parse_time("now-1h")


def test_round_trip_to_the_microsecond():
    for us in (0, 1, 123_456, 999_999):
        t = T0.timestamp() + 86_400 * 365 + us / 1e6
        assert format_time(parse_time(format_time(t))) == format_time(t)
        assert parse_time(format_time_ns(int(T0.timestamp()) * 10**9 + us * 1000)) == T0.timestamp() + us / 1e6
