"""Property tests of the peer-message boundary and of the state-file form.

`decode_message_bytes` / `decode_message` are where a peer's bytes enter the
core: every defect must come out as `ProtocolError` and nothing half-checked
may get through. `Node.receive` must reject (with `ProtocolError`, changing
nothing) messages from another cluster, from a non-member or from itself.
`PersistentState.from_wire` may only raise TypeError/ValueError on garbage.

Defects hypothesis found (integers of more than 4300 digits, nesting just
below the recursion limit) are pinned by regression tests at the end of each
section; the random strategies keep clear of those exact inputs so that the
properties stay deterministic.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from failoverd.core import actions as act
from failoverd.core.messages import (
    MAX_MESSAGE_BYTES,
    MAX_SEQ,
    MAX_TERM,
    MESSAGE_TYPES,
    Heartbeat,
    HeartbeatAck,
    PreVoteRequest,
    PreVoteResponse,
    ProtocolError,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
    decode_message,
    decode_message_bytes,
    encode_message,
    encode_message_bytes,
)
from failoverd.core.node import Node, Role
from failoverd.core.spec import ClusterSpec, Member
from failoverd.core.state import (
    MAX_HISTORY,
    MAX_LSN,
    MAX_TIMELINE,
    ClusterState,
    HistoryEntry,
    PersistentState,
    PgObservation,
    PgRole,
    Position,
    StateStamp,
)

# Budget: the whole file runs in well under 20 s. FAST for cheap inputs, HEAVY for
# big generated structures, QUICK for the specialised ones.
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MESSAGE_CLASSES = (PreVoteRequest, PreVoteResponse, VoteRequest, VoteResponse, Heartbeat, HeartbeatAck, TimeoutNow)
INT_DIGITS_LIMIT = 4300  # CPython's default int <-> str conversion limit (sys.get_int_max_str_digits)

# ------------------------------------------------------------------ strategies

# Any Unicode, lone surrogates included: json escapes them and gets them back.
any_char = st.characters(exclude_categories=())
names = st.text(any_char, min_size=1, max_size=63)
names_or_none = st.none() | names
u62 = st.integers(0, 2**62)

positions = st.builds(Position, timeline=st.integers(1, MAX_TIMELINE), lsn=st.integers(0, MAX_LSN))
positions_or_none = st.none() | positions
stamps = st.builds(StateStamp, written_term=u62, version=u62)
wall_times = st.none() | st.floats(min_value=0, max_value=1e11, exclude_max=True) | st.integers(0, 10**11 - 1)
history_entries = st.builds(
    HistoryEntry,
    term=u62,
    from_node=names_or_none,
    to_node=names,
    reason=st.text(any_char, max_size=200),
    position=positions_or_none,
    wall_time=wall_times,
)
cluster_states = st.builds(
    ClusterState,
    stamp=stamps,
    primary=names_or_none,
    sync_count=st.integers(0, 16),
    paused=st.booleans(),
    switchover_to=names_or_none,
    # A full history of 50 is covered by test_boundary_values_round_trip; keep generation cheap.
    history=st.lists(history_entries, max_size=4).map(tuple),
)
persistent_states = st.builds(
    PersistentState, term=u62, voted_for=names_or_none, state=cluster_states, commit_version=u62
)


def envelope(cluster=names, sender=names, term=st.integers(0, MAX_TERM)) -> dict[str, st.SearchStrategy]:
    return {"cluster": cluster, "sender": sender, "term": term}


def message_strategy(cls: type, **env: st.SearchStrategy) -> st.SearchStrategy:
    fields = envelope(**env)
    reason = st.text(any_char, max_size=500)
    if cls in (PreVoteRequest, VoteRequest):
        fields.update(position=positions_or_none, stamp=stamps)
        if cls is VoteRequest:
            fields["transfer_from"] = names_or_none
    elif cls in (PreVoteResponse, VoteResponse):
        fields.update(granted=st.booleans(), vouches_wal=st.booleans(), reason=reason)
    elif cls is Heartbeat:
        fields.update(
            seq=st.integers(0, MAX_SEQ),
            state=cluster_states,
            commit_version=u62,
            primary_ready=st.booleans(),
            primary_position=positions_or_none,
        )
    elif cls is HeartbeatAck:
        fields.update(
            seq=st.integers(0, MAX_SEQ),
            success=st.booleans(),
            accepted=stamps,
            position=positions_or_none,
            position_fresh=st.booleans(),
            pg_healthy=st.booleans(),
            following_leader=st.booleans(),
            reason=reason,
        )
    return st.builds(cls, **fields)


def any_message(**env: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(*(message_strategy(cls, **env) for cls in MESSAGE_CLASSES))


messages = any_message()

# Integers that matter to the checks, and "huge" ones that CPython can still
# print (beyond INT_DIGITS_LIMIT digits see the regression tests below).
edge_ints = st.sampled_from(
    [
        0,
        1,
        -1,
        2**31,
        2**32 - 1,
        2**32,
        2**53 + 1,
        2**62,
        2**62 + 1,
        2**63,
        2**64 - 1,
        2**64,
        -(2**64),
        10**100,
        -(10**300),
    ]
)
big_ints = st.integers(-(10**1000), 10**1000)
special_floats = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 1e308, 5e-324, 2.0**62, 2.0**64])
FIELD_NAMES = sorted(
    {f.name for cls in MESSAGE_CLASSES for f in dataclasses.fields(cls)}
    | {
        "type",
        "stamp",
        "primary",
        "sync_count",
        "paused",
        "switchover_to",
        "history",
        "from",
        "to",
        "wall_time",
        "voted_for",
    }
)
json_keys = st.sampled_from(FIELD_NAMES) | st.text(any_char, max_size=10)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | edge_ints
    | big_ints
    | st.floats()
    | special_floats
    | st.text(any_char, max_size=80)
    | st.sampled_from(sorted(MESSAGE_TYPES))
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(json_keys, children, max_size=5),
    max_leaves=12,
)


# --------------------------------------------------------------------- helpers


def assert_well_formed(msg: Any) -> None:
    """A decoded message holds only checked values of the declared types."""
    assert type(msg) in MESSAGE_CLASSES
    for name in ("cluster", "sender"):
        value = getattr(msg, name)
        assert isinstance(value, str) and 1 <= len(value) <= 63
    for name in ("term", "seq", "commit_version"):
        if hasattr(msg, name):
            value = getattr(msg, name)
            assert type(value) is int and 0 <= value <= MAX_TERM
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name in ("position", "primary_position"):
            assert value is None or type(value) is Position
        elif f.name in ("stamp", "accepted"):
            assert type(value) is StateStamp
        elif f.name == "state":
            assert type(value) is ClusterState
            assert type(value.stamp) is StateStamp
            assert type(value.history) is tuple and len(value.history) <= MAX_HISTORY
            assert all(type(h) is HistoryEntry for h in value.history)
            assert all(h.position is None or type(h.position) is Position for h in value.history)
        elif f.name in (
            "granted",
            "vouches_wal",
            "success",
            "position_fresh",
            "pg_healthy",
            "following_leader",
            "primary_ready",
        ):
            assert type(value) is bool
        elif f.name == "reason":
            assert type(value) is str and len(value) <= 500
        elif f.name == "transfer_from":
            assert value is None or (type(value) is str and 1 <= len(value) <= 63)
    # A decoded message can be sent on unchanged (NaN wall_time breaks ==, so compare bytes).
    wire = encode_message_bytes(msg)
    assert encode_message_bytes(decode_message_bytes(wire)) == wire


def check_bytes(body: bytes) -> None:
    """decode_message_bytes either yields a well-formed message or raises ProtocolError."""
    try:
        msg = decode_message_bytes(body)
    except ProtocolError:
        event("bytes: ProtocolError")
        return
    event("bytes: decoded")
    assert_well_formed(msg)


def check_value(value: Any) -> None:
    """Both entry points: the parsed value, and its JSON text."""
    try:
        msg = decode_message(value)
    except ProtocolError:
        event("value: ProtocolError")
    else:
        event("value: decoded")
        assert_well_formed(msg)
    check_bytes(json.dumps(value).encode())


def nested(depth: int, leaf: Any = None) -> Any:
    """A list nested `depth` deep, built without recursion."""
    value: Any = [] if leaf is None else leaf
    for _ in range(depth - 1 if leaf is None else depth):
        value = [value]
    return value


def near_recursion_limit() -> range:
    """Nesting depths around the point where json.loads starts to fail from here.

    Python frames and C-level recursion share one counter in CPython 3.11, so
    the depth at which parsing succeeds but printing fails is the recursion
    limit minus the current stack depth, give or take a few frames.
    """
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    low = max(1, sys.getrecursionlimit() - depth - 100)
    return range(low, sys.getrecursionlimit() + 10)


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place inside a JSON value (dict keys, list indices), the root excluded."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((*prefix, k))
            out.extend(json_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append((*prefix, i))
            out.extend(json_paths(v, (*prefix, i)))
    return out


def parent_of(root: Any, path: tuple) -> Any:
    for step in path[:-1]:
        root = root[step]
    return root


# ============================================================ 1. round trip


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.TYPE)
@HEAVY
@given(data=st.data())
def test_round_trip_every_message_type(cls, data):
    msg = data.draw(message_strategy(cls))
    wire = encode_message_bytes(msg)
    assert len(wire) <= MAX_MESSAGE_BYTES or cls is Heartbeat  # only a full history can grow large
    assume(len(wire) <= MAX_MESSAGE_BYTES)
    decoded = decode_message_bytes(wire)
    assert type(decoded) is cls
    assert decoded == msg
    assert decode_message(encode_message(msg)) == msg
    assert_well_formed(decoded)


@FAST
@given(entry=history_entries)
def test_history_entry_round_trip(entry):
    assert HistoryEntry.from_wire(json.loads(json.dumps(entry.to_wire()))) == entry


@HEAVY
@given(state=cluster_states)
def test_cluster_state_round_trip(state):
    assert ClusterState.from_wire(json.loads(json.dumps(state.to_wire()))) == state


@FAST
@given(p=positions, s=stamps)
def test_position_and_stamp_round_trip(p, s):
    assert Position.from_wire(json.loads(json.dumps(p.to_wire()))) == p
    assert StateStamp.from_wire(json.loads(json.dumps(s.to_wire()))) == s


def test_boundary_values_round_trip():
    top = Position(MAX_TIMELINE, MAX_LSN)
    msg = Heartbeat(
        cluster="c" * 63,
        sender="s" * 63,
        term=MAX_TERM,
        seq=MAX_SEQ,
        commit_version=2**62,
        state=ClusterState(
            stamp=StateStamp(2**62, 2**62),
            sync_count=16,
            history=tuple(HistoryEntry(2**62, None, "n", "r" * 200, top, 1e11 - 1) for _ in range(MAX_HISTORY)),
        ),
        primary_position=top,
    )
    assert decode_message_bytes(encode_message_bytes(msg)) == msg


# ====================================================== 2. malformed input


@FAST
@given(body=st.binary(max_size=2048))
def test_arbitrary_bytes(body):
    check_bytes(body)


@HEAVY
@given(msg=messages, body=st.binary(min_size=1, max_size=16), data=st.data())
def test_valid_message_with_bytes_spliced_in(msg, body, data):
    wire = encode_message_bytes(msg)
    start = data.draw(st.integers(0, len(wire)))
    end = data.draw(st.integers(start, min(len(wire), start + 16)))
    check_bytes(wire[:start] + body + wire[end:])


@HEAVY
@given(value=json_values)
def test_arbitrary_json_values(value):
    check_value(value)


@HEAVY
@given(
    kind=st.sampled_from(sorted(MESSAGE_TYPES)),
    fields=st.dictionaries(json_keys, json_scalars | json_values, max_size=8),
)
def test_message_shaped_objects(kind, fields):
    check_value({**fields, "type": kind})


@HEAVY
@given(msg=messages, value=json_values, data=st.data())
def test_one_field_replaced(msg, value, data):
    wire = encode_message(msg)
    path = data.draw(st.sampled_from(json_paths(wire)))
    parent_of(wire, path)[path[-1]] = value
    check_value(wire)


@HEAVY
@given(msg=messages, data=st.data())
def test_one_field_removed(msg, data):
    wire = encode_message(msg)
    path = data.draw(st.sampled_from(json_paths(wire)))
    del parent_of(wire, path)[path[-1]]
    check_value(wire)


@HEAVY
@given(msg=messages, key=st.text(any_char, max_size=20), value=json_values, data=st.data())
def test_unknown_field_added(msg, key, value, data):
    wire = encode_message(msg)
    containers = [()] + [p for p in json_paths(wire) if isinstance(parent_of(wire, (*p, None)), (dict, list))]
    path = data.draw(st.sampled_from(containers))
    target = parent_of(wire, (*path, None))
    if isinstance(target, dict):
        target[key] = value
    else:
        target.insert(data.draw(st.integers(0, len(target))), value)
    try:
        decoded = decode_message(wire)
    except ProtocolError:
        pass
    else:
        assert_well_formed(decoded)
        # Only a list that may legitimately grow (history) can absorb an insert.
        assert path != () or key in encode_message(msg)
    check_bytes(json.dumps(wire).encode())


@HEAVY
@given(msg=messages, key=st.text(any_char, min_size=1, max_size=20), value=json_values)
def test_unknown_top_level_field_is_rejected(msg, key, value):
    wire = encode_message(msg)
    assume(key not in wire)
    wire[key] = value
    with pytest.raises(ProtocolError):
        decode_message(wire)
    with pytest.raises(ProtocolError):
        decode_message_bytes(json.dumps(wire).encode())


@HEAVY
@given(msg=messages, kind=json_values)
def test_wrong_type(msg, kind):
    wire = encode_message(msg)
    wire["type"] = kind
    check_value(wire)
    if not (isinstance(kind, str) and kind in MESSAGE_TYPES):
        with pytest.raises(ProtocolError):
            decode_message(wire)


@HEAVY
@given(msg=messages, kind=st.sampled_from(sorted(MESSAGE_TYPES)))
def test_type_swapped_for_another_message_type(msg, kind):
    wire = encode_message(msg)
    wire["type"] = kind
    check_value(wire)


@pytest.mark.parametrize("field", ["cluster", "sender", "term", "type"])
def test_missing_envelope_field_is_rejected(field):
    wire = encode_message(TimeoutNow(cluster="c", sender="s", term=1))
    del wire[field]
    with pytest.raises(ProtocolError):
        decode_message(wire)


@QUICK
@given(msg=messages, extra=st.integers(1, 20_000), pad=st.sampled_from([b" ", b"\n", b"\t"]))
def test_oversized_body_is_rejected(msg, extra, pad):
    wire = encode_message_bytes(msg)
    assume(len(wire) <= MAX_MESSAGE_BYTES)
    fill = MAX_MESSAGE_BYTES - len(wire)
    assert decode_message_bytes(wire + pad * fill) == msg  # exactly at the limit is fine
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_message_bytes(wire + pad * (fill + extra))


@QUICK
@given(
    head=st.binary(max_size=64), fill=st.sampled_from([b" ", b"[", b"1", b"\x00", b"\xff"]), extra=st.integers(1, 4096)
)
def test_oversized_garbage_is_rejected(head, fill, extra):
    body = head + fill * (MAX_MESSAGE_BYTES - len(head) + extra)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_message_bytes(body)


# Depths well below the recursion limit parse and are rejected by type checks;
# depths above it make json.loads raise RecursionError (mapped to ProtocolError).
# The band just below the limit is pinned by a regression test further down.
# (The band sits at recursion limit minus the caller's stack depth, so stay far below it.)
safe_depths = st.integers(1, sys.getrecursionlimit() // 2) | st.integers(sys.getrecursionlimit() + 50, 30_000)


@QUICK
@given(msg=messages, depth=safe_depths, data=st.data())
def test_deeply_nested_json(msg, depth, data):
    wire = encode_message(msg)
    path = data.draw(st.sampled_from(json_paths(wire)))
    parent_of(wire, path)[path[-1]] = "@@HOLE@@"
    text = json.dumps(wire).replace('"@@HOLE@@"', "[" * depth + "]" * depth)
    check_bytes(text.encode())
    check_bytes(("[" * depth + "]" * depth).encode())
    check_bytes(('{"a":' * depth + "1" + "}" * depth).encode())


@QUICK
@given(
    msg=messages,
    literal=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1.0", "-0", "1E2"]),
    data=st.data(),
)
def test_nan_and_infinity_literals(msg, literal, data):
    wire = encode_message(msg)
    path = data.draw(st.sampled_from(json_paths(wire)))
    parent_of(wire, path)[path[-1]] = "@@HOLE@@"
    check_bytes(json.dumps(wire).replace('"@@HOLE@@"', literal).encode())


@QUICK
@given(msg=messages, digits=st.integers(20, INT_DIGITS_LIMIT), negative=st.booleans(), data=st.data())
def test_huge_integer_literals(msg, digits, negative, data):
    wire = encode_message(msg)
    path = data.draw(st.sampled_from(json_paths(wire)))
    parent_of(wire, path)[path[-1]] = "@@HOLE@@"
    literal = ("-" if negative else "") + "9" * digits
    check_bytes(json.dumps(wire).replace('"@@HOLE@@"', literal).encode())


def _base_wire(kind: str) -> dict:
    pos = Position(1, 100)
    full = {
        "pre_vote": PreVoteRequest(cluster="c", sender="s", term=1, position=pos),
        "vote": VoteRequest(cluster="c", sender="s", term=1, position=pos, transfer_from="t"),
        "heartbeat": Heartbeat(
            cluster="c",
            sender="s",
            term=1,
            primary_position=pos,
            state=ClusterState(history=(HistoryEntry(1, None, "s", "r", pos, 0.0),)),
        ),
        "heartbeat_ack": HeartbeatAck(cluster="c", sender="s", term=1, position=pos),
    }[kind]
    wire = encode_message(full)
    # Every field present, defaults included (the encoder leaves those out),
    # so that each can be made invalid.
    for field in dataclasses.fields(full):
        if field.name not in wire:
            default = field.default
            wire[field.name] = default.to_wire() if hasattr(default, "to_wire") else default
    return wire


def test_fields_at_their_default_are_left_out_and_read_back():
    msg = HeartbeatAck(cluster="c", sender="s", term=1, seq=4, success=True)
    wire = encode_message(msg)
    assert set(wire) == {"type", "cluster", "sender", "term", "seq", "success"}
    assert decode_message(wire) == msg


# (message type, path, JSON literal) that must be refused.
INVALID = [
    ("heartbeat", ("term",), "-1"),
    ("heartbeat", ("term",), str(MAX_TERM + 1)),
    ("heartbeat", ("term",), "1.0"),
    ("heartbeat", ("term",), "true"),
    ("heartbeat", ("term",), '"1"'),
    ("heartbeat", ("term",), "null"),
    ("heartbeat", ("term",), "NaN"),
    ("heartbeat", ("term",), "Infinity"),
    ("heartbeat", ("term",), "-Infinity"),
    ("heartbeat", ("term",), "1e999"),
    ("heartbeat", ("term",), "9" * INT_DIGITS_LIMIT),
    ("heartbeat", ("seq",), "-1"),
    ("heartbeat", ("seq",), str(MAX_SEQ + 1)),
    ("heartbeat", ("commit_version",), "-5"),
    ("heartbeat", ("cluster",), '""'),
    ("heartbeat", ("cluster",), json.dumps("x" * 64)),
    ("heartbeat", ("sender",), "7"),
    ("heartbeat", ("primary_position", 0), "0"),  # timeline 0
    ("heartbeat", ("primary_position", 0), str(MAX_TIMELINE + 1)),
    ("heartbeat", ("primary_position", 1), "-1"),
    ("heartbeat", ("primary_position", 1), str(2**64)),  # lsn beyond 2**64 - 1
    ("heartbeat", ("primary_position", 1), str(2**80)),
    ("heartbeat", ("primary_position", 1), "NaN"),
    ("heartbeat", ("primary_position",), "[1]"),
    ("heartbeat", ("primary_position",), "[1,2,3]"),
    ("heartbeat", ("primary_position",), '{"timeline":1,"lsn":2}'),
    ("heartbeat", ("state", "sync_count"), "17"),
    ("heartbeat", ("state", "sync_count"), "-1"),
    ("heartbeat", ("state", "paused"), "0"),
    ("heartbeat", ("state", "stamp", 0), "-1"),
    ("heartbeat", ("state", "stamp", 1), str(2**62 + 1)),
    ("heartbeat", ("state", "primary"), '""'),
    ("heartbeat", ("state", "history"), json.dumps([None] * (MAX_HISTORY + 1))),
    ("heartbeat", ("state", "history"), "{}"),
    ("heartbeat", ("state", "history", 0, "term"), "-1"),
    ("heartbeat", ("state", "history", 0, "reason"), json.dumps("r" * 201)),
    ("heartbeat", ("state", "history", 0, "wall_time"), '"yesterday"'),
    ("heartbeat", ("state", "history", 0, "wall_time"), "false"),
    ("heartbeat", ("state", "history", 0, "position", 0), "0"),
    ("heartbeat", ("state", "history", 0, "position", 1), str(2**64)),
    ("heartbeat", ("primary_ready",), "1"),
    ("heartbeat_ack", ("reason",), json.dumps("r" * 501)),
    ("heartbeat_ack", ("accepted",), "null"),
    ("heartbeat_ack", ("position", 0), "0"),
    ("heartbeat_ack", ("success",), '"yes"'),
    ("vote", ("transfer_from",), '""'),
    ("vote", ("transfer_from",), "1"),
    ("vote", ("stamp",), "[1]"),
    ("vote", ("position", 0), "-Infinity"),
    ("pre_vote", ("stamp", 0), "-1"),
]


@pytest.mark.parametrize(("kind", "path", "literal"), INVALID, ids=lambda x: str(x)[:40])
def test_specific_invalid_values_are_rejected(kind, path, literal):
    wire = _base_wire(kind)
    parent_of(wire, path)[path[-1]] = "@@HOLE@@"
    body = json.dumps(wire).replace('"@@HOLE@@"', literal).encode()
    with pytest.raises(ProtocolError):
        decode_message_bytes(body)
    parsed = json.loads(body)
    with pytest.raises(ProtocolError):
        decode_message(parsed)


@pytest.mark.parametrize("lsn", [0, MAX_LSN])
@pytest.mark.parametrize("timeline", [1, MAX_TIMELINE])
def test_extreme_valid_positions_are_accepted(timeline, lsn):
    wire = _base_wire("heartbeat")
    wire["primary_position"] = [timeline, lsn]
    assert decode_message(wire).primary_position == Position(timeline, lsn)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b" ",
        b"null",
        b"[]",
        b"{}",
        b'"heartbeat"',
        b"\xff\xfe\x00",
        b"\xef\xbb\xbf{}",
        b"\x00" * 8,
        b'{"type":"heartbeat"}',
        b'{"type":"timeout_now","cluster":"c","sender":"s","term":1,"type":"x"}',
        b'{"type":"timeout_now","cluster":"c","sender":"s","term":1',
        b"NaN",
        b"Infinity",
    ],
)
def test_small_garbage_is_rejected(body):
    with pytest.raises(ProtocolError):
        decode_message_bytes(body)


# ------------------------------------------- regressions: found by hypothesis (decode)


@pytest.mark.parametrize(
    "body",
    [
        b"1" * (INT_DIGITS_LIMIT + 1),
        b'{"type":"heartbeat","cluster":"a","sender":"b","term":' + b"1" * (INT_DIGITS_LIMIT + 1) + b"}",
    ],
    ids=["bare", "term"],
)
def test_integer_literal_beyond_int_max_str_digits(body):
    with pytest.raises(ProtocolError):
        decode_message_bytes(body)


def test_unknown_type_that_cannot_be_printed():
    with pytest.raises(ProtocolError):
        decode_message({"type": 10**5000, "cluster": "c", "sender": "s", "term": 1})


@pytest.mark.parametrize("field", ["term", "cluster", "sender"])
def test_nesting_just_below_the_recursion_limit(field):
    escaped = []
    for depth in near_recursion_limit():
        wire = {"type": "heartbeat", "cluster": "a", "sender": "b", "term": 1, field: "@@HOLE@@"}
        body = json.dumps(wire).replace('"@@HOLE@@"', "[" * depth + "]" * depth).encode()
        try:
            decode_message_bytes(body)
        except ProtocolError:
            pass
        except RecursionError:
            escaped.append(depth)
    assert not escaped, f"RecursionError escaped at nesting depths {escaped}"


# ================================================ 3. node state unchanged

CLUSTER = "pgc"
SPEC = ClusterSpec(CLUSTER, (Member("db1"), Member("db2"), Member("db3")))
PEERS = ("db2", "db3")
NODE_SETUPS = ("fresh", "term5", "follower_with_leader", "pre_candidate", "candidate", "leader")


def make_node(setup: str) -> Node:
    """db1 in one of several roles, all reached through the public inputs."""
    term = 0 if setup == "fresh" else 5
    node = Node(SPEC, "db1", PersistentState(term=term), now=0.0, rng=random.Random(1))
    if setup == "follower_with_leader":
        node.receive(Heartbeat(cluster=CLUSTER, sender="db2", term=5), now=0.5)
        assert node.leader == "db2"
    if setup in ("pre_candidate", "candidate", "leader"):
        node.observe(PgObservation(PgRole.STANDBY, 2.0, Position(1, 1000)), now=2.0)
        node.tick(2.0)
        assert node.role is Role.PRE_CANDIDATE
    if setup in ("candidate", "leader"):
        node.receive(PreVoteResponse(cluster=CLUSTER, sender="db2", term=5, granted=True, vouches_wal=True), now=2.0)
        assert node.role is Role.CANDIDATE and node.term == 6
    if setup == "leader":
        node.receive(VoteResponse(cluster=CLUSTER, sender="db2", term=6, granted=True, vouches_wal=True), now=2.0)
        assert node.role is Role.LEADER
    node.ctx.flush()
    return node


def snapshot(node: Node) -> dict[str, Any]:
    """Every attribute of the node (deep-copied), the rng's state included."""
    snap = {k: copy.deepcopy(v) for k, v in vars(node.ctx).items() if k != "rng"}
    snap["rng"] = node.ctx.rng.getstate()
    snap["persistent_state()"] = node.persistent_state()
    return snap


def test_node_setups_reach_their_roles():
    for setup in NODE_SETUPS:
        make_node(setup)


other_clusters = names.filter(lambda c: c != CLUSTER)
non_member_senders = names.filter(lambda s: s not in PEERS)  # "db1" (ourselves) included


def assert_refused_without_change(setup: str, msg, now: float) -> None:
    node = make_node(setup)
    before = snapshot(node)
    with pytest.raises(ProtocolError):
        node.receive(msg, now)
    assert snapshot(node) == before


@HEAVY
@given(setup=st.sampled_from(NODE_SETUPS), msg=any_message(cluster=other_clusters), now=st.floats(0, 100))
def test_message_from_another_cluster_changes_nothing(setup, msg, now):
    assert_refused_without_change(setup, msg, now)


@HEAVY
@given(
    setup=st.sampled_from(NODE_SETUPS),
    msg=any_message(cluster=st.just(CLUSTER), sender=non_member_senders | st.just("db1")),
    now=st.floats(0, 100),
)
def test_message_from_non_member_or_self_changes_nothing(setup, msg, now):
    assert_refused_without_change(setup, msg, now)


@HEAVY
@given(
    setup=st.sampled_from(NODE_SETUPS),
    msg=any_message(cluster=names, sender=names),
    now=st.floats(0, 100),
)
def test_foreign_messages_that_went_through_the_wire(setup, msg, now):
    """The same, for messages as a peer would actually deliver them (decoded bytes)."""
    assume(msg.cluster != CLUSTER or msg.sender not in PEERS)
    wire = encode_message_bytes(msg)
    assume(len(wire) <= MAX_MESSAGE_BYTES)
    assert_refused_without_change(setup, decode_message_bytes(wire), now)


@HEAVY
@given(
    setup=st.sampled_from(("term5", "follower_with_leader", "candidate", "leader")),
    msg=any_message(cluster=st.just(CLUSTER), sender=st.sampled_from(PEERS), term=st.integers(0, 4)),
    now=st.floats(0.5, 3.0),
)
def test_stale_term_message_does_not_change_persistent_state(setup, msg, now):
    node = make_node(setup)
    before = node.persistent_state()
    role, leader = node.role, node.leader
    actions = node.receive(msg, now)
    assert node.persistent_state() == before
    assert (node.role, node.leader) == (role, leader)
    assert not [a for a in actions if isinstance(a, act.Persist)]


# ================================================= 4. state file form


@HEAVY
@given(state=persistent_states)
def test_persistent_state_round_trip(state):
    assert PersistentState.from_wire(state.to_wire()) == state
    assert PersistentState.from_wire(json.loads(json.dumps(state.to_wire()))) == state


def check_from_wire(value: Any) -> None:
    try:
        PersistentState.from_wire(value)
    except (TypeError, ValueError):
        event("from_wire: TypeError/ValueError")
    else:
        event("from_wire: decoded")


@HEAVY
@given(value=json_values)
def test_persistent_state_from_garbage(value):
    check_from_wire(value)


@HEAVY
@given(state=persistent_states, value=json_values, data=st.data())
def test_persistent_state_with_one_field_replaced(state, value, data):
    wire = state.to_wire()
    path = data.draw(st.sampled_from(json_paths(wire)))
    parent_of(wire, path)[path[-1]] = value
    check_from_wire(wire)


@HEAVY
@given(state=persistent_states, data=st.data())
def test_persistent_state_with_one_field_removed(state, data):
    wire = state.to_wire()
    path = data.draw(st.sampled_from(json_paths(wire)))
    del parent_of(wire, path)[path[-1]]
    check_from_wire(wire)


@pytest.mark.parametrize(
    "value",
    [10**5000, -(10**5000), nested(50), math.nan, math.inf],
    ids=["10**5000", "-10**5000", "nested50", "nan", "inf"],
)
@pytest.mark.parametrize("field", ["term", "voted_for", "commit_version"])
def test_persistent_state_extreme_values(field, value):
    wire = PersistentState().to_wire()
    wire[field] = value
    with pytest.raises((TypeError, ValueError)):
        PersistentState.from_wire(wire)


@pytest.mark.parametrize("field", ["term", "voted_for", "commit_version"])
def test_persistent_state_nesting_just_below_the_recursion_limit(field):
    escaped = []
    for depth in near_recursion_limit():
        try:
            deep = json.loads("[" * depth + "]" * depth)
        except RecursionError:
            continue
        wire = PersistentState().to_wire()
        wire[field] = deep
        try:
            PersistentState.from_wire(wire)
        except (TypeError, ValueError):
            pass
        except RecursionError:
            escaped.append(depth)
    assert not escaped, f"RecursionError escaped at nesting depths {escaped}"
