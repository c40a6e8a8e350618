"""Random bodies, headers and signatures against the peer endpoint of a running
supervisor: always a 4xx, never a crash, never a state change (safety property 6)."""

from __future__ import annotations

import http.client
import json
import time

import pytest
from daemon_fixture import RunningWitness, start_witness, stop_witness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failoverd.adapters.peers import PATH, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from failoverd.core.messages import MESSAGE_TYPES

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def witness(tmp_path_factory) -> RunningWitness:
    w = start_witness(tmp_path_factory.mktemp("fuzz"))
    yield w
    stop_witness(w)


def post(w: RunningWitness, body: bytes, headers: dict[str, str], path: str = PATH) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", w.peer_port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def signed(w: RunningWitness, body: bytes) -> dict[str, str]:
    ts = f"{time.time():.6f}"
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(w.secret, ts, "w1", body), "Content-Type": "application/json"}


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


def check_unchanged(w: RunningWitness, before: bytes, status: int) -> None:
    assert 400 <= status < 500, status
    assert w.alive(), w.stderr()[-2000:]
    assert w.state_bytes() == before


@FUZZ
@given(body=st.binary(max_size=2048), timestamp=header_text, signature=header_text)
def test_random_bytes_and_headers_are_refused(witness, body, timestamp, signature):
    before = witness.state_bytes()
    status = post(witness, body, {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature})
    check_unchanged(witness, before, status)


@FUZZ
@given(value=json_values)
def test_signed_random_json_is_refused(witness, value):
    before = witness.state_bytes()
    body = json.dumps(value).encode()
    check_unchanged(witness, before, post(witness, body, signed(witness, body)))


@FUZZ
@given(
    kind=st.sampled_from(sorted(MESSAGE_TYPES)),
    fields=st.dictionaries(
        st.sampled_from(
            [
                "cluster",
                "sender",
                "term",
                "seq",
                "position",
                "stamp",
                "state",
                "granted",
                "reason",
                "transfer_from",
                "waive_wal_check",
                "accepted",
                "commit_version",
                "x",
            ]
        ),
        json_values,
        max_size=8,
    ),
)
def test_signed_message_shaped_garbage_is_refused(witness, kind, fields):
    """Message-shaped bodies with the right signature: wrong cluster, a sender
    that is no member, or fields of the wrong type; all refused before the core."""
    before = witness.state_bytes()
    fields = dict(fields)
    fields.setdefault("cluster", "another-cluster")
    body = json.dumps({"type": kind, **fields}).encode()
    check_unchanged(witness, before, post(witness, body, signed(witness, body)))


def test_a_valid_message_for_another_cluster_and_a_replay_are_refused(witness):
    before = witness.state_bytes()
    body = json.dumps({"type": "heartbeat", "cluster": "other", "sender": "db1", "term": 99}).encode()
    check_unchanged(witness, before, post(witness, body, signed(witness, body)))
    body = json.dumps({"type": "timeout_now", "cluster": "fuzz", "sender": "nobody", "term": 99}).encode()
    check_unchanged(witness, before, post(witness, body, signed(witness, body)))
    # A well-signed message from a member, sent twice: the second is a replay.
    body = json.dumps({"type": "timeout_now", "cluster": "fuzz", "sender": "db1", "term": 0}).encode()
    headers = signed(witness, body)
    assert post(witness, body, headers) == 204
    check_unchanged(witness, before, post(witness, body, headers))


def test_oversized_body_and_other_paths(witness):
    before = witness.state_bytes()
    big = b"{" + b" " * (1 << 20) + b"}"
    check_unchanged(witness, before, post(witness, big, signed(witness, big)))
    check_unchanged(witness, before, post(witness, b"{}", signed(witness, b"{}"), path="/peer/v2/x"))
