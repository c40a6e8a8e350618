"""Random handshakes, frames and signed bodies against the peer port of a
running supervisor: always refused (the stream closed, or the message
answered with a refusal), never a crash, never a state change (safety
property 6)."""

from __future__ import annotations

import http.client
import json

import pytest
from daemon_fixture import RunningWitness, start_witness, stop_witness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failoverd.adapters.peer_frames import MAX_FRAME_BYTES
from failoverd.core.messages import MESSAGE_TYPES
from tests.support.peer_stream import Outcome, exchange

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def witness(tmp_path_factory) -> RunningWitness:
    w = start_witness(tmp_path_factory.mktemp("fuzz"))
    yield w
    stop_witness(w)


def send(w: RunningWitness, **kwargs) -> Outcome:
    return exchange(w.peer_port, secret=w.secret, cluster="fuzz", recipient="w1", **kwargs)


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


def check_unchanged(w: RunningWitness, before: bytes, outcome: Outcome) -> None:
    assert outcome.refused, outcome
    assert w.alive(), w.stderr()[-2000:]
    assert w.state_bytes() == before


@FUZZ
@given(hello=st.one_of(header_text, st.binary(max_size=300)), frames=st.lists(st.binary(max_size=2048), max_size=3))
def test_random_hellos_and_frames_are_refused(witness, hello, frames):
    before = witness.state_bytes()
    check_unchanged(witness, before, send(witness, hello=hello, raw=frames))


@FUZZ
@given(frame=st.binary(min_size=1, max_size=2048))
def test_random_frames_on_an_authenticated_stream_close_it(witness, frame):
    before = witness.state_bytes()
    outcome = send(witness, raw=[frame])
    assert outcome.welcomed and outcome.close_code in (4400, 4401), outcome
    check_unchanged(witness, before, outcome)


@FUZZ
@given(value=json_values)
def test_sealed_random_json_is_refused(witness, value):
    before = witness.state_bytes()
    outcome = send(witness, bodies=[json.dumps(value).encode()])
    assert outcome.welcomed and len(outcome.answers) == 1 and outcome.close_code is None, outcome
    check_unchanged(witness, before, outcome)


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
def test_sealed_message_shaped_garbage_is_refused(witness, kind, fields):
    """Message-shaped bodies on an authenticated stream: wrong cluster, a
    sender that is not the stream's, or fields of the wrong type; all refused
    before the core."""
    before = witness.state_bytes()
    fields = dict(fields)
    fields.setdefault("cluster", "another-cluster")
    body = json.dumps({"type": kind, **fields}).encode()
    check_unchanged(witness, before, send(witness, bodies=[body]))


def test_another_cluster_a_non_member_and_a_replay_are_refused(witness):
    before = witness.state_bytes()
    body = json.dumps({"type": "heartbeat", "cluster": "other", "sender": "db1", "term": 99}).encode()
    check_unchanged(witness, before, send(witness, bodies=[body]))
    body = json.dumps({"type": "timeout_now", "cluster": "fuzz", "sender": "nobody", "term": 99}).encode()
    check_unchanged(witness, before, send(witness, sender="nobody", bodies=[body]))
    # A well-signed message from a member is taken once; its frame, sent
    # again on the same stream or on a new one, is refused.
    body = json.dumps({"type": "timeout_now", "cluster": "fuzz", "sender": "db1", "term": 0}).encode()
    taken = send(witness, bodies=[body])
    assert taken.welcomed and not taken.refused, taken
    assert send(witness, bodies=[body], replay=True).close_code == 4401
    check_unchanged(witness, before, send(witness, raw=taken.sealed))


def test_oversized_frame_and_other_paths(witness):
    before = witness.state_bytes()
    outcome = send(witness, raw=[b" " * (MAX_FRAME_BYTES + 1)])
    assert outcome.close_code == 1009, outcome
    check_unchanged(witness, before, outcome)
    conn = http.client.HTTPConnection("127.0.0.1", witness.peer_port, timeout=10)
    try:
        for method, path in (("POST", "/peer/v1/message"), ("GET", "/peer/v3/other"), ("GET", "/peer/v3/stream")):
            conn.request(method, path, body=b"{}")
            response = conn.getresponse()
            response.read()
            assert 400 <= response.status < 500, (method, path, response.status)
    finally:
        conn.close()
    assert witness.alive() and witness.state_bytes() == before
