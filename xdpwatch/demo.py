"""`xdpwatch demo`: the whole pipeline on this machine, with nothing else installed.

    broker (Tansu)  ◄── xdpwatch produce (XDP on the lab's veth) ◄── traffic from a namespace
         │                                                         (UDP/TCP/ICMP, SSH logins,
         ├──► xdpwatch alert   ──► xdpwatch.alerts                  a brute-force burst, a spike)
         ├──► xdpwatch archive ──► DIR/archive/*.jsonl.zst
         └──► live view (this process)

Every component is the real one, started as a user would start it. Stops after `duration`
seconds or on Ctrl-C, stops everything in order (traffic, producer, then consumers once
they have read everything) and removes what it created: processes, namespaces, veths,
bridge, XDP (released with the producer's BPF link). Its directory (`--dir`) is emptied only
if a demo made it (see `prepare_workdir`).
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import OFFSET_BEGINNING

from xdpwatch import schemas
from xdpwatch.errors import XdpwatchError
from xdpwatch.kafka.read import Reader
from xdpwatch.lab import Broker, LabError, Net, Sshd, free_port, scrape, sh, wait_for

DEMO_NET = 0  # names xw0-*, xwc0, xwbr0; subnet 198.18.0.0/24 (tests use 1-250)
BRUTE_FORCE_ATTEMPTS = 15
DEMO_RULES = """\
# The demo's rules: the defaults, but a one-minute run needs a shorter warm-up, and on a
# quiet lab (~60 packets/s) an SSH brute force alone doubles the rate: only a real flood
# (>= 1000 packets/s) counts as a spike here.
[traffic_spike]
warmup = 8
min_rate = 1000.0
"""


class DemoError(XdpwatchError):
    """The demo cannot run, or a part of it failed."""


MARKER = ".xdpwatch-demo"  # in every directory a demo made: the next demo may empty it


def prepare_workdir(workdir: Path) -> None:
    """Make `workdir` an empty directory marked as the demo's. Only a directory that is
    missing, empty, or marked by an earlier demo (its archive belongs to a broker that is
    gone) is emptied; anything else is refused with DemoError and left as it is, so a
    mistyped --dir never costs anyone their files."""
    marker = workdir / MARKER
    if workdir.is_symlink() or workdir.exists() and not workdir.is_dir():
        raise DemoError(f"--dir {workdir} is not a directory (or is a symbolic link): choose another --dir")
    if workdir.exists():
        ours = marker.is_file() and not marker.is_symlink()
        if not ours and any(workdir.iterdir()):
            raise DemoError(f"--dir {workdir} is not empty and no demo made it (no {MARKER} in it): nothing was "
                            "removed; choose another --dir, or empty it yourself")
        for child in workdir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `xdpwatch demo`: the next demo with this --dir empties this directory\n")


# ------------------------------------------------------------------------------ processes
class Proc:
    """An `xdpwatch` command in its own session (a terminal's Ctrl-C reaches only the demo,
    which stops the children in order); stderr goes to DIR/logs/NAME.log."""

    def __init__(self, name: str, argv: list[str], logs: Path, prefix: list[str] = ()):
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*prefix, *argv], stdout=subprocess.DEVNULL, stderr=self._log,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def xdpwatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "xdpwatch", *args]


def metric_sum(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix))


# ------------------------------------------------------------------------------ live state
@dataclass
class View:
    """What the demo has read back from Kafka, for the live view and the summary."""

    started: float = field(default_factory=time.monotonic)
    messages: collections.Counter = field(default_factory=collections.Counter)  # per topic
    packets: collections.Counter = field(default_factory=collections.Counter)   # totals per class
    rate: dict[str, float] = field(default_factory=dict)                        # last interval, per second
    peak_pps: float = 0.0
    flows_started: int = 0
    flows_ended: collections.Counter = field(default_factory=collections.Counter)  # by reason
    drops: int = 0
    alerts: list[dict] = field(default_factory=list)
    delivery: dict[str, float] = field(default_factory=dict)
    phase: str = "starting"
    reader_error: str | None = None  # the topic reader died: the demo must not go on blind

    def add(self, topic: str, doc: dict) -> None:
        self.messages[topic] += 1
        stream = schemas.stream_of(topic)
        if stream == "packet-counts":
            secs = max(doc["interval"]["duration_ms"] / 1000, 1e-3)
            self.packets.update(doc["packets"])
            self.rate = {k: v / secs for k, v in doc["packets"].items()}
            self.peak_pps = max(self.peak_pps, self.rate["total"])
            self.drops += doc["drops"]["ringbuf"]
        elif stream == "ssh-flows":
            action = doc["event"]["action"]
            if action == "flow_start":
                self.flows_started += 1
            elif action == "flow_end":
                self.flows_ended[doc["event"]["reason"]] += 1
        elif stream == "alerts":
            self.alerts.append(doc)


# What the demo's components write (it runs monitor-only: no control or enforcement topics).
DEMO_STREAMS = ("packet-counts", "ssh-flows", "alerts")


def read_topics(bootstrap: str, topics: list[str], view: View, stop: threading.Event) -> None:
    """Every message of `topics` from the beginning into `view`, as it arrives, until `stop`."""
    reader = None
    try:
        reader = Reader({"bootstrap.servers": bootstrap}, "demo-view")

        def partitions() -> dict | None:
            found = {t: reader.partitions(t) for t in topics}
            return found if all(found.values()) else None

        found = wait_for(partitions, 60, "the demo topics")
        reader.follow([(t, p, OFFSET_BEGINNING) for t in topics for p in found[t]])
        while not stop.is_set():
            for m in reader.poll(500, 0.2):
                if m.error() is None:
                    view.add(m.topic(), orjson.loads(m.value()))
    except Exception as e:  # noqa: BLE001 (reported by the main thread)
        view.reader_error = f"reading {', '.join(topics)} failed: {e}"
    finally:
        if reader is not None:
            reader.close()


def render(view: View, duration: float):
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    elapsed = time.monotonic() - view.started
    t = Table(title=f"xdpwatch demo — {elapsed:4.0f}/{duration:.0f} s — {view.phase}", expand=True)
    t.add_column("packets/s by class", justify="left")
    for name in ("total", "ipv4", "tcp", "udp", "icmp", "arp", "ssh", "malformed"):
        t.add_column(name, justify="right")
    t.add_row("last interval", *(f"{view.rate.get(n, 0):,.0f}" for n in
                                 ("total", "ipv4", "tcp", "udp", "icmp", "arp", "ssh", "malformed")))
    t.add_row("total packets", *(f"{view.packets.get(n, 0):,}" for n in
                                 ("total", "ipv4", "tcp", "udp", "icmp", "arp", "ssh", "malformed")))
    d = view.delivery
    stats = (f"SSH flows opened {view.flows_started}, closed {sum(view.flows_ended.values())} "
             f"({', '.join(f'{k} {v}' for k, v in sorted(view.flows_ended.items())) or '-'}) · "
             f"kernel drops {view.drops} · producer: produced {d.get('produced', 0):.0f}, "
             f"delivered {d.get('delivered', 0):.0f}, failed {d.get('failed', 0):.0f}")
    alerts = Table(expand=True, show_edge=False)
    for col in ("time", "rule", "source", "message"):
        alerts.add_column(col)
    for a in view.alerts[-6:]:
        alerts.add_row(a["@timestamp"][11:19], a["rule"]["name"], a.get("source", {}).get("ip", "-"), a["message"])
    return Group(t, Panel(stats), Panel(alerts if view.alerts else "no alerts yet", title="alerts"))


# ------------------------------------------------------------------------------ traffic
def traffic_main(dst: str, duration: float, spike_at: float, spike_packets: int) -> None:
    """Background UDP, TCP and ICMP from the client namespace to the server, plus one UDP
    burst at `spike_at`. Bounded: stops after `duration` s; the burst is `spike_packets`
    datagrams, at most 3 s. Only ever sends to `dst` (the lab's server namespace)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    echo = bytes.fromhex("0800f7ff00000000")  # type 8, checksum for an all-zero id/seq
    start = time.monotonic()
    rng = random.Random(1)
    tick = spiked = 0
    while (now := time.monotonic() - start) < duration:
        for _ in range(rng.randint(3, 7)):
            udp.sendto(b"x" * rng.randint(20, 400), (dst, 5000 + rng.randint(0, 4)))
        if tick % 2 == 0:
            icmp.sendto(echo, (dst, 0))
        if tick % 5 == 0:
            with socket.socket() as tcp:  # to a closed port: SYN, RST back
                tcp.settimeout(0.3)
                try:
                    tcp.connect((dst, 80))
                except OSError:
                    pass
        if not spiked and now >= spike_at:
            spiked = 1
            end = time.monotonic() + 3
            for i in range(spike_packets):
                udp.sendto(b"spike", (dst, 5005))
                if i % 1000 == 0 and time.monotonic() > end:
                    break
        tick += 1
        time.sleep(0.1)


# ------------------------------------------------------------------------------ the demo
@dataclass
class Demo:
    duration: float
    workdir: Path
    live: bool

    def run(self) -> dict:
        if os.geteuid() != 0:
            raise DemoError("the demo attaches XDP and creates network namespaces: run it as root (sudo make demo)")
        prepare_workdir(self.workdir)
        for tool in ("sshpass", "zstdcat"):
            if shutil.which(tool) is None:
                raise DemoError(f"{tool} is missing: run `make setup`")
        logs = self.workdir / "logs"
        logs.mkdir()
        (self.workdir / "rules.toml").write_text(DEMO_RULES)
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        made: list = []
        procs: dict[str, Proc] = {}
        view = View()
        summary: dict = {}
        try:
            summary = self._run(stop, made, procs, view, logs)
        finally:
            for s in previous:
                signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
            codes = {name: p.stop(signal.SIGKILL if name == "traffic" else signal.SIGTERM)
                     for name, p in procs.items()}
            for thing in reversed(made):
                thing.stop() if hasattr(thing, "stop") else thing.cleanup()
            for s, h in previous.items():
                signal.signal(s, h)
        summary["exit_codes"] = codes
        left = self.leftovers()
        summary["left_behind"] = left
        (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _run(self, stop, made, procs, view, logs) -> dict:
        say = self._say
        say("starting the broker (Tansu, in memory)")
        broker = Broker()
        made.append(broker)
        bs = ["--bootstrap-servers", broker.bootstrap]
        say("creating namespaces xw0-cli/xw0-srv, veth xwc0 and a real sshd on 198.18.0.1:22")
        net = Net(DEMO_NET)
        made.append(net)
        sshd = Sshd(net)
        made.append(sshd)
        prod_port, alert_port, arch_port = free_port(), free_port(), free_port()
        fast = ["-X", "session.timeout.ms=6000"]  # Tansu's first group join takes half of it
        procs["produce"] = Proc("produce", xdpwatch("produce", "--iface", net.iface, *bs, "--interval", "1",
                                                    "--flow-idle-timeout", "10", "--flow-fin-linger", "0.5",
                                                    "--metrics-port", str(prod_port),
                                                    "--spool-dir", str(self.workdir / "spool"),
                                                    "--summary-file", str(logs / "produce.summary.json")), logs)
        wait_for(lambda: self._alive(procs["produce"]) and "attached XDP program" in procs["produce"].log(),
                 60, "the producer to attach")
        say(f"producer attached to {net.iface} (metrics on :{prod_port})")
        procs["alert"] = Proc("alert", xdpwatch("alert", *bs, "--rules", str(self.workdir / "rules.toml"),
                                                "--from-beginning", "--dead-letter", str(self.workdir / "dead-letter.jsonl"),
                                                "--metrics-port", str(alert_port), *fast), logs)
        wait_for(lambda: self._alive(procs["alert"]) and "xdpwatch.alerts" in broker.topics(), 30,
                 "the alert consumer to create its topic")
        procs["archive"] = Proc("archive", xdpwatch("archive", *bs, "--dir", str(self.workdir / "archive"),
                                                    "--roll-seconds", "5", "--metrics-port", str(arch_port),
                                                    "--dead-letter", str(self.workdir / "dead-letter.jsonl"), *fast),
                                logs)
        topics = [schemas.topic("xdpwatch", s) for s in DEMO_STREAMS]
        reader_stop = threading.Event()
        reader = threading.Thread(target=read_topics, args=(broker.bootstrap, topics, view, reader_stop), daemon=True)
        reader.start()

        d = self.duration
        brute_at, spike_at = 0.35 * d, 0.65 * d
        procs["traffic"] = Proc("traffic", [sys.executable, "-m", "xdpwatch.demo", "traffic", net.srv_ip, str(d),
                                            str(spike_at), "30000"], logs, prefix=["ip", "netns", "exec", net.cli_ns])
        ssh_thread = threading.Thread(target=self._ssh_activity, args=(net, sshd, view, brute_at, stop), daemon=True)
        ssh_thread.start()
        view.started = time.monotonic()
        self._watch(stop, view, procs, prod_port)
        stop.set()  # the duration is over (or Ctrl-C): SSH activity stops too
        ssh_thread.join(60)

        view.phase = "stopping: producer (last interval, open flows end)"
        procs["traffic"].stop(signal.SIGKILL)
        rc = procs["produce"].stop()
        view.delivery = self._delivery(logs / "produce.summary.json")
        view.phase = "stopping: consumers finish reading"
        expected = lambda: sum(view.messages.values())  # noqa: E731
        for name, port, streams in (("alert", alert_port, ("packet-counts", "ssh-flows")),
                                    ("archive", arch_port, DEMO_STREAMS)):
            want = lambda: sum(view.messages[schemas.topic("xdpwatch", s)] for s in streams)  # noqa: E731
            try:
                wait_for(lambda: metric_sum(scrape(port), "xdpwatch_consumer_messages_total") >= want(), 30,
                         f"{name} to read every message")
            except LabError:
                say(f"warning: {name} did not read everything within 30 s (see {procs[name].log_path})")
        time.sleep(1.0)  # an alert raised by the last events reaches the view
        for name in ("alert", "archive"):
            procs[name].stop()
        time.sleep(0.5)
        reader_stop.set()
        reader.join(10)
        if rc != 0:
            say(f"warning: the producer exited {rc} (see {procs['produce'].log_path})")
        return self._summary(view, expected())

    def _ssh_activity(self, net, sshd, view, brute_at, stop) -> None:
        """Normal key-based logins now and then; one burst of failed password logins."""
        start, logins, brute_done = time.monotonic(), 0, False
        while not stop.is_set():
            t = time.monotonic() - start
            if not brute_done and t >= brute_at:
                view.phase = f"SSH brute force: {BRUTE_FORCE_ATTEMPTS} failed password logins"
                for _ in range(BRUTE_FORCE_ATTEMPTS):
                    if stop.is_set():
                        return
                    net.exec(net.cli_ns, sshd.failed_login_cmd(), capture_output=True, timeout=30)
                brute_done = True
                view.phase = "normal traffic"
            elif t >= logins * max(self.duration / 5, 3):
                view.phase = "normal SSH login"
                net.exec(net.cli_ns, sshd.client_cmd("uname -sr"), capture_output=True, timeout=30)
                logins += 1
                view.phase = "normal traffic"
            stop.wait(0.2)

    def _watch(self, stop, view, procs, prod_port) -> None:
        """Until the duration is over (or Ctrl-C): refresh the view; fail if a part died."""
        deadline = time.monotonic() + self.duration
        live = None
        if self.live:
            from rich.live import Live

            live = Live(render(view, self.duration), refresh_per_second=4, transient=False)
            live.start()
        seen_alerts, last_line = 0, 0.0
        try:
            while not stop.wait(0.25) and time.monotonic() < deadline:
                if view.reader_error:
                    raise DemoError(view.reader_error)
                for name in ("produce", "alert", "archive"):
                    if not self._alive(procs[name]):
                        raise DemoError(f"{name} exited {procs[name].proc.returncode}:\n"
                                        + "\n".join(procs[name].log().splitlines()[-8:]))
                view.delivery = {k: metric_sum(m, f"xdpwatch_events_{k}_total")
                                 for m in [scrape(prod_port)] for k in ("produced", "delivered", "failed")}
                if live:
                    live.update(render(view, self.duration))
                    continue
                for a in view.alerts[seen_alerts:]:
                    print(f"ALERT {a['rule']['name']}: {a['message']}", flush=True)
                seen_alerts = len(view.alerts)
                if time.monotonic() - last_line >= 5:
                    last_line = time.monotonic()
                    print(f"[{time.monotonic() - view.started:4.0f}s] {view.phase}: {view.rate.get('total', 0):.0f} pkt/s, "
                          f"{view.packets.get('total', 0)} packets, {view.flows_started} SSH flows, "
                          f"{len(view.alerts)} alerts", flush=True)
        finally:
            if live:
                live.update(render(view, self.duration))
                live.stop()

    @staticmethod
    def _alive(p: Proc) -> bool:
        return p.proc.poll() is None

    @staticmethod
    def _delivery(summary_file: Path) -> dict:
        """What the producer's --summary-file says it produced, delivered, failed ({} if none)."""
        try:
            events = json.loads(summary_file.read_text())["events"]
        except (OSError, ValueError, KeyError):
            return {}
        return {k: events[k] for k in ("produced", "delivered", "failed")}

    def _summary(self, view: View, messages: int) -> dict:
        from xdpwatch.consumers.archive import list_segments

        segs = list_segments(self.workdir / "archive") if (self.workdir / "archive").exists() else []
        return {
            "duration_s": round(time.monotonic() - view.started, 1),
            "packets": dict(view.packets), "peak_pps": round(view.peak_pps),
            "ssh_flows": {"started": view.flows_started, "ended": dict(view.flows_ended)},
            "kernel_drops": view.drops,
            "producer_delivery": view.delivery,
            "messages": dict(view.messages), "messages_total": messages,
            "alerts": [{"rule": a["rule"]["name"], "source": a.get("source", {}).get("ip"), "message": a["message"]}
                       for a in view.alerts],
            "archive": {"dir": str(self.workdir / "archive"), "segments": len(segs)},
            "logs": str(self.workdir / "logs"),
        }

    def leftovers(self) -> list[str]:
        """What the demo created and is still there (should be nothing)."""
        left = []
        for ns in (f"xw{DEMO_NET}-cli", f"xw{DEMO_NET}-srv"):
            if Path(f"/run/netns/{ns}").exists():
                left.append(f"namespace {ns}")
        for dev in (f"xwc{DEMO_NET}", f"xws{DEMO_NET}", f"xwbr{DEMO_NET}"):
            if Path(f"/sys/class/net/{dev}").exists():
                left.append(f"interface {dev}")
        r = sh("pgrep", "-f", f"xdpwatch (produce|alert|archive).*{self.workdir}|iface xwc{DEMO_NET} ", check=False)
        left += [f"process {pid}" for pid in r.stdout.split()]
        return left

    @staticmethod
    def _say(text: str) -> None:
        print(f"demo: {text}", flush=True)


def print_summary(s: dict) -> None:
    p = s["packets"]
    print("\n== xdpwatch demo summary ==")
    print(f"ran {s['duration_s']} s; XDP saw {p.get('total', 0):,} packets (tcp {p.get('tcp', 0):,}, "
          f"udp {p.get('udp', 0):,}, icmp {p.get('icmp', 0):,}, ssh {p.get('ssh', 0):,}), peak {s['peak_pps']:,} pkt/s")
    print(f"SSH flows: {s['ssh_flows']['started']} started, ended {s['ssh_flows']['ended']}; "
          f"kernel drops {s['kernel_drops']}")
    d = s["producer_delivery"]
    print(f"producer: {d.get('produced', 0)} events produced, {d.get('delivered', 0)} delivered, "
          f"{d.get('failed', 0)} failed")
    print(f"alerts ({len(s['alerts'])}):")
    for a in s["alerts"]:
        print(f"  {a['rule']:<15} {a['source'] or '-':<15} {a['message']}")
    a = s["archive"]
    print(f"archive: {a['segments']} segments in {a['dir']}")
    print(f"  replay it:  .venv/bin/xdpwatch replay --dir {a['dir']} --stream ssh-flows | head")
    print(f"  read it:    zstdcat {a['dir']}/xdpwatch.alerts.p*.jsonl.zst")
    print(f"logs of every component: {s['logs']}; this summary as JSON: {Path(s['logs']).parent / 'summary.json'}")
    if s["left_behind"]:
        print(f"WARNING: left behind: {', '.join(s['left_behind'])}")
    else:
        print("cleaned up: no namespace, interface, XDP program or process left behind")


if __name__ == "__main__" and sys.argv[1:2] == ["traffic"]:
    traffic_main(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
