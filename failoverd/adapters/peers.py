"""The supervisors' transport: one long-lived, authenticated websocket per
member and direction, one frame per message (docs/design.md §11, "Peer
transport"; safety properties 4 and 6).

    GET /peer/v3/stream  (websocket upgrade)
    server -> client   challenge: {"protocol", "member", "nonce"}
    client -> server   hello:     {"sender", "nonce", "mac"}
    server -> client   {"welcome": true}, or a close with code 4401/4400
    client -> server   binary frames: seq || HMAC(session key, seq || body) || body
    server -> client   text frames {"seq", "reason", "error"}: a message refused

`peer_frames` holds the keys and the framing. Nothing reaches the receiver's
callback before the frame's tag and sequence number are checked, the body is
decoded, and its cluster and sender match the connection. A refusal is
counted by reason and logged (`peer_message_rejected`), never raised into
the server; an unauthenticated or out-of-order frame closes the connection.

`PeerClient.send` only queues: each peer has a task that keeps a connection
open (reconnecting with a short backoff), and writes that peer's queue to it
in order. No wall clock is read anywhere here.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import json
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from failoverd.adapters.peer_frames import (
    HANDSHAKE_TEXT_MAX,
    MAX_FRAME_BYTES,
    Challenge,
    FrameError,
    Opener,
    Sealer,
    accept_hello,
    check_secret,
    decode_challenge,
    encode_challenge,
    make_hello,
    new_nonce,
    session_key,
)
from failoverd.config.load import HostPort
from failoverd.core.messages import Message, ProtocolError, decode_message_bytes, encode_message_bytes

STREAM_PATH = "/peer/v3/stream"
# A silent connection is pinged; no pong within half of this closes it. The
# half must outlast a TCP retransmission on a lossy link (a lost ping or pong
# is resent after at least 200 ms plus the round trip, and more as it backs
# off): at 1 s (0.5 s to answer), 2 % loss and 200 ms round trips closed each
# connection about once a minute, and each reconnect left that peer's
# messages waiting for several round trips.
PING_INTERVAL_S = 3.0
HANDSHAKE_TIMEOUT_S = 5.0
CLOSE_MALFORMED = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_GOING_AWAY = 1001
RECONNECT_BACKOFF_S = (0.0, 0.05, 0.1, 0.2, 0.5)  # then 0.5 s between attempts
_ERROR_TEXT_MAX = 300

OnMessage = Callable[[Message], Awaitable[None] | None]
log = structlog.get_logger("failoverd.adapters.peers")


@dataclasses.dataclass(slots=True)
class PeerMetrics:
    """Counters for the API's metrics endpoint; shared by server and client."""

    received: int = 0
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by reason
    sent: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by peer
    send_failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # refused or cut
    dropped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # queue full / too old
    connected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # streams opened
    connect_failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


class _Refused(Exception):
    """One message refused on an authenticated connection, which stays open."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason, self.text = reason, text[:_ERROR_TEXT_MAX]


class PeerServer:
    """Accepts peer streams and hands each authenticated message to `on_message`.

    `on_message` may be a plain function or a coroutine function, and is
    awaited message by message; if it raises ProtocolError the sender gets
    its text back on the stream. Bind with `start()`; `port` is then the
    bound port (useful with port 0).
    """

    def __init__(
        self,
        cluster_name: str,
        secret: bytes,
        on_message: OnMessage,
        *,
        member: str,
        host: str,
        port: int,
        metrics: PeerMetrics | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ping_interval_s: float = PING_INTERVAL_S,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        check_secret(secret)
        self.cluster_name = cluster_name
        self.member = member  # our name: a hello addressed to another member fails its MAC
        self._secret = secret
        self._on_message = on_message
        self.host, self._port = host, port
        self.metrics = metrics if metrics is not None else PeerMetrics()
        self._ssl_context = ssl_context
        self._ping_s = ping_interval_s
        self._handshake_s = handshake_timeout_s
        self._streams: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the peer server is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(STREAM_PATH, self._stream)
        app.on_shutdown.append(self._close_streams)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, ssl_context=self._ssl_context)
        await site.start()
        log.info("peer_server_listening", host=self.host, port=self.port, tls=self._ssl_context is not None)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _close_streams(self, _app: web.Application) -> None:
        # Handlers of open websockets would otherwise hold the shutdown for its whole timeout.
        for ws in list(self._streams):
            await ws.close(code=CLOSE_GOING_AWAY, message=b"member stopping")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=self._ping_s, max_msg_size=MAX_FRAME_BYTES, timeout=1.0)
        if not ws.can_prepare(request).ok:
            self._count_rejection("malformed", "expected a websocket upgrade", request.remote)
            return web.json_response({"error": f"{STREAM_PATH} takes a websocket"}, status=400)
        await ws.prepare(request)
        self._streams.add(ws)
        try:
            session = await self._handshake(request, ws)
            if session is not None:
                sender, opener = session
                log.info("peer_stream_opened", peer=sender, direction="in", remote=request.remote)
                await self._receive(request, ws, sender, opener)
                log.info("peer_stream_closed", peer=sender, direction="in", code=ws.close_code)
        finally:
            self._streams.discard(ws)
            await ws.close()
        return ws

    async def _handshake(self, request: web.Request, ws: web.WebSocketResponse) -> tuple[str, Opener] | None:
        challenge = Challenge(self.member, new_nonce())
        await ws.send_str(encode_challenge(challenge))
        try:
            async with asyncio.timeout(self._handshake_s):
                frame = await ws.receive()
        except TimeoutError:
            await self._refuse_stream(request, ws, FrameError("malformed", "no hello within the handshake timeout"))
            return None
        if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return None
        try:
            if frame.type == aiohttp.WSMsgType.ERROR:
                raise _frame_error(frame)
            if frame.type != aiohttp.WSMsgType.TEXT:
                raise FrameError("malformed", "expected a hello")
            hello = accept_hello(self._secret, self.cluster_name, challenge, frame.data)
        except FrameError as error:
            await self._refuse_stream(request, ws, error)
            return None
        await ws.send_str('{"welcome": true}')
        key = session_key(self._secret, self.cluster_name, hello.sender, self.member, challenge.nonce, hello.nonce)
        return hello.sender, Opener(key)

    async def _receive(self, request: web.Request, ws: web.WebSocketResponse, sender: str, opener: Opener) -> None:
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.BINARY:
                error = _frame_error(frame) if frame.type == aiohttp.WSMsgType.ERROR else None
                await self._refuse_stream(request, ws, error or FrameError("malformed", "expected a binary frame"))
                return
            try:
                body = opener.open(frame.data)
            except FrameError as error:
                await self._refuse_stream(request, ws, error)
                return
            message: Message | None = None
            try:
                message = self._decode(body, sender)
                result = self._on_message(message)
                if inspect.isawaitable(result):
                    await result
            except _Refused as refused:
                await self._refuse_message(request, ws, opener.seq, refused, sender, message)
                continue
            except ProtocolError as error:  # the receiver's verdict: e.g. not a member
                await self._refuse_message(request, ws, opener.seq, _Refused("refused", str(error)), sender, message)
                continue
            except Exception:
                self.metrics.rejected["error"] += 1
                log.exception("peer_handler_failed", remote=request.remote, **_about(message, sender))
                await _send_refusal(ws, opener.seq, "error", "internal error")
                continue
            self.metrics.received += 1

    def _decode(self, body: bytes, sender: str) -> Message:
        try:
            message = decode_message_bytes(body)
        except ProtocolError as error:
            raise _Refused("malformed", str(error)) from None
        except RecursionError:  # nesting just below the parser's limit (tests/unit/test_messages.py)
            raise _Refused("malformed", "message nested too deeply") from None
        except ValueError as error:  # e.g. an integer of more than 4300 digits
            raise _Refused("malformed", f"message is not valid: {error}") from None
        if message.cluster != self.cluster_name:
            raise _Refused("refused", f"message for cluster {message.cluster!r}, this is {self.cluster_name!r}")
        if message.sender != sender:
            raise _Refused("refused", f"message from {message.sender!r} on {sender!r}'s connection")
        return message

    async def _refuse_message(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        seq: int,
        refused: _Refused,
        sender: str,
        message: Message | None,
    ) -> None:
        self._count_rejection(refused.reason, refused.text, request.remote, **_about(message, sender))
        await _send_refusal(ws, seq, refused.reason, refused.text)

    async def _refuse_stream(self, request: web.Request, ws: web.WebSocketResponse, error: FrameError) -> None:
        self._count_rejection(error.reason, error.text, request.remote)
        code = CLOSE_UNAUTHENTICATED if error.reason in ("unauthenticated", "replayed") else CLOSE_MALFORMED
        await ws.close(code=code, message=error.text[:120].encode())

    def _count_rejection(self, reason: str, detail: str, remote: str | None, **about: str) -> None:
        self.metrics.rejected[reason] += 1
        log.warning("peer_message_rejected", reason=reason, detail=detail[:_ERROR_TEXT_MAX], remote=remote, **about)


def _frame_error(frame: aiohttp.WSMessage) -> FrameError:
    if getattr(frame.data, "code", None) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
        return FrameError("too_large", f"frame exceeds {MAX_FRAME_BYTES} bytes")
    return FrameError("malformed", f"not a websocket frame: {frame.data}"[:_ERROR_TEXT_MAX])


async def _send_refusal(ws: web.WebSocketResponse, seq: int, reason: str, text: str) -> None:
    try:
        await ws.send_str(json.dumps({"seq": seq, "reason": reason, "error": text[:_ERROR_TEXT_MAX]}))
    except ConnectionError:
        pass  # the sender has gone; its next connection starts afresh


def _about(message: Message | None, sender: str) -> dict[str, str]:
    return {"sender": sender} if message is None else {"sender": sender, "type": message.TYPE}


@dataclasses.dataclass(slots=True)
class _Outgoing:
    body: bytes
    queued_at: float  # monotonic
    type: str


class _StreamEnded(Exception):
    pass


def _wake(queue: asyncio.Queue[_Outgoing | None]) -> None:
    """A None for a pump waiting on an empty queue (a full one is not waited on)."""
    if not queue.full():
        queue.put_nowait(None)


class PeerClient:
    """Sends messages to peers without ever blocking or raising to the caller.

    Each peer has a bounded queue and a task that keeps one stream open to it
    and writes the queue to it in order, so a slow or dead peer delays only
    its own messages. A full queue drops its oldest message; a message
    queued longer than `max_age_s` is dropped unsent (the core has long
    moved on; the network may lose messages anyway). `timeout_s` bounds a
    connection with its handshake, and one write. Call `close()` before the
    loop ends.
    """

    def __init__(
        self,
        cluster_name: str,
        secret: bytes,
        peers: dict[str, HostPort],
        *,
        member: str,
        timeout_s: float = 0.5,
        queue_max: int = 256,
        max_age_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        metrics: PeerMetrics | None = None,
        log_interval_s: float = 10.0,
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> None:
        check_secret(secret)
        if not (timeout_s > 0 and queue_max >= 1 and max_age_s > 0 and ping_interval_s > 0):
            raise ValueError("timeout_s, queue_max, max_age_s and ping_interval_s must be positive")
        self.cluster_name = cluster_name
        self.member = member
        self._secret = secret
        scheme = "wss" if ssl_context is not None else "ws"
        self._urls = {name: f"{scheme}://{address}{STREAM_PATH}" for name, address in peers.items()}
        self._timeout_s = timeout_s
        self._queue_max = queue_max
        self._max_age_s = max_age_s
        self._ssl_context = ssl_context
        self._ping_s = ping_interval_s
        self.metrics = metrics if metrics is not None else PeerMetrics()
        self._log_interval_s = log_interval_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._queues: dict[str, asyncio.Queue[_Outgoing | None]] = {}
        self._links: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def send(self, to: str, msg: Message) -> None:
        """Queue `msg` for peer `to` and return at once. Must be called on the event loop."""
        if to not in self._urls:
            raise ValueError(f"unknown peer {to!r}")
        if msg.cluster != self.cluster_name:
            raise ValueError(f"message for cluster {msg.cluster!r}, this client is {self.cluster_name!r}")
        if self._closed:
            return
        queue = self._queues.get(to) or self._start_peer(to)
        if queue.full():
            queue.get_nowait()
            self.metrics.dropped[to] += 1
            self._note(to, "queue full, dropped the oldest message")
        queue.put_nowait(_Outgoing(encode_message_bytes(msg), time.monotonic(), msg.TYPE))

    def _start_peer(self, to: str) -> asyncio.Queue[_Outgoing | None]:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl_context if self._ssl_context is not None else True, limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
        queue: asyncio.Queue[_Outgoing | None] = asyncio.Queue(self._queue_max)
        self._queues[to] = queue
        self._links.append(asyncio.create_task(self._link(to, queue), name=f"peer-stream-{to}"))
        return queue

    async def _link(self, to: str, queue: asyncio.Queue[_Outgoing | None]) -> None:
        """Keep a stream to `to` open and write its queue to it, forever."""
        failures = 0
        while True:
            try:
                ws, sealer = await self._connect(to)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a peer that is down is the normal case here
                self.metrics.connect_failed[to] += 1
                self._note(to, f"cannot connect: {_describe(error)}")
                await asyncio.sleep(RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            self.metrics.connected[to] += 1
            log.info("peer_stream_opened", peer=to, direction="out")
            try:
                await self._pump(to, ws, sealer, queue)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - never let one failure end the link
                self._note(to, f"stream ended: {_describe(error)}")
            finally:
                await ws.close()
            log.info("peer_stream_closed", peer=to, direction="out", code=ws.close_code)

    async def _connect(self, to: str) -> tuple[aiohttp.ClientWebSocketResponse, Sealer]:
        assert self._session is not None
        async with asyncio.timeout(self._timeout_s):
            ws = await self._session.ws_connect(
                self._urls[to],
                heartbeat=self._ping_s,
                max_msg_size=HANDSHAKE_TEXT_MAX,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self._timeout_s),
            )
            try:
                challenge = decode_challenge(await _receive_text(ws, "a challenge"))
                if challenge.member != to:
                    raise FrameError("malformed", f"the peer at {self._urls[to]} is member {challenge.member!r}")
                nonce = new_nonce()
                await ws.send_str(make_hello(self._secret, self.cluster_name, self.member, challenge, nonce))
                if json.loads(await _receive_text(ws, "a welcome")) != {"welcome": True}:
                    raise FrameError("malformed", "the peer did not welcome us")
            except BaseException:
                await ws.close()
                raise
        key = session_key(self._secret, self.cluster_name, self.member, to, challenge.nonce, nonce)
        return ws, Sealer(key)

    async def _pump(
        self, to: str, ws: aiohttp.ClientWebSocketResponse, sealer: Sealer, queue: asyncio.Queue[_Outgoing | None]
    ) -> None:
        reader = asyncio.create_task(self._read(to, ws), name=f"peer-stream-{to}-reader")
        # The reader's end wakes a pump that waits for a message with a None in
        # the queue: waiting for either costs no task of its own per message.
        reader.add_done_callback(lambda _: _wake(queue))
        try:
            while True:
                if reader.done():
                    raise _StreamEnded("closed by the peer or the network")
                item = await queue.get()
                if item is None:  # this stream's end (seen above), or a stale one from an earlier stream's
                    continue
                if time.monotonic() - item.queued_at > self._max_age_s:
                    self.metrics.dropped[to] += 1
                    self._note(to, f"dropped a {item.type} queued over {self._max_age_s:g} s")
                    continue
                try:
                    async with asyncio.timeout(self._timeout_s):
                        await ws.send_bytes(sealer.seal(item.body))
                except (TimeoutError, ConnectionError, aiohttp.ClientError):
                    self.metrics.send_failed[to] += 1
                    raise
                self.metrics.sent[to] += 1
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, to: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        """What the peer says on the stream: refusals of our messages (pongs
        are handled inside aiohttp while this reads). Returns when it closes."""
        async for frame in ws:
            if frame.type == aiohttp.WSMsgType.TEXT:
                self.metrics.send_failed[to] += 1
                self._note(to, f"peer refused a message: {frame.data[:_ERROR_TEXT_MAX]}")
            elif frame.type == aiohttp.WSMsgType.ERROR:
                return

    def _note(self, to: str, problem: str) -> None:
        # Debug level and rate-limited: a dead peer would otherwise log ten lines a second.
        now = time.monotonic()
        if now - self._last_logged.get(to, -math.inf) < self._log_interval_s:
            self._suppressed[to] += 1
            return
        self._last_logged[to] = now
        log.debug("peer_send_problem", peer=to, problem=problem, suppressed=self._suppressed.pop(to, 0))

    async def close(self) -> None:
        """Stop sending (queued messages are discarded) and release connections."""
        self._closed = True
        for task in self._links:
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        self._links.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


async def _receive_text(ws: aiohttp.ClientWebSocketResponse, what: str) -> str:
    frame = await ws.receive()
    if frame.type != aiohttp.WSMsgType.TEXT:
        reason = f" ({ws.close_code}: {frame.extra})" if frame.type == aiohttp.WSMsgType.CLOSE else ""
        raise FrameError("malformed", f"expected {what}, got {frame.type.name}{reason}")
    return str(frame.data)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:_ERROR_TEXT_MAX]
