"""Figure 2 of `make bench` alone, repeated: flow events to Kafka, the producer's own loop
against the bare confluent-kafka loop producing the same lines, each ratio within one run.

    sudo .venv/bin/python bench/flow_events.py [--runs 3] [--events 300000] [--profile]

Prints one line per run and the median with its min-max; never asserts on speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py)

from xdpwatch.lab import Broker  # noqa: E402


def one_run(broker: Broker, i: int, n: int, flow_path: str) -> dict:
    prefix = f"fe{i}-{time.monotonic_ns()}"
    ours = bench.pipeline_run(broker.bootstrap, prefix, n, flow_path=flow_path)
    values = bench.read_back(broker.bootstrap, f"{prefix}.ssh-flows", n)
    bare = bench.bare_producer(broker.bootstrap, f"{prefix}-bare.ssh-flows", values)
    return {"xdpwatch": ours, "bare": bare, "ratio": round(ours["events_per_s"] / bare["events_per_s"], 3),
            "mean_value_bytes": round(sum(len(v) for _, v in values) / len(values))}


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):,.3f} (min {min(xs):,.3f}, max {max(xs):,.3f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--profile", action="store_true", help="also the per-stage profile (one run of events/5)")
    ap.add_argument("--flow-path", default="auto", choices=("auto", "compiled", "python"))
    args = ap.parse_args()
    broker = Broker()
    try:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.create_topics([NewTopic(bench.WARMUP_TOPIC, 1, 1)])[bench.WARMUP_TOPIC].result(15)
        runs = []
        for i in range(args.runs):
            r = one_run(broker, i, args.events, args.flow_path)
            runs.append(r)
            print(f"run {i + 1}: xdpwatch ({r['xdpwatch']['flow_path']}) {r['xdpwatch']['events_per_s']:,}/s (delivered {r['xdpwatch']['delivered']:,}, "
                  f"failed {r['xdpwatch']['failed']}), bare {r['bare']['events_per_s']:,}/s, ratio {r['ratio']:.3f}, "
                  f"{r['mean_value_bytes']} B/event", flush=True)
        print("xdpwatch events/s", spread([r["xdpwatch"]["events_per_s"] for r in runs]))
        print("bare events/s    ", spread([r["bare"]["events_per_s"] for r in runs]))
        print("ratio            ", spread([r["ratio"] for r in runs]))
        if args.profile:
            prof = bench.pipeline_run(broker.bootstrap, f"fe-prof-{time.monotonic_ns()}", max(args.events // 5, 2000),
                                      profile=True, flow_path=args.flow_path)
            print("profile (% of loop):", ", ".join(f"{k} {v}" for k, v in prof["profile"].items()))
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
