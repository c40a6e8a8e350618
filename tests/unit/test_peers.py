"""Peer RPC over real sockets on 127.0.0.1: authenticated messages arrive
intact; everything else gets a 4xx, is counted and logged, and never reaches
the receiver (safety properties 4 and 6)."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failoverd.adapters.peers import PATH, PeerClient, PeerMetrics, PeerServer, sign
from failoverd.config.load import HostPort
from failoverd.core.messages import (
    MAX_MESSAGE_BYTES,
    Heartbeat,
    HeartbeatAck,
    Message,
    ProtocolError,
    TimeoutNow,
    VoteRequest,
    encode_message_bytes,
)
from failoverd.core.state import ClusterState, Position, StateStamp
from tests.support import free_port, wait_for

CLUSTER = "pgc"
SECRET = b"s3cret-s3cret-s3cret-0123456789"
MESSAGES: list[Message] = [
    Heartbeat(
        CLUSTER,
        "a",
        3,
        seq=9,
        state=ClusterState(stamp=StateStamp(3, 4), primary="a"),
        commit_version=4,
        primary_ready=True,
        primary_position=Position(2, 1 << 40),
    ),
    HeartbeatAck(
        CLUSTER,
        "b",
        3,
        seq=9,
        success=True,
        accepted=StateStamp(3, 4),
        position=Position(2, 77),
        position_fresh=True,
        pg_healthy=True,
        following_leader=True,
    ),
    VoteRequest(CLUSTER, "c", 4, position=None, transfer_from="a"),
    TimeoutNow(CLUSTER, "a", 4),
]


class Receiver:
    """The supervisor's callback: records messages, or fails as told."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.fail_with: Exception | None = None

    async def __call__(self, message: Message) -> None:
        await asyncio.sleep(0)  # a coroutine callback, as the supervisor's will be
        if self.fail_with is not None:
            raise self.fail_with
        self.messages.append(message)

    async def wait_for(self, count: int, timeout_s: float = 3.0) -> list[Message]:
        """The messages received, once there are `count` of them."""
        return await wait_for(
            f"{count} messages received",
            lambda: self.messages if len(self.messages) >= count else None,
            timeout_s,
            interval_s=0.01,
            detail=lambda: f"received: {self.messages!r}",
        )


@pytest.fixture
async def server() -> AsyncIterator[tuple[PeerServer, Receiver]]:
    receiver = Receiver()
    srv = PeerServer(CLUSTER, SECRET, receiver, member="x", host="127.0.0.1", port=0, metrics=PeerMetrics())
    await srv.start()
    yield srv, receiver
    await srv.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(srv: PeerServer) -> str:
    return f"http://127.0.0.1:{srv.port}{PATH}"


def signed(body: bytes, secret: bytes = SECRET, stamp: str | None = None) -> dict[str, str]:
    stamp = f"{time.time():.6f}" if stamp is None else stamp
    return {"X-Failoverd-Timestamp": stamp, "X-Failoverd-Signature": sign(secret, stamp, "x", body)}


async def post(http: aiohttp.ClientSession, srv: PeerServer, body: Any, headers: dict[str, str]) -> tuple[int, dict]:
    async with http.post(url(srv), data=body, headers=headers) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text else {})


async def test_client_delivers_messages_intact(server: tuple[PeerServer, Receiver]) -> None:
    srv, receiver = server
    async with PeerClient(CLUSTER, SECRET, {"x": HostPort("127.0.0.1", srv.port)}, concurrency=1) as client:
        for msg in MESSAGES:
            assert client.send("x", msg) is None
        got = await receiver.wait_for(len(MESSAGES))
        assert got == MESSAGES  # one worker per peer keeps order here (not promised in general)
        assert client.metrics.sent["x"] == len(MESSAGES)
    assert srv.metrics.received == len(MESSAGES)
    assert sum(srv.metrics.rejected.values()) == 0


async def test_sync_callback_is_supported(http: aiohttp.ClientSession) -> None:
    got: list[Message] = []
    srv = PeerServer(CLUSTER, SECRET, got.append, member="x", host="127.0.0.1", port=0)
    await srv.start()
    try:
        body = encode_message_bytes(MESSAGES[0])
        assert (await post(http, srv, body, signed(body)))[0] == 204
        assert got == [MESSAGES[0]]
    finally:
        await srv.close()


async def rejected(
    http: aiohttp.ClientSession,
    server: tuple[PeerServer, Receiver],
    body: Any,
    headers: dict[str, str],
    status: int,
    reason: str,
    text: str = "",
) -> dict:
    srv, receiver = server
    before = srv.metrics.rejected[reason]
    with structlog.testing.capture_logs() as logs:
        got_status, error = await post(http, srv, body, headers)
    assert got_status == status, error
    assert text in error["error"]
    assert srv.metrics.rejected[reason] == before + 1
    assert receiver.messages == []
    events = [e for e in logs if e["event"] == "peer_message_rejected"]
    assert len(events) == 1 and events[0]["reason"] == reason
    assert SECRET.decode() not in repr(logs)
    if isinstance(body, bytes) and len(body) > 20:
        assert body.decode("latin-1") not in repr(logs)
    return error


BODY = encode_message_bytes(MESSAGES[0])


async def test_unsigned_is_401(http, server) -> None:
    await rejected(http, server, BODY, {}, 401, "unauthenticated", "missing")
    await rejected(http, server, BODY, {"X-Failoverd-Timestamp": f"{time.time()}"}, 401, "unauthenticated")


async def test_wrong_secret_is_401(http, server) -> None:
    await rejected(
        http,
        server,
        BODY,
        signed(BODY, secret=b"another-secret-of-enough-length"),
        401,
        "unauthenticated",
        "bad signature",
    )


async def test_tampered_body_or_timestamp_is_401(http, server) -> None:
    headers = signed(BODY)
    await rejected(http, server, BODY.replace(b'"seq":9', b'"seq":8'), headers, 401, "unauthenticated")
    stamp = f"{float(headers['X-Failoverd-Timestamp']) + 1:.6f}"
    await rejected(http, server, BODY, headers | {"X-Failoverd-Timestamp": stamp}, 401, "unauthenticated")


@pytest.mark.parametrize("stamp", ["", "yesterday", "nan", "inf", "-5", "1e9", "1.5.5", "+17", "1,5", "0x10"])
async def test_unparseable_timestamp_is_400(http, server, stamp: str) -> None:
    await rejected(http, server, BODY, signed(BODY, stamp=stamp), 400, "malformed", "unix seconds")


@pytest.mark.parametrize("offset_s", [-31.0, 31.0, -3600.0, -time.time()])
async def test_stale_or_future_timestamp_is_401(http, server, offset_s: float) -> None:
    stamp = f"{time.time() + offset_s:.6f}"
    await rejected(http, server, BODY, signed(BODY, stamp=stamp), 401, "stale", "stale or future timestamp")


async def test_replay_is_401(http, server) -> None:
    headers = signed(BODY)
    assert (await post(http, server[0], BODY, headers))[0] == 204
    server[1].messages.clear()
    await rejected(http, server, BODY, headers, 401, "replayed")


@pytest.mark.parametrize(
    "body, text",
    [
        (b"garbage", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"type": "heartbeat"}', "missing field"),
        (b'{"type": "coup", "cluster": "pgc", "sender": "a", "term": 1}', "unknown message type"),
        (BODY.replace(b'"term":3', b'"term":-3'), "term"),
    ],
)
async def test_signed_garbage_is_400_with_reason(http, server, body: bytes, text: str) -> None:
    await rejected(http, server, body, signed(body), 400, "malformed", text)


async def test_other_cluster_is_400(http, server) -> None:
    body = encode_message_bytes(TimeoutNow("other", "a", 1))
    await rejected(http, server, body, signed(body), 400, "refused", "cluster 'other'")


async def test_oversized_is_413(http, server) -> None:
    body = b" " * (MAX_MESSAGE_BYTES + 1)
    await rejected(http, server, body, signed(body), 413, "too_large")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the read itself must stop
        for _ in range(10):
            yield b" " * 8192

    await rejected(http, server, chunked(), {}, 413, "too_large")


async def test_receiver_protocol_error_is_400(http, server) -> None:
    server[1].fail_with = ProtocolError("sender 'z' is not another member")
    await rejected(http, server, BODY, signed(BODY), 400, "refused", "not another member")


async def test_receiver_crash_is_500_and_server_keeps_serving(http, server) -> None:
    srv, receiver = server
    receiver.fail_with = RuntimeError("bug with a private detail")
    with structlog.testing.capture_logs() as logs:
        status, error = await post(http, srv, BODY, signed(BODY))
    assert status == 500 and error == {"error": "internal error"}
    assert srv.metrics.rejected["error"] == 1
    assert [e["event"] for e in logs] == ["peer_handler_failed"]
    receiver.fail_with = None
    assert (await post(http, srv, BODY, signed(BODY)))[0] == 204
    assert receiver.messages == [MESSAGES[0]]


async def test_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError):
        PeerServer(CLUSTER, b"short", print, member="x", host="127.0.0.1", port=0)
    with pytest.raises(ValueError):
        PeerClient(CLUSTER, b"short", {})


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(st.binary(max_size=512), printable.map(str.encode), st.just(BODY)),
    stamp=st.one_of(st.none(), printable, st.floats(allow_nan=True).map(str), st.just("now")),
    signature=st.one_of(st.none(), printable, st.just("valid"), st.just("v1=" + "0" * 64)),
)
async def test_random_requests_never_reach_the_receiver(
    http, server, body: bytes, stamp: str | None, signature: str | None
) -> None:
    srv, receiver = server
    headers: dict[str, str] = {}
    if stamp is not None:
        headers["X-Failoverd-Timestamp"] = f"{time.time():.6f}" if stamp == "now" else stamp
    if signature is not None:
        headers["X-Failoverd-Signature"] = (
            sign(SECRET, headers.get("X-Failoverd-Timestamp", ""), "x", body) if signature == "valid" else signature
        )
        if signature == "valid" and body == BODY and stamp == "now":
            body = BODY.replace(b'"cluster":"pgc"', b'"cluster":"pgd"')  # the one valid combination
            headers["X-Failoverd-Signature"] = sign(SECRET, headers["X-Failoverd-Timestamp"], "x", body)
    status, _ = await post(http, srv, body, headers)
    assert 400 <= status < 500
    assert receiver.messages == []


async def test_server_still_serves_after_fuzzing(http, server) -> None:
    srv, receiver = server
    for junk in (b"\x00" * 100, b"{" * 5000, b'{"type":' * 2000):
        await post(http, srv, junk, signed(junk))
    assert (await post(http, srv, BODY, signed(BODY)))[0] == 204
    assert receiver.messages == [MESSAGES[0]]


@pytest.fixture
async def blackhole() -> AsyncIterator[int]:
    """A peer that accepts connections and never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()

    srv = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1]
    for writer in writers:
        writer.close()
    srv.close()
    await srv.wait_closed()


async def test_dead_and_slow_peers_do_not_block_a_live_one(server, blackhole: int) -> None:
    srv, receiver = server
    peers = {
        "x": HostPort("127.0.0.1", srv.port),
        "dead": HostPort("127.0.0.1", free_port()),  # nothing listens there
        "slow": HostPort("127.0.0.1", blackhole),
    }
    client = PeerClient(CLUSTER, SECRET, peers, timeout_s=0.5, queue_max=8)
    try:
        for seq in range(50):
            for peer in ("dead", "slow", "x"):
                client.send(peer, Heartbeat(CLUSTER, "a", 3, seq=seq))  # synchronous: never waits for the network
        got = await receiver.wait_for(8)
        # x's messages are not held up behind the slow peer: they all arrived
        # before the slow peer's first send had even timed out.
        assert len(got) == 8 and client.metrics.send_failed["slow"] == 0
        metrics = client.metrics
        await wait_for("the dead peer's 8 sends failed", lambda: metrics.send_failed["dead"] >= 8)
        await wait_for("the slow peer's first sends timed out", lambda: metrics.send_failed["slow"] >= 4)
        assert metrics.dropped["dead"] == metrics.dropped["slow"] == metrics.dropped["x"] == 42
        assert metrics.send_failed["dead"] == 8
    finally:
        await client.close()


async def test_queue_drops_oldest_and_expires_old_messages(blackhole: int) -> None:
    client = PeerClient(
        CLUSTER,
        SECRET,
        {"slow": HostPort("127.0.0.1", blackhole)},
        timeout_s=0.2,
        queue_max=3,
        max_age_s=0.05,
        concurrency=1,
    )
    try:
        for seq in range(10):
            client.send("slow", Heartbeat(CLUSTER, "a", 3, seq=seq))
        assert client.metrics.dropped["slow"] == 7  # no worker ran yet: the queue kept the newest 3
        # The first POST times out (0.2 s); by then the other two have waited
        # longer than max_age_s, and are dropped unsent.
        await wait_for("the two expired messages dropped", lambda: client.metrics.dropped["slow"] >= 9)
        assert client.metrics.send_failed["slow"] == 1
        assert client.metrics.dropped["slow"] == 9
    finally:
        await client.close()


async def test_client_refuses_misuse_and_ignores_sends_after_close() -> None:
    client = PeerClient(CLUSTER, SECRET, {"b": HostPort("127.0.0.1", free_port())})
    with pytest.raises(ValueError, match="unknown peer"):
        client.send("zz", MESSAGES[0])
    with pytest.raises(ValueError, match="cluster"):
        client.send("b", TimeoutNow("other", "a", 1))
    await client.close()
    client.send("b", MESSAGES[0])  # no error, no task, no session
    await client.close()


async def test_tls(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    receiver = Receiver()
    srv = PeerServer(CLUSTER, SECRET, receiver, member="x", host="127.0.0.1", port=0, ssl_context=server_ctx)
    await srv.start()
    client = PeerClient(CLUSTER, SECRET, {"x": HostPort("127.0.0.1", srv.port)}, ssl_context=client_ctx)
    try:
        client.send("x", MESSAGES[1])
        assert await receiver.wait_for(1) == [MESSAGES[1]]
    finally:
        await client.close()
        await srv.close()


async def test_bodies_that_break_the_json_parser_are_400(http, server) -> None:
    # Nesting just below the recursion limit and huge integers make the decoder
    # raise RecursionError/ValueError rather than ProtocolError; the boundary
    # still answers 400.
    srv, _ = server
    limit = sys.getrecursionlimit()
    bodies = [BODY.replace(b'"term":3', b'"term":' + b"9" * 5000)]
    for depth in range(limit - 400, limit + 30, 2):
        bodies.append(BODY.replace(b'"term":3', b'"term":' + b"[" * depth + b"]" * depth))
    for body in bodies:
        status, error = await post(http, srv, body, signed(body))
        assert status == 400, (len(body), error)
    assert srv.metrics.rejected["malformed"] == len(bodies) and server[1].messages == []


async def test_a_message_signed_for_another_member_is_refused(server, http) -> None:
    """A capture of a message to one member cannot be replayed to another."""
    srv, receiver = server
    body = encode_message_bytes(MESSAGES[0])
    stamp = f"{time.time():.6f}"
    headers = {"X-Failoverd-Timestamp": stamp, "X-Failoverd-Signature": sign(SECRET, stamp, "y", body)}
    status, answer = await post(http, srv, body, headers)
    assert status == 401 and "signature" in answer["error"]
    assert receiver.messages == []
    assert (await post(http, srv, body, signed(body)))[0] == 204  # the same message, signed for us
