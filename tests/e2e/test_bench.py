"""`make bench BENCH_QUICK=1`: the benchmark code keeps working. Asserts only that every
figure was produced (no speed assertion: figures are for reading, see README)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}/{i}")
    else:
        yield path, x


@pytest.mark.timeout(660)  # the run's own limit is 600 s; here it takes 3.5-5 minutes on a busy machine
def test_quick_bench_produces_every_figure(tmp_path):
    r = subprocess.run(["make", "-C", str(ROOT), "bench", "BENCH_QUICK=1", f"BENCH_OUT={tmp_path}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    for part in ("xdp_cost", "events_to_kafka", "counters", "archive_replay", "memory", "scaling", "restore",
                 "alert_state", "spool_check", "alert_vs_bare", "alert_restart", "interfaces", "packet_to_kafka",
                 "bruteforce_to_block"):
        assert result[part], part
    missing = [p for p, v in leaves(result) if v is None or v == ""]
    assert missing == [], missing
    e = result["events_to_kafka"]
    assert e["xdpwatch"]["delivered"] == e["xdpwatch"]["events"] and e["xdpwatch"]["failed"] == 0
    assert e["loss_at_max_rate"]["ring_identity_holds"] and e["loss_at_max_rate"]["nothing_lost"]
    assert result["archive_replay"]["archiver"]["lines"] == result["archive_replay"]["messages"]
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    for title in ("1. XDP cost per packet", "6. Scaling", "7. Restore of the control topic", "8. Alert consumer",
                  "9. Producer start check", "10. Alert consumer vs bare loops", "11. Alert consumer restart",
                  "12. One producer, many interfaces", "13. Latency", "Targets (met only when the worst run meets it)"):
        assert title in r.stdout, title
    a = result["alert_state"]  # 20,000 sources, 2 events each, all handled; under the cap: none evicted
    assert a["events"] == 40_000 and a["sources_evicted"] == 0
    sc = result["spool_check"]  # exactly the spooled events already in the topic are found
    assert sc["check"]["found"] == sc["spooled_events"] // 2 and sc["bare_read"]["messages"] == sc["topic_messages"]
    ab = result["alert_vs_bare"]  # every event handled by each loop, none dead-lettered, all schema-valid
    assert ab["alert"]["handled"] == ab["events"] and ab["alert"]["dead_lettered"] == 0
    assert ab["bare_parse"]["messages"] == ab["bare_parse_validate"]["valid"] == ab["events"]
    assert result["runs"] == 1 and all(len(runs) == 1 for runs in result["every_run"].values())
    assert "ratio_to_floor" in result["xdp_cost"]["SSH, packet of an existing flow"]
    for rate in ("1000_per_s", "50000_per_s"):  # every flow's flow_start reached Kafka and was timed
        p = result["packet_to_kafka"][rate]
        assert p["flow_starts"] == p["flows"] <= p["frames_sent"], p
    bf = result["bruteforce_to_block"]  # each blocking rule blocked the attacker, at its threshold
    assert bf["refused_logins"] == 5 and bf["by_connections"]["connections"] == 10
    assert [t["runs"] for t in result["targets"]] == [1] * len(result["targets"])  # every target has its figure
    ar = result["alert_restart"]  # resumed at the end, every alert read back, none published again
    assert ar["resumed_at_offsets_sum"] == ar["events"] and ar["alerts_read_back"] == ar["alerts_first_run"] > 0
    assert ar["alerts_published_again"] == 0
    assert set(result["interfaces"]["by_count"]) == {"1", "4"}  # the quick run's interface counts
