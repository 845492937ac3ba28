"""Figure 2 of `make bench` alone, repeated: flow events to Kafka, the producer's own loop
against the bare confluent-kafka loop producing the same lines, each ratio within one run.

    sudo .venv/bin/python bench/flow_events.py [--runs 3] [--events 300000] [--flow-path compiled] [--loss 100000] [--profile]

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
from xdpwatch import schemas  # noqa: E402

from xdpwatch.demo.lab import Broker  # noqa: E402


def one_run(broker: Broker, i: int, n: int, paths: list[str]) -> dict:
    """Each flow path, then the bare loop on the lines they made, without and with the
    producer's headers; every ratio within this run."""
    prefix = f"fe{i}-{time.monotonic_ns()}"
    ours = {p: bench.pipeline_run(broker.bootstrap, f"{prefix}-{p}", n, flow_path=p) for p in paths}
    values = bench.read_back(broker.bootstrap, f"{prefix}-{paths[0]}.ssh-flows", n)
    bare = {"bare": bench.bare_producer(broker.bootstrap, f"{prefix}-bare.ssh-flows", values),
            "bare+headers": bench.bare_producer(broker.bootstrap, f"{prefix}-bareh.ssh-flows", values,
                                                schemas.headers("ssh-flows"))}
    return {"ours": ours, "bare": bare, "mean_value_bytes": round(sum(len(v) for _, v in values) / len(values)),
            "ratios": {f"{p} / {b}": round(o["events_per_s"] / r["events_per_s"], 3)
                       for p, o in ours.items() for b, r in bare.items()}}


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):,.3f} (min {min(xs):,.3f}, max {max(xs):,.3f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--profile", action="store_true", help="also the per-stage profile (one run of events/5)")
    ap.add_argument("--flow-path", action="append", choices=("auto", "compiled", "python"),
                    help="the flow path(s) to measure, each in every run (default: compiled and python)")
    ap.add_argument("--loss", type=int, default=0, metavar="N",
                    help="also N flows at the injector's full speed into a 64-page ring buffer: drops, flow_start delivered")
    args = ap.parse_args()
    paths = args.flow_path or ["compiled", "python"]
    broker = Broker()
    try:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.create_topics([NewTopic(bench.WARMUP_TOPIC, 1, 1)])[bench.WARMUP_TOPIC].result(15)
        runs = []
        for i in range(args.runs):
            r = one_run(broker, i, args.events, paths)
            runs.append(r)
            rates = {**{k: v["events_per_s"] for k, v in r["ours"].items()}, **{k: v["events_per_s"] for k, v in r["bare"].items()}}
            assert all(o["delivered"] == args.events and o["failed"] == 0 for o in r["ours"].values()), r["ours"]
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:,}/s" for k, v in rates.items()) + "; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items()) + f"; {r['mean_value_bytes']} B/event",
                  flush=True)
        for k in runs[0]["ratios"]:
            print(f"{k:28s}", spread([r["ratios"][k] for r in runs]))
        for p in paths if args.loss else ():
            loss = bench.loss_at_max_rate(broker.bootstrap, args.loss, p)
            print(f"at max rate ({loss['flow_path']}): {loss['flows_generated']:,} flows at {loss['generation_rate_per_s']:,}/s = "
                  f"{loss['ring_events_submitted']:,} events + {loss['ring_drops_counted']:,} counted drops "
                  f"(identity {loss['ring_identity_holds']}); flow_start delivered {loss['flow_starts_delivered']:,}, "
                  f"failed {loss['delivery_failed']}, nothing lost {loss['nothing_lost']}", flush=True)
        if args.profile:
            prof = bench.pipeline_run(broker.bootstrap, f"fe-prof-{time.monotonic_ns()}", max(args.events // 5, 2000),
                                      profile=True, flow_path=paths[0])
            print("profile (% of loop):", ", ".join(f"{k} {v}" for k, v in prof["profile"].items()))
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
