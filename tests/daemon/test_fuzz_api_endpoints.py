"""Random credentials, bodies and query strings against the REST API of a
running supervisor: a 4xx for everything malformed or unauthenticated, never
a 500, never a crash, never a state change."""

from __future__ import annotations

import http.client
import json

import pytest
from daemon_fixture import RunningWitness, start_witness, stop_witness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ADMIN = [
    ("POST", "/switchover"),
    ("DELETE", "/switchover"),
    ("POST", "/failover"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/reinit"),
    ("POST", "/history"),
]
READ = ["/health", "/primary", "/replica", "/read-only", "/cluster", "/history", "/metrics"]


@pytest.fixture(scope="module")
def witness(tmp_path_factory) -> RunningWitness:
    w = start_witness(tmp_path_factory.mktemp("fuzz-api"))
    yield w
    stop_witness(w)


def call(
    w: RunningWitness, method: str, path: str, body: bytes = b"", headers: dict | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", w.api_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def check(w: RunningWitness, before: bytes, status: int, body: bytes) -> None:
    assert 400 <= status < 500, (status, body[:300])
    assert json.loads(body).keys() == {"error"}  # a reason, never a traceback
    assert w.alive(), w.stderr()[-2000:]
    assert w.state_bytes() == before


def is_json_object(body: bytes) -> bool:
    """A body that parses as a JSON object may be a valid request (b"{}" asks
    for a switchover): the malformed-body test must not generate one."""
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(
    endpoint=st.sampled_from(ADMIN),
    auth=st.one_of(st.none(), visible, visible.map("Bearer {}".format)),
    body=st.binary(max_size=512),
)
def test_admin_without_the_token_is_401_or_403(witness, endpoint, auth, body):
    before = witness.state_bytes()
    headers = {} if auth is None else {"Authorization": auth}
    status, text = call(witness, *endpoint, body=body, headers=headers)
    assert status in (401, 403), (status, text[:200])
    check(witness, before, status, text)


@FUZZ
@given(
    endpoint=st.sampled_from(ADMIN),
    body=st.one_of(
        st.binary(max_size=512).filter(lambda b: b.strip() != b"" and not is_json_object(b)),
        json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.text(max_size=12), json_values, max_size=4).map(
            lambda d: json.dumps({**d, "zz_not_a_field": 1}).encode()
        ),
    ),
)
def test_admin_with_the_token_and_a_malformed_body_is_400(witness, endpoint, body):
    before = witness.state_bytes()
    headers = {"Authorization": f"Bearer {witness.token.decode()}", "Content-Type": "application/json"}
    status, text = call(witness, *endpoint, body=body, headers=headers)
    assert status == 400, (status, body[:200], text[:200])
    check(witness, before, status, text)


@FUZZ
@given(path=st.sampled_from(READ), query=st.dictionaries(visible, visible, min_size=1, max_size=3))
def test_read_endpoints_with_random_queries_never_fail_the_server(witness, path, query):
    from urllib.parse import urlencode

    before = witness.state_bytes()
    status, text = call(witness, "GET", f"{path}?{urlencode(query)}")
    assert status in (200, 400, 503), (status, text[:200])
    assert witness.alive() and witness.state_bytes() == before


def test_server_still_answers_and_term_is_unchanged(witness):
    status, text = call(witness, "GET", "/health")
    assert status == 200
    assert json.loads(text)["term"] == 0
