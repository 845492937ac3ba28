"""Prevention: the XDP program's blocklist and allowlist, driven by commands from Kafka.

Off unless `produce --enforce` (matching packets are dropped) or `--dry-run` (counted as
what would have been dropped). Commands (schemas/control.v1.json) come from the control
topic, which is read from its beginning at every start: a block outlives a restart of the
producer for exactly its TTL. Every decision goes to the enforcement topic
(schemas/enforcement.v1.json) with its cause: applied, removed, expired, or rejected.

Safety: the allowlist (loopback always, plus --allow) wins over any block in the kernel,
and a command that overlaps it, is wider than the policy allows, or lasts too long is
rejected and never reaches the kernel.
"""

from __future__ import annotations

import ctypes as ct
import heapq
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import orjson

from .. import schemas
from .events import iso

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ALWAYS_ALLOWED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def parse_prefix(text: str) -> Network:
    """An address or CIDR prefix; host bits are cleared (198.51.100.7/24 -> .0/24)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address or prefix") from None


@dataclass(frozen=True)
class Policy:
    allow: tuple[Network, ...] = ()
    min_prefix_v4: int = 8      # nothing wider than a /8 ...
    min_prefix_v6: int = 32     # ... or a /32
    max_ttl_s: int = 7 * 86400

    @property
    def allowlist(self) -> tuple[Network, ...]:
        return ALWAYS_ALLOWED + tuple(n for n in self.allow if n not in ALWAYS_ALLOWED)

    def refuse(self, net: Network, ttl_s: int | None) -> str | None:
        """Why a block of `net` for `ttl_s` is out of policy, or None."""
        widest = self.min_prefix_v4 if net.version == 4 else self.min_prefix_v6
        if net.prefixlen < widest:
            return f"prefix {net} is wider than the policy allows (at most /{widest} for IPv{net.version})"
        for a in self.allowlist:
            if a.version == net.version and a.overlaps(net):
                return f"prefix {net} overlaps the allowlist entry {a}: allowlisted addresses are never blocked"
        if ttl_s is not None and ttl_s > self.max_ttl_s:
            return f"ttl {ttl_s}s is longer than the policy allows ({self.max_ttl_s}s)"
        return None


@dataclass(order=True)
class _Block:
    expires: float
    net: Network = field(compare=False)
    command: dict = field(compare=False)


class Enforcer:
    """Applies commands to the program's maps and reports each decision via `publish`
    (a document for the enforcement stream)."""

    def __init__(self, prog, mode: str, policy: Policy, publish: Callable[[dict], None], shaper):
        """`mode`: dry_run or enforce, as the program was compiled (BpfConfig checks it)."""
        self.prog, self.mode, self.policy, self.publish, self.shaper = prog, mode, policy, publish, shaper
        self._tables = {4: prog.bpf[b"block_v4"], 6: prog.bpf[b"block_v6"]}
        self.blocks: dict[Network, _Block] = {}
        self._expiry: list[_Block] = []  # heap; stale entries skipped
        allow = {4: prog.bpf[b"allow_v4"], 6: prog.bpf[b"allow_v6"]}
        for net in policy.allowlist:
            table = allow[net.version]
            table[self._key(table, net)] = table.Leaf(1)
        log.info("enforcement on (%s): allowlist %s", "dropping" if mode == "enforce" else "dry run, counting only",
                 ", ".join(map(str, policy.allowlist)))

    @staticmethod
    def _key(table, net: Network):
        k = table.Key()
        k.prefixlen = net.prefixlen
        raw = net.network_address.packed
        k.addr = (ct.c_ubyte * len(raw))(*raw)
        return k

    # ---------------------------------------------------------------- commands
    def restore(self, raws: list[bytes], now: float | None = None) -> None:
        """The control topic's history at start: only each prefix's last valid command
        counts, and only blocks still within their TTL are applied (and reported). What was
        rejected or lifted before was reported then."""
        last: dict[Network, tuple[dict, Network]] = {}
        for raw in raws:
            try:
                doc = orjson.loads(raw)
                if schemas.is_valid("control", doc):
                    net = parse_prefix(doc["command"]["prefix"])
                    last[net] = doc, net
            except (orjson.JSONDecodeError, ValueError):
                continue
        now = time.time() if now is None else now
        for doc, net in last.values():
            if doc["command"]["action"] == "block":
                self._apply(doc, net, now)
        log.info("restored %d blocks from %d commands in the control topic", len(self.blocks), len(raws))

    def handle(self, raw: bytes, now: float | None = None) -> None:
        """One control-topic message: apply it, or reject it (published either way)."""
        now = time.time() if now is None else now
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return self._reject({}, f"not JSON ({e})")
        errs = schemas.errors("control", doc)
        if errs:
            return self._reject(doc.get("command") if isinstance(doc, dict) else {}, f"invalid command: {errs[0]}")
        try:
            net = parse_prefix(doc["command"]["prefix"])
        except ValueError as e:
            return self._reject(doc["command"], str(e))
        self._apply(doc, net, now)

    def _apply(self, doc: dict, net: Network, now: float) -> None:
        """A valid command for `net`: unblock, refuse by policy, or block until its TTL."""
        cmd = doc["command"]
        if cmd["action"] == "unblock":
            return self._unblock(net, cmd, "block_removed", cmd.get("reason") or "unblocked")
        refusal = self.policy.refuse(net, cmd["ttl_s"])
        if refusal:
            return self._reject(cmd, refusal)
        expires = schemas.timestamp_s(doc["@timestamp"]) + cmd["ttl_s"]
        if expires <= now:
            log.debug("block of %s (command %s) ended before this start: skipped", net, cmd["id"])
            return
        table = self._tables[net.version]
        key = self._key(table, net)
        if net not in self.blocks:
            table[key] = table.Leaf()
        block = _Block(expires, net, cmd)
        self.blocks[net] = block
        heapq.heappush(self._expiry, block)
        log.warning("blocking %s until %s (%s; command %s%s)", net, _iso(expires), cmd.get("reason") or "no reason",
                    cmd["id"], f", alert {cmd['alert_id']}" if cmd.get("alert_id") else "")
        self._publish("block_applied", cmd, net, expires=expires)

    def expire(self, now: float | None = None) -> None:
        """Lift every block whose TTL has passed."""
        now = time.time() if now is None else now
        while self._expiry and self._expiry[0].expires <= now:
            block = heapq.heappop(self._expiry)
            if self.blocks.get(block.net) is block:
                self._unblock(block.net, block.command, "block_expired", "ttl passed")

    def close(self) -> None:
        """The program (and its maps) go away with the producer: say so for each block."""
        for net, block in list(self.blocks.items()):
            self._unblock(net, block.command, "block_removed", "producer stopped (restored from the control "
                                                              "topic at the next start if its TTL has not passed)")

    def _unblock(self, net: Network, cmd: dict, action: str, reason: str) -> None:
        block = self.blocks.pop(net, None)
        if block is None:
            if action == "block_removed" and cmd.get("action") == "unblock":
                log.info("unblock %s: it was not blocked", net)
            return
        table = self._tables[net.version]
        key = self._key(table, net)
        matched = table.get(key)
        packets, nbytes = (matched.packets, matched.bytes) if matched is not None else (0, 0)
        del table[key]
        log.warning("%s %s: %d packets matched while it was in place", action.replace("_", " "), net, packets)
        self._publish(action, cmd, net, reason=reason, expires=block.expires, packets=packets, nbytes=nbytes)

    def _reject(self, cmd, why: str) -> None:
        cmd = cmd if isinstance(cmd, dict) else {}
        log.error("control command %s rejected: %s", cmd.get("id", "?"), why)
        self._publish("command_rejected", cmd, None, reason=why, rejection=why)

    def _publish(self, action: str, cmd: dict, net: Network | None, *, reason: str | None = None,
                 expires: float | None = None, packets: int | None = None, nbytes: int | None = None,
                 rejection: str | None = None) -> None:
        e = {"mode": self.mode}
        if net is not None:
            e["prefix"] = str(net)
        elif isinstance(cmd.get("prefix"), str):
            e["prefix"] = cmd["prefix"][:64]
        if expires is not None:
            e["expires"] = _iso(expires)
        for src, dst in (("id", "command_id"), ("alert_id", "alert_id"), ("issued_by", "issued_by")):
            if isinstance(cmd.get(src), str):
                e[dst] = cmd[src]
        if rejection is not None:
            e["rejection"] = rejection
        if packets is not None:
            e["packets"], e["bytes"] = packets, nbytes
        self.publish(self.shaper.enforcement(action, e, reason or cmd.get("reason")))


def _iso(epoch_s: float) -> str:
    return iso(int(epoch_s * 1e9))
