"""The consumers' compiled validator (jsonschema-rs) must agree with jsonschema (the
reference implementation of draft 2020-12, the schemas' own dialect) on every document: valid ones and
thousands of mutations of them (hypothesis)."""

from __future__ import annotations

import copy

import orjson

from hypothesis import given, settings
from hypothesis import strategies as st

from xdpwatch import schemas
from xdpwatch.producer.events import Clock, EventShaper
from xdpwatch.producer.flows import FlowReport
from xdpwatch.producer.records import FlowKey, FlowValue

S = 10**9


class FixedClock(Clock):
    def resync(self):
        self._offset = 1_800_000_000 * S


def samples() -> dict[str, list[dict]]:
    shaper = EventShaper("eth0", FixedClock(), hostname="gw1")
    k = FlowKey(family=4, proto=6, client_port=40000, server_port=22)
    k.client_addr[:4] = [203, 0, 113, 9]
    k.server_addr[:4] = [192, 0, 2, 1]
    v = FlowValue(first_ns=S, last_ns=2 * S, packets=3, bytes=222, tcp_flags=0x13, directions=1)
    flows = [shaper.flow(FlowReport(a, r, k, v)) for a, r in (("flow_start", None), ("flow_update", None),
                                                             ("flow_end", "fin"), ("flow_end", "evicted"))]
    counts = [shaper.packet_counts(S, 2 * S, [(i, 60 * i) for i in range(15)], 0, 1, final=f) for f in (False, True)]
    alert = {"@timestamp": "2026-11-25T10:00:00.000000Z",
             "event": {"id": "a1", "kind": "alert", "module": "xdpwatch", "dataset": "xdpwatch.alerts",
                       "category": ["intrusion_detection"], "type": ["indicator"], "severity": 70,
                       "start": "2026-11-25T10:00:00.000000Z", "end": "2026-11-25T10:00:00.000000Z"},
             "rule": {"name": "ssh_bruteforce", "description": "d"}, "message": "m"}
    out = {"ssh-flows": flows, "packet-counts": counts, "alerts": [alert]}
    for stream, docs in out.items():
        for d in docs:
            if stream != "alerts":
                assert schemas.errors(stream, d) == [], (stream, schemas.errors(stream, d))
    return out


SAMPLES = samples()
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(allow_nan=False),
                   st.sampled_from(["", "x", "not-an-ip", "10.0.0.1", "2001:db8::1", "2026-11-25T10:00:00Z",
                                    "2026-13-45T99:00:00Z", "2026-02-29T10:00:00Z", "2028-02-29T23:59:60Z",
                                    "2026-11-25T10:00:00.5+01:00", "2026-11-25t10:00:00Z", "010.0.0.1", "10.0.0.256",
                                    "::ffff:10.0.0.1", "fe80::1%eth0", "1.2.3", "flow_start", "fin", "tcp", "SYN", "1:" + "A" * 27 + "="]),
                   st.builds(list), st.builds(dict), st.builds(lambda: ["SYN", "SYN"]))


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


@st.composite
def mutated(draw):
    stream = draw(st.sampled_from(sorted(SAMPLES)))
    doc = copy.deepcopy(draw(st.sampled_from(SAMPLES[stream])))
    for _ in range(draw(st.integers(1, 3))):
        all_paths = [p for p in paths(doc) if p]
        if not all_paths:
            break
        path = draw(st.sampled_from(all_paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "set":
            parent[path[-1]] = draw(LEAVES)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "ip", "reason", "zz"]))] = draw(LEAVES)
    return stream, doc


def test_valid_samples_pass_both():
    for stream, docs in SAMPLES.items():
        for d in docs:
            assert schemas.is_valid(stream, d) == (schemas.errors(stream, d) == [])


@settings(max_examples=5000, deadline=None)
@given(mutated())
def test_fast_and_full_validators_agree(case):
    stream, doc = case
    assert schemas.is_valid(stream, doc) == (schemas.errors(stream, doc) == []), schemas.errors(stream, doc)


# ---------------------------------------------------------------- hostile documents
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.0, 1.0, 2.5, -1.0])
                    | st.sampled_from(["", "a", "SYN", "1"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2),
                    max_leaves=8)


@settings(max_examples=3000, deadline=None)
@given(st.lists(JSON, max_size=6))
def test_linear_unique_items_agrees_with_jsonschema(items):
    from jsonschema._utils import uniq

    assert schemas.all_unique(items) == uniq(items)


def flags_doc(flags) -> dict:
    doc = copy.deepcopy(SAMPLES["ssh-flows"][0])
    doc["tcp"]["flags"] = flags
    return doc


def test_error_reports_are_bounded():
    # 240 KB of tcp.flags: each item an error, and the repr of the whole array in one message.
    for flags in (list(range(40_000)), [{"a": i} for i in range(20_000)], ["SYN"] * 40_000, [[]] * 80_000):
        doc = flags_doc(flags)
        assert not schemas.is_valid("ssh-flows", doc)
        errs = schemas.errors("ssh-flows", doc)
        assert 1 <= len(errs) <= 3 and all(len(e) <= schemas.MAX_ERROR_CHARS for e in errs), errs
        assert all(e.startswith("tcp/flags") for e in errs)
    assert len(schemas.errors("ssh-flows", flags_doc(list(range(100))), limit=10)) == 10


def test_deeply_nested_documents_are_invalid_not_errors():
    # jsonschema-rs raised ValueError("Recursion limit reached") comparing two deep arrays for
    # uniqueItems: every consumer validating such a message crashed.
    for depth in (300, 1000):
        deep = orjson.loads(b"[" * depth + b"]" * depth)
        doc = flags_doc([deep, deep])
        assert schemas.is_valid("ssh-flows", doc) is False
        errs = schemas.errors("ssh-flows", doc)
        assert 1 <= len(errs) <= 3, errs
