"""Peer streams over real sockets on 127.0.0.1: authenticated messages arrive
intact and in order; a bad handshake, a forged, replayed or oversized frame
closes the stream; a refused message is answered on it; nothing of any of
these reaches the receiver (safety properties 4 and 6)."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failoverd.adapters.peer_frames import (
    MAX_FRAME_BYTES,
    Sealer,
    decode_challenge,
    make_hello,
    new_nonce,
    session_key,
)
from failoverd.adapters.peers import (
    CLOSE_MALFORMED,
    CLOSE_UNAUTHENTICATED,
    STREAM_PATH,
    PeerClient,
    PeerMetrics,
    PeerServer,
)
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
        "a",
        3,
        seq=9,
        success=True,
        accepted=StateStamp(3, 4),
        position=Position(2, 77),
        position_fresh=True,
        pg_healthy=True,
        following_leader=True,
    ),
    VoteRequest(CLUSTER, "a", 4, position=None, transfer_from="b"),
    TimeoutNow(CLUSTER, "a", 4),
]
BODY = encode_message_bytes(MESSAGES[0])


class Receiver:
    """The supervisor's callback: records messages, or fails as told."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.fail_with: Exception | None = None

    async def __call__(self, message: Message) -> None:
        await asyncio.sleep(0)  # a coroutine callback, as the supervisor's is
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


async def start_server(member: str = "x", **kwargs) -> tuple[PeerServer, Receiver]:
    receiver = Receiver()
    srv = PeerServer(CLUSTER, SECRET, receiver, member=member, host="127.0.0.1", port=0, **kwargs)
    await srv.start()
    return srv, receiver


@pytest.fixture
async def server() -> AsyncIterator[tuple[PeerServer, Receiver]]:
    srv, receiver = await start_server(metrics=PeerMetrics())
    yield srv, receiver
    await srv.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(srv: PeerServer) -> str:
    return f"http://127.0.0.1:{srv.port}{STREAM_PATH}"


class Stream:
    """A hand-driven client end of one stream, for sending what PeerClient never would."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, sealer: Sealer | None) -> None:
        self.ws, self.sealer = ws, sealer

    async def send(self, body: bytes) -> bytes:
        assert self.sealer is not None
        frame = self.sealer.seal(body)
        await self.ws.send_bytes(frame)
        return frame

    async def next_text(self) -> dict:
        frame = await self.ws.receive(timeout=3)
        assert frame.type == aiohttp.WSMsgType.TEXT, (frame.type, frame.data, self.ws.close_code)
        return json.loads(frame.data)

    async def closed_with(self) -> int | None:
        frame = await self.ws.receive(timeout=3)
        assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), (frame.type, frame.data)
        return self.ws.close_code


async def open_stream(
    http: aiohttp.ClientSession,
    srv: PeerServer,
    sender: str = "a",
    secret: bytes = SECRET,
    recipient: str | None = None,
    hello: str | bytes | None = None,
) -> Stream:
    """Connect and shake hands as `sender` (a `hello` given replaces the real one)."""
    ws = await http.ws_connect(url(srv), max_msg_size=0)
    challenge = decode_challenge((await ws.receive(timeout=3)).data)
    assert challenge.member == srv.member
    if hello is not None:
        await (ws.send_bytes(hello) if isinstance(hello, bytes) else ws.send_str(hello))
        return Stream(ws, None)
    nonce = new_nonce()
    if recipient is not None:
        challenge = type(challenge)(recipient, challenge.nonce)
    await ws.send_str(make_hello(secret, CLUSTER, sender, challenge, nonce))
    key = session_key(secret, CLUSTER, sender, challenge.member, challenge.nonce, nonce)
    stream = Stream(ws, Sealer(key))
    if secret == SECRET and recipient is None:
        assert await stream.next_text() == {"welcome": True}
    return stream


async def refused_stream(
    server: tuple[PeerServer, Receiver], reason: str, run, code: int = CLOSE_UNAUTHENTICATED
) -> list[dict]:
    """Run `run()` (which returns the Stream it broke); the server must close
    it with `code`, count one `reason` and log it, and receive nothing."""
    srv, receiver = server
    before = srv.metrics.rejected[reason]
    with structlog.testing.capture_logs() as logs:
        stream = await run()
        assert await stream.closed_with() == code
        await wait_for("the rejection counted", lambda: srv.metrics.rejected[reason] == before + 1)
    assert receiver.messages == []
    events = [e for e in logs if e["event"] == "peer_message_rejected"]
    assert len(events) == 1 and events[0]["reason"] == reason, events
    assert SECRET.decode() not in repr(logs)
    return events


async def refused_message(server: tuple[PeerServer, Receiver], stream: Stream, body: bytes, reason: str, text: str):
    """A refusal that keeps the stream: answered with a text frame, counted, logged."""
    srv, receiver = server
    before = srv.metrics.rejected[reason]
    with structlog.testing.capture_logs() as logs:
        await stream.send(body)
        answer = await stream.next_text()
    assert answer["reason"] == reason and text in answer["error"] and answer["seq"] == stream.sealer.seq, answer
    assert srv.metrics.rejected[reason] == before + 1
    assert receiver.messages == []
    assert [e["reason"] for e in logs if e["event"] == "peer_message_rejected"] == [reason]
    if len(body) > 20:
        assert body.decode("latin-1") not in repr(logs)


# ------------------------------------------------------------- delivery


async def test_client_delivers_messages_intact_and_in_order(server: tuple[PeerServer, Receiver]) -> None:
    srv, receiver = server
    async with PeerClient(CLUSTER, SECRET, {"x": HostPort("127.0.0.1", srv.port)}, member="a") as client:
        for _ in range(25):
            for msg in MESSAGES:
                assert client.send("x", msg) is None
        got = await receiver.wait_for(25 * len(MESSAGES))
        assert got == 25 * MESSAGES
        assert client.metrics.sent["x"] == 25 * len(MESSAGES)
        assert client.metrics.connected["x"] == 1  # one stream carried them all
    assert srv.metrics.received == 25 * len(MESSAGES)
    assert sum(srv.metrics.rejected.values()) == 0


async def test_sync_callback_is_supported(http: aiohttp.ClientSession) -> None:
    got: list[Message] = []
    srv = PeerServer(CLUSTER, SECRET, got.append, member="x", host="127.0.0.1", port=0)
    await srv.start()
    try:
        stream = await open_stream(http, srv)
        await stream.send(BODY)
        await wait_for("the message received", lambda: got == [MESSAGES[0]])
    finally:
        await srv.close()


async def test_client_reconnects_to_a_restarted_peer_and_sends_what_waited(server) -> None:
    srv, _ = server
    port = srv.port
    async with PeerClient(CLUSTER, SECRET, {"x": HostPort("127.0.0.1", port)}, member="a") as client:
        client.send("x", MESSAGES[0])
        await server[1].wait_for(1)
        await srv.close()
        await wait_for("the client saw its stream close", lambda: client.metrics.connect_failed["x"] >= 1)
        client.send("x", MESSAGES[1])  # waits in the queue while the peer is down
        receiver = Receiver()
        again = PeerServer(CLUSTER, SECRET, receiver, member="x", host="127.0.0.1", port=port)
        await again.start()
        try:
            assert await receiver.wait_for(1) == [MESSAGES[1]]
            assert client.metrics.connected["x"] == 2
        finally:
            await again.close()


# ------------------------------------------------------------ handshake


async def test_plain_http_is_400(http, server) -> None:
    srv, _ = server
    for method in ("GET", "POST"):
        async with http.request(method, url(srv), data=BODY) as response:
            assert response.status in (400, 405)
    async with http.get(url(srv)) as response:
        assert response.status == 400 and "websocket" in (await response.json())["error"]


async def test_wrong_secret_is_refused(http, server) -> None:
    async def run() -> Stream:
        return await open_stream(http, server[0], secret=b"another-secret-of-enough-length")

    events = await refused_stream(server, "unauthenticated", run)
    assert events[0]["detail"] == "bad hello signature"


async def test_a_hello_for_another_member_is_refused(http, server) -> None:
    """A hello is bound to the member that sent the challenge."""

    async def run() -> Stream:
        return await open_stream(http, server[0], recipient="y")

    await refused_stream(server, "unauthenticated", run)


@pytest.mark.parametrize(
    "hello, text",
    [
        ("garbage", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"sender": "a"}', "nonce"),
        ('{"sender": "a", "nonce": "00"}', "nonce"),
        ('{"sender": "", "nonce": "' + "00" * 32 + '", "mac": "' + "0" * 64 + '"}', "member name"),
        ('{"sender": "a", "nonce": "' + "zz" * 32 + '", "mac": "' + "0" * 64 + '"}', "nonce"),
        ('{"sender": "a", "nonce": "' + "00" * 32 + '", "mac": 5}', "mac"),
        ('{"sender": "a", "nonce": "' + "00" * 32 + '", "mac": "' + "é" * 64 + '"}', "signature"),
        ("x" * 5000, "longer than"),
        (b"binary", "expected a hello"),
    ],
)
async def test_malformed_hello_closes_the_stream(http, server, hello: str | bytes, text: str) -> None:
    async def run() -> Stream:
        return await open_stream(http, server[0], hello=hello)

    reason = "unauthenticated" if text == "signature" else "malformed"
    code = CLOSE_UNAUTHENTICATED if reason == "unauthenticated" else CLOSE_MALFORMED
    events = await refused_stream(server, reason, run, code)
    assert text in events[0]["detail"]


async def test_no_hello_in_time_closes_the_stream(http) -> None:
    srv, _ = await start_server(handshake_timeout_s=0.2)
    try:
        ws = await http.ws_connect(url(srv))
        assert decode_challenge((await ws.receive(timeout=3)).data).member == "x"
        assert (await ws.receive(timeout=3)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CLOSE_MALFORMED and srv.metrics.rejected["malformed"] == 1
    finally:
        await srv.close()


# --------------------------------------------------------------- frames


async def test_tampered_frame_closes_the_stream(http, server) -> None:
    async def run() -> Stream:
        stream = await open_stream(http, server[0])
        frame = bytearray(stream.sealer.seal(BODY))
        frame[-5] ^= 1
        await stream.ws.send_bytes(bytes(frame))
        return stream

    await refused_stream(server, "unauthenticated", run)


async def test_a_frame_replayed_on_its_stream_is_refused(http, server) -> None:
    srv, receiver = server

    async def run() -> Stream:
        stream = await open_stream(http, srv)
        frame = await stream.send(BODY)
        await receiver.wait_for(1)
        receiver.messages.clear()
        await stream.ws.send_bytes(frame)
        return stream

    await refused_stream(server, "replayed", run)


async def test_a_frame_replayed_on_another_stream_or_to_another_member_is_refused(http, server) -> None:
    srv, receiver = server
    first = await open_stream(http, srv)
    captured = await first.send(BODY)
    await receiver.wait_for(1)
    receiver.messages.clear()

    async def on_a_new_stream() -> Stream:
        stream = await open_stream(http, srv)
        await stream.ws.send_bytes(captured)
        return stream

    await refused_stream(server, "unauthenticated", on_a_new_stream)
    other, other_receiver = await start_server(member="y")
    try:
        stream = await open_stream(http, other)
        await stream.ws.send_bytes(captured)
        assert await stream.closed_with() == CLOSE_UNAUTHENTICATED and other_receiver.messages == []
    finally:
        await other.close()


async def test_frames_out_of_order_or_too_short_close_the_stream(http, server) -> None:
    async def skipped() -> Stream:
        stream = await open_stream(http, server[0])
        stream.sealer.seq = 5
        await stream.send(BODY)
        return stream

    async def short() -> Stream:
        stream = await open_stream(http, server[0])
        await stream.ws.send_bytes(b"\x00" * 39)
        return stream

    async def text() -> Stream:
        stream = await open_stream(http, server[0])
        await stream.ws.send_str(BODY.decode())
        return stream

    await refused_stream(server, "replayed", skipped)
    await refused_stream(server, "malformed", short, CLOSE_MALFORMED)
    await refused_stream(server, "malformed", text, CLOSE_MALFORMED)


async def test_oversized_frame_closes_the_stream(http, server) -> None:
    async def run() -> Stream:
        stream = await open_stream(http, server[0])
        await stream.send(b" " * (MAX_FRAME_BYTES - 40 + 1))
        return stream

    await refused_stream(server, "too_large", run, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    assert MAX_FRAME_BYTES == MAX_MESSAGE_BYTES + 40


@pytest.mark.parametrize(
    "body, reason, text",
    [
        (b"garbage", "malformed", "not JSON"),
        (b"[]", "malformed", "not a JSON object"),
        (b'{"type": "heartbeat"}', "malformed", "missing field"),
        (b'{"type": "coup", "cluster": "pgc", "sender": "a", "term": 1}', "malformed", "unknown message type"),
        (BODY.replace(b'"term":3', b'"term":-3'), "malformed", "term"),
        (encode_message_bytes(TimeoutNow("other", "a", 1)), "refused", "cluster 'other'"),
        (encode_message_bytes(TimeoutNow(CLUSTER, "b", 1)), "refused", "on 'a''s connection"),
    ],
)
async def test_a_refused_message_is_answered_and_the_stream_stays(http, server, body, reason, text) -> None:
    stream = await open_stream(http, server[0])
    await refused_message(server, stream, body, reason, text)
    await stream.send(BODY)
    assert await server[1].wait_for(1) == [MESSAGES[0]]


async def test_receiver_protocol_error_and_crash_are_answered_and_the_stream_stays(http, server) -> None:
    srv, receiver = server
    stream = await open_stream(http, srv)
    receiver.fail_with = ProtocolError("sender 'a' is not another member")
    await refused_message(server, stream, BODY, "refused", "not another member")
    receiver.fail_with = RuntimeError("bug with a private detail")
    with structlog.testing.capture_logs() as logs:
        await stream.send(BODY)
        assert await stream.next_text() == {"seq": 2, "reason": "error", "error": "internal error"}
    assert srv.metrics.rejected["error"] == 1
    assert [e["event"] for e in logs] == ["peer_handler_failed"]
    receiver.fail_with = None
    await stream.send(BODY)
    assert await receiver.wait_for(1) == [MESSAGES[0]]


async def test_bodies_that_break_the_json_parser_are_refused(http, server) -> None:
    # Nesting just below the recursion limit and huge integers make the decoder
    # raise RecursionError/ValueError rather than ProtocolError; the boundary
    # still refuses them as malformed.
    srv, receiver = server
    stream = await open_stream(http, srv)
    limit = sys.getrecursionlimit()
    bodies = [BODY.replace(b'"term":3', b'"term":' + b"9" * 5000)]
    for depth in range(limit - 400, limit + 30, 2):
        bodies.append(BODY.replace(b'"term":3', b'"term":' + b"[" * depth + b"]" * depth))
    for body in bodies:
        await stream.send(body)
        assert (await stream.next_text())["reason"] == "malformed"
    assert srv.metrics.rejected["malformed"] == len(bodies) and receiver.messages == []


async def test_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError):
        PeerServer(CLUSTER, b"short", print, member="x", host="127.0.0.1", port=0)
    with pytest.raises(ValueError):
        PeerClient(CLUSTER, b"short", {}, member="a")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hello=st.one_of(st.text(max_size=300), st.binary(max_size=300)),
    frames=st.lists(st.binary(max_size=600), max_size=4),
)
async def test_random_hellos_and_frames_never_reach_the_receiver(http, server, hello, frames) -> None:
    srv, receiver = server
    for stream in (await open_stream(http, srv, hello=hello), await open_stream(http, srv)):
        for frame in frames:
            if stream.ws.closed:
                break
            await stream.ws.send_bytes(frame)
        await stream.ws.close()
    assert receiver.messages == []


async def test_server_still_serves_after_fuzzing(http, server) -> None:
    srv, receiver = server
    for junk in (b"\x00" * 100, b"{" * 5000, b'{"type":' * 2000):
        stream = await open_stream(http, srv)
        await stream.send(junk)
        await stream.ws.send_bytes(junk)
    stream = await open_stream(http, srv)
    await stream.send(BODY)
    assert await receiver.wait_for(1) == [MESSAGES[0]]


# ------------------------------------------------- the client's resilience


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
    client = PeerClient(CLUSTER, SECRET, peers, member="a", timeout_s=0.5, queue_max=8)
    try:
        for seq in range(50):
            for peer in ("dead", "slow", "x"):
                client.send(peer, Heartbeat(CLUSTER, "a", 3, seq=seq))  # synchronous: never waits for the network
        got = await receiver.wait_for(8)
        # x's messages are not held up behind the slow peer: they all arrived
        # before the slow peer's first handshake had even timed out.
        assert len(got) == 8 and client.metrics.connect_failed["slow"] == 0
        metrics = client.metrics
        await wait_for("the dead peer refused connections", lambda: metrics.connect_failed["dead"] >= 3)
        await wait_for("the slow peer's handshakes timed out", lambda: metrics.connect_failed["slow"] >= 2)
        assert metrics.dropped["dead"] == metrics.dropped["slow"] == metrics.dropped["x"] == 42
        assert metrics.sent["dead"] == metrics.sent["slow"] == 0
    finally:
        await client.close()


async def test_queue_drops_oldest_and_expires_old_messages(server) -> None:
    _, receiver = server
    port = free_port()
    client = PeerClient(CLUSTER, SECRET, {"x": HostPort("127.0.0.1", port)}, member="a", queue_max=3, max_age_s=1.0)
    try:
        for seq in range(10):
            client.send("x", Heartbeat(CLUSTER, "a", 3, seq=seq))
        assert client.metrics.dropped["x"] == 7  # the queue kept the newest 3
        await asyncio.sleep(1.1)  # they wait for a peer that is not there, and grow too old
        client.send("x", Heartbeat(CLUSTER, "a", 3, seq=10))
        late = PeerServer(CLUSTER, SECRET, receiver, member="x", host="127.0.0.1", port=port)
        await late.start()
        try:
            got = await receiver.wait_for(1)
            await asyncio.sleep(0.1)
            assert [m.seq for m in got] == [10]
            assert client.metrics.dropped["x"] == 10
        finally:
            await late.close()
    finally:
        await client.close()


class Pausable:
    """A TCP relay that can stop forwarding either way, as a partition does,
    without closing anything."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_stream_through_a_partition_is_dropped_and_made_again_after_it(server) -> None:
    srv, receiver = server
    relay = Pausable(srv.port)
    port = await relay.start()
    client = PeerClient(CLUSTER, SECRET, {"x": HostPort("127.0.0.1", port)}, member="a", ping_interval_s=0.2)
    try:
        client.send("x", MESSAGES[0])
        await receiver.wait_for(1)
        relay.flowing.clear()  # partition: the stream stays open, nothing crosses it
        await wait_for("the silent stream dropped by the ping", lambda: client.metrics.connect_failed["x"] >= 1, 3.0)
        relay.flowing.set()
        client.send("x", MESSAGES[1])
        got = await receiver.wait_for(2)
        assert got[-1] == MESSAGES[1] and client.metrics.connected["x"] >= 2
    finally:
        await client.close()
        await relay.close()


async def test_client_refuses_misuse_and_ignores_sends_after_close() -> None:
    client = PeerClient(CLUSTER, SECRET, {"b": HostPort("127.0.0.1", free_port())}, member="a")
    with pytest.raises(ValueError, match="unknown peer"):
        client.send("zz", MESSAGES[0])
    with pytest.raises(ValueError, match="cluster"):
        client.send("b", TimeoutNow("other", "a", 1))
    await client.close()
    client.send("b", MESSAGES[0])  # no error, no task, no session
    await client.close()


async def test_a_peer_address_of_another_member_is_not_sent_to(server) -> None:
    srv, receiver = server  # member "x", configured as "y" by mistake
    async with PeerClient(CLUSTER, SECRET, {"y": HostPort("127.0.0.1", srv.port)}, member="a") as client:
        with structlog.testing.capture_logs() as logs:
            client.send("y", MESSAGES[0])
            await wait_for("the handshake refused", lambda: client.metrics.connect_failed["y"] >= 1)
    assert receiver.messages == []
    assert any("is member 'x'" in e.get("problem", "") for e in logs), logs


async def test_tls(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    srv, receiver = await start_server(ssl_context=server_ctx)
    client = PeerClient(CLUSTER, SECRET, {"x": HostPort("127.0.0.1", srv.port)}, member="a", ssl_context=client_ctx)
    try:
        client.send("x", MESSAGES[1])
        assert await receiver.wait_for(1) == [MESSAGES[1]]
    finally:
        await client.close()
        await srv.close()
