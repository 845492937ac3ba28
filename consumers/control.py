"""The prevention loop's control plane: issue block/unblock commands to the producers
(`xdpwatch block`, `unblock`, `alert --block-on`) and list the blocks they enforce
(`xdpwatch blocks`, from the enforcement topic). Commands follow schemas/control.v1.json,
and producers report what they did in schemas/enforcement.v1.json."""

from __future__ import annotations

import dataclasses
import getpass
import ipaddress
import logging
import re
import socket
import time
import uuid
from typing import Callable

import orjson

from xdpwatch import schemas
from xdpwatch.consumers.alert import alert_id as _alert_id
from xdpwatch.consumers.base import crash_point
from xdpwatch.consumers.errors import ConsumerError
from xdpwatch.kafka.admin import ensure_topics
from xdpwatch.kafka.produce import AckedProducer
from xdpwatch.kafka.read import Reader

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'900', '90s', '15m', '2h', '7d' -> seconds (at least 1)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 7d)")
    seconds = round(float(m[1]) * _UNITS[m[2]])
    if seconds < 1:
        raise ValueError(f"{text!r} is shorter than a second")
    return seconds


def operator() -> str:
    return f"operator:{getpass.getuser()}@{socket.gethostname()}"


def command(action: str, prefix: str, issued_by: str, ttl_s: int | None = None, reason: str | None = None,
            alert_id: str | None = None, command_id: str | None = None, now: float | None = None) -> dict:
    """A control document, checked against the schema (the producer checks it again).
    `command_id` defaults to a random UUID; `now` (POSIX seconds, default the wall clock)
    is its @timestamp, from which a block's TTL counts."""
    cmd = {"id": command_id or str(uuid.uuid4()), "action": action, "prefix": prefix, "issued_by": issued_by}
    for k, v in (("ttl_s", ttl_s), ("reason", reason), ("alert_id", alert_id)):
        if v is not None:
            cmd[k] = v
    doc = {"@timestamp": schemas.format_time(time.time() if now is None else now), "command": cmd}
    errs = schemas.errors("control", doc)
    if errs:
        raise ConsumerError(f"invalid {action} command: {errs[0]}")
    return doc


class CommandSender:
    """Produces commands to the control topic, each acknowledged before `send` returns."""

    def __init__(self, kafka_conf: dict, topic: str):
        ensure_topics(kafka_conf, [], single_partition=(topic,))  # one order for every command
        self._out = AckedProducer(kafka_conf, topic, "a command")

    def send(self, doc: dict) -> None:
        self._out.send(orjson.dumps(doc), schemas.key_of("control", doc), schemas.headers("control"))
        cmd = doc["command"]
        log.info("sent %s %s (command %s) to %s", cmd["action"], cmd["prefix"], cmd["id"], self._out.topic)


def active_blocks(kafka_conf: dict, topic: str, now: float | None = None, stall_timeout: float = 10.0) -> list[dict]:
    """The blocks in place now, per producer: the enforcement topic read from its beginning to
    its end, each (observer, prefix) folded to its last word. Newest first."""
    now = time.time() if now is None else now
    reader = Reader(kafka_conf, "blocks", stall_timeout)
    state = {}
    try:
        for m in reader.tail(topic):  # no topic: no producer has enforced anything yet
            try:
                doc = orjson.loads(m.value())
                e = doc["xdpwatch"]["enforcement"]
                key = (doc["observer"]["hostname"], e["prefix"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if doc["event"]["action"] == "block_applied":
                state[key] = doc
            elif doc["event"]["action"] in ("block_removed", "block_expired"):
                state.pop(key, None)
    finally:
        reader.close()
    out = [d for d in state.values() if schemas.parse_time(d["xdpwatch"]["enforcement"]["expires"]) > now]
    return sorted(out, key=lambda d: d["@timestamp"], reverse=True)


# What `alert --block-on` accepts: rules whose evidence a spoofer cannot forge (each counts
# only connections whose TCP handshake completed, as the producer saw it), and why no other
# rule may block.
BLOCKABLE = ("ssh_bruteforce", "ssh_auth_failures", "ssh_scan")
_CANNOT_BLOCK = {
    "ssh_syn_flood": "counts SYNs, which anyone can send with a forged source address: it can alert but never block",
    "traffic_spike": "measures an interface's packet rate, not one source: it has no address to block",
    "kernel_drops": "reports events lost in the kernel, not a source: it has no address to block",
    "block_budget_exhausted": "is raised by --block-on itself, for a source the block budget refused to block",
}


def blockable(rule: str) -> str:
    """`rule` if `alert --block-on` may block on it; else ValueError saying why not."""
    if rule in BLOCKABLE:
        return rule
    if rule in _CANNOT_BLOCK:
        raise ValueError(f"{rule} {_CANNOT_BLOCK[rule]}")
    raise ValueError(f"{rule!r} is not an alert rule; rules that can block: {', '.join(BLOCKABLE)}")


AUTOMATIC = "alert:"  # issued_by of every command `alert --block-on` sends


@dataclasses.dataclass(frozen=True)
class Exhausted:
    """Why the budget refuses a block: `budget` "rate" (`figure` block commands issued in the
    last `window_s` seconds) or "active" (`figure` blocks still within their TTL), at `limit`."""

    budget: str
    figure: int
    limit: int
    window_s: float

    def __str__(self) -> str:
        if self.budget == "rate":
            return f"rate: {self.figure} block commands in the last {self.window_s:g}s, limit {self.limit}"
        return f"active: {self.figure} automatic blocks within their TTL, limit {self.limit}"


class BlockBudget:
    """How many automatic blocks `alert --block-on` may still issue: at most `rate` block
    commands per `window_s` seconds, and at most `max_active` blocks within their TTL.

    Its state is a function of the control commands alone: `record` every command (ours as
    sent, or the control topic's tail replayed in order after a restart) and `exhausted(now)`
    answers the same. Counted: blocks issued by an alert (`issued_by` "alert:…"), by their
    @timestamp and TTL, so on the wall clock. A later command for the same prefix (an unblock,
    or an operator's block, which replaces it in the producers) ends its place among the
    active ones. Commands count as issued, whatever a producer then decided; a command dated
    in the future counts until then (a forged one can only make the budget stricter)."""

    def __init__(self, rate: int = 10, max_active: int = 100, window_s: float = 60.0):
        self.rate, self.max_active, self.window_s = rate, max_active, window_s
        self._issued: list[float] = []     # @timestamp of automatic block commands, oldest first
        self._active: dict = {}            # prefix (ipaddress network) -> expiry, automatic blocks only

    def record(self, doc: dict) -> None:
        """Account for one control command (a schema-valid control document)."""
        cmd = doc["command"]
        try:
            net = ipaddress.ip_network(cmd["prefix"], strict=False)
        except ValueError:
            return  # no producer applies it either
        if cmd["action"] == "block" and cmd["issued_by"].startswith(AUTOMATIC):
            issued = schemas.parse_time(doc["@timestamp"])
            self._issued.append(issued)
            self._active[net] = issued + cmd["ttl_s"]
        else:
            self._active.pop(net, None)

    def exhausted(self, now: float) -> Exhausted | None:
        """None if one more automatic block fits the budget at `now`; else which budget is spent."""
        self._issued = [t for t in self._issued if t > now - self.window_s]
        self._active = {n: t for n, t in self._active.items() if t > now}
        if len(self._issued) >= self.rate:
            return Exhausted("rate", len(self._issued), self.rate, self.window_s)
        if len(self._active) >= self.max_active:
            return Exhausted("active", len(self._active), self.max_active, 0.0)
        return None


BUDGET_RULE = "block_budget_exhausted"
BUDGET_ALERT_COOLDOWN_S = 60.0


def budget_alert(alert: dict, why: Exhausted, held: int) -> dict:
    """The alert (alert.v1) raised instead of the block of `alert`'s source that the budget
    refused: `source.ip` is that source, the evidence points at `alert` (its event.id as first
    and last event id, its times), `count` is the budget's figure and `window_s` its window
    (the rate's; 0 for "active"). `held`: blocks refused since the previous budget alert
    without one of their own, said in the message. event.id is deterministic: rule, source
    and the refused alert's id."""
    ip, cause, ev = alert["source"]["ip"], alert["event"]["id"], alert["xdpwatch"]["evidence"]
    more = f"; {held} more blocks refused since the previous budget alert" if held else ""
    return {
        "@timestamp": alert["@timestamp"],
        "event": {**alert["event"], "id": _alert_id(BUDGET_RULE, ip, cause), "severity": 80},
        "rule": {"name": BUDGET_RULE,
                 "description": "alert --block-on refused a block: its budget (--block-rate, --block-max-active) was spent"},
        "message": f"block budget exhausted ({why}): {ip} not blocked for {alert['rule']['name']} alert {cause}{more}",
        "source": {"ip": ip},
        "observer": alert.get("observer", {}),
        "xdpwatch": {"evidence": {"count": why.figure, "window_s": why.window_s, "first_seen": ev["first_seen"],
                                  "last_seen": ev["last_seen"], "first_event_id": cause, "last_event_id": cause}},
    }


class BlockOnAlert:
    """`xdpwatch alert --block-on RULE`: a block command for the source of each alert of
    the chosen rules, carrying the alert's id and message, while `budget` allows it.

    The command's id is `alert-<alert event.id>`: the same alert handled again (after a
    crash) gives the same command. Beyond the budget no command is sent: a
    `block_budget_exhausted` alert goes to `raise_alert` instead, at most one per
    `cooldown_s` (wall clock); blocks refused in between are counted in `refused` and in the
    next budget alert's message. `clock` is the wall clock (blocks' TTLs count from it).

    After a restart or a rebalance, `remember` takes the control topic's recent commands:
    a block already sent for an alert is not sent again (counted in `duplicates`), and the
    budget is what those commands make it."""

    def __init__(self, sender: CommandSender, rules: set[str], ttl_s: int, budget: BlockBudget,
                 raise_alert: Callable[[dict], None], clock: Callable[[], float] = time.time,
                 cooldown_s: float = BUDGET_ALERT_COOLDOWN_S):
        self.sender, self.rules, self.ttl_s, self.budget = sender, rules, ttl_s, budget
        self.raise_alert, self.clock, self.cooldown_s = raise_alert, clock, cooldown_s
        self.sent = self.refused = self.budget_alerts = self.duplicates = 0
        self._quiet_until, self._held = float("-inf"), 0
        self._sent_ids: set[str] = set()  # command ids read back from the control topic

    def remember(self, commands, budget_alerts_at: list[float] = ()) -> None:
        """The control topic's recent commands, in order (schema-valid documents), and when
        the recent block_budget_exhausted alerts were published (POSIX seconds): what this
        rule sent before a restart. Replaces what was remembered."""
        self.budget = BlockBudget(self.budget.rate, self.budget.max_active, self.budget.window_s)
        self._sent_ids = set()
        for doc in commands:
            if doc["command"]["id"].startswith("alert-"):
                self._sent_ids.add(doc["command"]["id"])
            self.budget.record(doc)
        for t in budget_alerts_at:
            self._quiet_until = max(self._quiet_until, t + self.cooldown_s)

    def __call__(self, alert: dict) -> None:
        rule = alert["rule"]["name"]
        ip = alert.get("source", {}).get("ip")
        if rule not in self.rules or not ip:
            return
        command_id = f"alert-{alert['event']['id']}"
        if command_id in self._sent_ids:
            self.duplicates += 1
            log.info("block for alert %s was already sent (%s): not again", alert["event"]["id"], command_id)
            return
        now = self.clock()
        why = self.budget.exhausted(now)
        if why is None:
            doc = command("block", ip, f"{AUTOMATIC}{rule}", ttl_s=self.ttl_s, reason=alert["message"][:1024],
                          alert_id=alert["event"]["id"], command_id=command_id, now=now)
            self.sender.send(doc)
            crash_point("block-sent")
            self.budget.record(doc)
            self.sent += 1
            return
        self.refused += 1
        if now < self._quiet_until:
            self._held += 1
            log.debug("not blocking %s for alert %s: block budget exhausted (%s)", ip, alert["event"]["id"], why)
            return
        log.warning("not blocking %s for alert %s: block budget exhausted (%s)%s", ip, alert["event"]["id"], why,
                    f"; {self._held} more refused since the previous budget alert" if self._held else "")
        self.raise_alert(budget_alert(alert, why, self._held))
        self.budget_alerts += 1
        self._quiet_until, self._held = now + self.cooldown_s, 0
