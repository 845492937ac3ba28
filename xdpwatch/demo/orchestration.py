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

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from xdpwatch import schemas
from xdpwatch.demo.lab import Broker, LabError, Net, Sshd, free_port, scrape, sh, wait_for
from xdpwatch.demo.view import DEMO_STREAMS, View, read_topics, render
from xdpwatch.errors import XdpwatchError

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
        procs["traffic"] = Proc("traffic", [sys.executable, "-m", "xdpwatch.demo.traffic", net.srv_ip, str(d),
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

