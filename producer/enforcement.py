"""Prevention: the XDP program's blocklist and allowlist, driven by commands from Kafka.

Off unless `produce --enforce` (matching packets are dropped) or `--dry-run` (counted as
what would have been dropped). Commands (schemas/control.v1.json) come from the control
topic, which is read from its beginning at every start: a block outlives a restart of the
producer for exactly its TTL. Every decision goes to the enforcement topic
(schemas/enforcement.v1.json) with its cause: applied, removed, expired, or rejected.

Safety: the allowlist (loopback always, plus --allow) wins over any block in the kernel,
and a command that overlaps it or the never-block list (this host's addresses, its default
gateways, the Kafka brokers: producer/hostnet.py), is wider than the policy allows, lasts
too long, is dated more than MAX_FUTURE_S ahead of this producer's clock, or finds the
blocklist full is rejected and never reaches the kernel.

Anyone who can write the control topic is an adversary here: each command is decided on its
own, every check comes before the map is written, and whatever goes wrong with one command
is that command's rejection. Nothing a command says raises out of `handle` or `restore`.
"""

from __future__ import annotations

import ctypes as ct
import functools
import heapq
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import orjson

from xdpwatch import schemas
from xdpwatch.producer.hostnet import Protected

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ALWAYS_ALLOWED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# A command may be dated this far ahead of this producer's clock (clock skew between the
# issuing host and this one); further ahead it is rejected, so that no date can stretch a block.
MAX_FUTURE_S = 300
MAX_REASON = 512  # a rejection's reason is cut to this many characters (it may quote the command)
MAX_ECHOED = 256  # the most of a malformed command's strings repeated on the enforcement topic


def parse_prefix(text: str) -> Network:
    """An address or CIDR prefix; host bits are cleared (198.51.100.7/24 -> .0/24)."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address or prefix") from None
    if getattr(net.network_address, "scope_id", None):
        raise ValueError(f"{text!r} has a scope (%{net.network_address.scope_id}): give the address alone")
    return net


def _range(net: Network) -> tuple[int, int]:
    """The prefix as an integer range (overlap tests in a few integer comparisons)."""
    lo = int(net.network_address)
    return lo, lo | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


@dataclass(frozen=True)
class Policy:
    allow: tuple[Network, ...] = ()
    min_prefix_v4: int = 8      # nothing wider than a /8 ...
    min_prefix_v6: int = 32     # ... or a /32
    max_ttl_s: int = 7 * 86400  # no block outlives this, counted from when the producer got it

    @property
    def allowlist(self) -> tuple[Network, ...]:
        return ALWAYS_ALLOWED + tuple(n for n in self.allow if n not in ALWAYS_ALLOWED)

    @functools.cached_property
    def _allow_ranges(self) -> tuple[tuple[Network, int, int], ...]:
        return tuple((a, *_range(a)) for a in self.allowlist)

    def refuse(self, net: Network, ttl_s: int | None, protected: Iterable[Protected] = ()) -> str | None:
        """Why a block of `net` for `ttl_s` is out of policy or would block a `protected`
        prefix, or None."""
        widest = self.min_prefix_v4 if net.version == 4 else self.min_prefix_v6
        if net.prefixlen < widest:
            return f"prefix {net} is wider than the policy allows (at most /{widest} for IPv{net.version})"
        lo, hi = _range(net)
        for p in protected:
            if p.net.version == net.version and p.lo <= hi and lo <= p.hi:
                return f"{p}: never blocked (prefix {net} overlaps it)"
        for a, alo, ahi in self._allow_ranges:
            if a.version == net.version and alo <= hi and lo <= ahi:
                return f"prefix {net} overlaps the allowlist entry {a}: allowlisted addresses are never blocked"
        if ttl_s is not None and ttl_s > self.max_ttl_s:
            return f"ttl {ttl_s}s is longer than the policy allows ({self.max_ttl_s}s)"
        return None


class Rejected(Exception):
    """A command refused: `reason` goes to the enforcement topic."""

    def __init__(self, reason: str, cmd=None):
        super().__init__(reason)
        self.reason, self.cmd = reason, cmd


@dataclass
class RestoreStats:
    commands: int = 0  # read from the control topic
    applied: int = 0   # blocks in place after the restore
    refused: int = 0   # malformed or refused commands (reported when they first arrived)
    seconds: float = 0.0


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
        self.capacity = {v: int(t.max_entries) for v, t in self._tables.items()}  # BLOCKLIST_SIZE per family
        self.blocks: dict[Network, _Block] = {}
        self._count = {4: 0, 6: 0}  # blocks per family
        self._expiry: list[_Block] = []  # heap; stale entries skipped
        self.protected: tuple[Protected, ...] = ()
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

    # ---------------------------------------------------------------- never-block list
    def protect(self, entries: Iterable[Protected]) -> None:
        """The never-block list from now on (this host's addresses, gateways, brokers: see
        producer/hostnet.py). A block in place that overlaps a newly protected prefix is
        lifted (block_removed, with the reason). Cheap when nothing changed."""
        entries = tuple(dict.fromkeys(entries))
        added = set(entries) - set(self.protected)
        if not added and len(entries) == len(self.protected):
            return
        self.protected = entries
        log.info("never blocked (besides the allowlist): %s", "; ".join(map(str, entries)) or "nothing")
        for p in added:
            for net, block in list(self.blocks.items()):
                lo, hi = _range(net)
                if net.version == p.net.version and p.lo <= hi and lo <= p.hi:
                    self._unblock(net, block.command, "block_removed", f"{p}: a block overlapping it is lifted")

    # ---------------------------------------------------------------- commands
    def restore(self, raws: Iterable[bytes], now: float | None = None) -> RestoreStats:
        """The control topic's history at start (before any `handle`), read as a stream:
        each command is decided as it would be live, in order; each prefix's last valid
        command counts (an unblock lifts, a block over by `now` ends the prefix's block),
        and only the blocks in place at the end are applied and reported. What was rejected
        or lifted before was reported then. Holds at most the blocklists' capacity, whatever
        the length of the history; never raises for a command."""
        started = time.monotonic()
        now = time.time() if now is None else now
        stats = RestoreStats()
        pending: dict[Network, tuple[float, dict]] = {}
        counts = {4: 0, 6: 0}
        for raw in raws:
            stats.commands += 1
            try:
                cmd, net, issued, _ = self._command(raw, now)
                if cmd["action"] == "block":
                    expires = self._expiry_of(cmd, net, issued, now, pending, counts)
                    if expires is not None:
                        counts[net.version] += net not in pending
                        pending[net] = (expires, cmd)
                        continue
                if pending.pop(net, None) is not None:
                    counts[net.version] -= 1
            except Exception as e:  # Rejected, or anything a command could provoke
                stats.refused += 1
                if not isinstance(e, Rejected):
                    log.debug("control command skipped at restore: %r", e)
        for net, (expires, cmd) in pending.items():
            try:
                self._install(net, cmd, expires)
                stats.applied += 1
            except Exception as e:
                stats.refused += 1
                log.error("restoring the block of %s failed: %s", net, e)
        stats.seconds = time.monotonic() - started
        log.info("restored %d blocks from %d commands in the control topic (%d refused or malformed) in %.1fs",
                 stats.applied, stats.commands, stats.refused, stats.seconds)
        return stats

    def handle(self, raw: bytes, now: float | None = None) -> None:
        """One control-topic message: apply it, or reject it (published either way). An
        unblock of a prefix that is not blocked is logged only. A block already over when
        it arrives ends the prefix's block if there is one (block_removed), as `restore`
        would read it, and is rejected otherwise."""
        now = time.time() if now is None else now
        cmd = None
        try:
            cmd, net, issued, stamp = self._command(raw, now)
            if cmd["action"] == "unblock":
                return self._unblock(net, cmd, "block_removed", cmd.get("reason") or "unblocked")
            expires = self._expiry_of(cmd, net, issued, now, self.blocks, self._count)
            if expires is None:
                over = f"already over when it arrived (issued {stamp}, ttl {cmd['ttl_s']}s)"
                if net in self.blocks:  # it replaces the block in place, as a restore would read it
                    return self._unblock(net, cmd, "block_removed", f"replaced by a block {over}")
                raise Rejected(over, cmd)
            self._install(net, cmd, expires)
        except Rejected as r:
            self._reject(r.cmd if r.cmd is not None else cmd, r.reason)
        except Exception as e:  # nothing a command says may stop the producer
            log.error("control command could not be applied: %r", e)
            self._reject(cmd, f"could not be applied: {e}")

    def _command(self, raw: bytes, now: float) -> tuple[dict, Network, float, str]:
        """A well-formed command dated at most MAX_FUTURE_S ahead: (command, prefix, issued
        as epoch seconds, issued as written). Raises Rejected."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise Rejected(f"not JSON ({e})") from None
        if not schemas.is_valid("control", doc):
            # The first error only: a crafted document can have very many.
            first = next(iter(schemas.validator("control").iter_errors(doc)))
            where = "/".join(map(str, first.absolute_path)) or "(root)"
            raise Rejected(f"invalid command: {where}: {first.message}", doc.get("command") if isinstance(doc, dict)
                           else None)
        cmd = doc["command"]
        try:
            net = parse_prefix(cmd["prefix"])
        except ValueError as e:
            raise Rejected(str(e), cmd) from None
        try:
            issued = schemas.parse_time(doc["@timestamp"])
        except (ValueError, OverflowError) as e:
            raise Rejected(f"@timestamp {doc['@timestamp']!r} is not a usable date ({e})", cmd) from None
        if issued > now + MAX_FUTURE_S:
            raise Rejected(f"issued in the future: @timestamp {doc['@timestamp']} is {issued - now:.0f}s ahead of "
                           f"this producer's clock (at most {MAX_FUTURE_S}s allowed)", cmd)
        return cmd, net, issued, doc["@timestamp"]

    def _expiry_of(self, cmd: dict, net: Network, issued: float, now: float, active, counts) -> float | None:
        """When a block by `cmd` ends: issued + ttl, but never later than `now` + the
        policy's longest TTL; None when that is already past. Raises Rejected when out of
        policy, protected, or when the family's blocklist (`active`, `counts`) is full."""
        refusal = self.policy.refuse(net, cmd["ttl_s"], self.protected)
        if refusal:
            raise Rejected(refusal, cmd)
        expires = min(issued + cmd["ttl_s"], now + self.policy.max_ttl_s)
        if expires <= now:
            return None
        v = net.version
        if net not in active and counts[v] >= self.capacity[v]:
            raise Rejected(f"blocklist full: {self.capacity[v]} entries (IPv{v})", cmd)
        return expires

    def _install(self, net: Network, cmd: dict, expires: float) -> None:
        """Put `net` in the blocklist until `expires` and report it. Everything that can
        fail on the command's content (the report included) happens before the map is
        written; a failed write leaves everything as it was."""
        event = self._event("block_applied", cmd, net, expires=expires)
        table = self._tables[net.version]
        if net not in self.blocks:
            table[self._key(table, net)] = table.Leaf()
            self._count[net.version] += 1
        block = _Block(expires, net, cmd)
        self.blocks[net] = block
        heapq.heappush(self._expiry, block)
        if len(self._expiry) > 2 * len(self.blocks) + 1024:  # renewals leave stale entries: compact
            self._expiry = sorted(self.blocks.values())
        log.warning("blocking %s until %s (%s; command %s%s)", net, event["xdpwatch"]["enforcement"]["expires"],
                    cmd.get("reason") or "no reason", cmd["id"],
                    f", alert {cmd['alert_id']}" if cmd.get("alert_id") else "")
        self.publish(event)

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
        self._count[net.version] -= 1
        table = self._tables[net.version]
        key = self._key(table, net)
        matched = table.get(key)
        packets, nbytes = (matched.packets, matched.bytes) if matched is not None else (0, 0)
        try:
            del table[key]
        except KeyError:
            log.error("block of %s was already gone from the kernel's map", net)
        log.warning("%s %s: %d packets matched while it was in place", action.replace("_", " "), net, packets)
        self.publish(self._event(action, cmd, net, reason=reason, expires=block.expires, packets=packets,
                                 nbytes=nbytes))

    def _reject(self, cmd, why: str) -> None:
        cmd = cmd if isinstance(cmd, dict) else {}
        if len(why) > MAX_REASON:
            why = why[:MAX_REASON - 3] + "..."
        log.error("control command %.128s rejected: %s", cmd.get("id", "?"), why)
        self.publish(self._event("command_rejected", cmd, None, reason=why, rejection=why))

    def _event(self, action: str, cmd: dict, net: Network | None, *, reason: str | None = None,
               expires: float | None = None, packets: int | None = None, nbytes: int | None = None,
               rejection: str | None = None) -> dict:
        e = {"mode": self.mode}
        if net is not None:
            e["prefix"] = str(net)
        elif isinstance(cmd.get("prefix"), str):
            e["prefix"] = cmd["prefix"][:64]
        if expires is not None:
            e["expires"] = schemas.format_time(expires)
        for src, dst in (("id", "command_id"), ("alert_id", "alert_id"), ("issued_by", "issued_by")):
            if isinstance(cmd.get(src), str):
                e[dst] = cmd[src][:MAX_ECHOED]
        if rejection is not None:
            e["rejection"] = rejection
        if packets is not None:
            e["packets"], e["bytes"] = packets, nbytes
        if reason is None and isinstance(cmd.get("reason"), str):
            reason = cmd["reason"][:1024]
        return self.shaper.enforcement(action, e, reason)
