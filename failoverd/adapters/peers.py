"""The supervisors' transport: one long-lived, authenticated TCP stream (TLS
optional) per member and direction, one frame per message (docs/design.md
§11, "Peer transport"; safety properties 4 and 6).

    client -> server   the preamble "failoverd-peer-4\\n"
    server -> client   CHALLENGE {"protocol", "member", "nonce"}
    client -> server   HELLO     {"sender", "nonce", "mac"}
    server -> client   WELCOME, or CLOSE {"code": 4401 or 4400, "reason"}
    client -> server   MESSAGE   seq || HMAC(session key, seq || body) || body
    server -> client   REFUSAL   {"seq", "reason", "error"}: a message refused
    either way         PING after `ping_interval_s` of silence, PONG; CLOSE

`peer_frames` holds the keys, the seals and the framing. Nothing reaches the
receiver's callback before the frame's tag and sequence number are checked,
the body is decoded, and its cluster and sender match the connection. A
refusal is counted by reason and logged (`peer_message_rejected`), never
raised into the server; an unauthenticated or out-of-order frame ends the
stream.

Plain asyncio protocols, no HTTP: a message costs one write on the sender
(`PeerClient.send` writes to an open stream at once) and one callback on the
receiver, where the websocket of protocol 3 cost a task switch on each side
and an HTTP library in every supervisor's memory. No wall clock is read
anywhere here.
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

import structlog

from failoverd.adapters.peer_frames import (
    CHALLENGE,
    CLOSE,
    HANDSHAKE_TEXT_MAX,
    HELLO,
    KIND_NAMES,
    MAX_FRAME_BYTES,
    MESSAGE,
    PING,
    PONG,
    PREAMBLE,
    PROTOCOL,
    REFUSAL,
    WELCOME,
    Challenge,
    FrameError,
    FrameReader,
    Opener,
    Sealer,
    accept_hello,
    check_secret,
    decode_challenge,
    encode_challenge,
    encode_frame,
    make_hello,
    new_nonce,
    session_key,
)
from failoverd.config.load import HostPort
from failoverd.core.messages import Message, ProtocolError, decode_message_bytes, encode_message_bytes

# A silent stream is pinged; no answer within half of this ends it. The half
# must outlast a TCP retransmission on a lossy link (a lost ping or pong is
# resent after at least 200 ms plus the round trip, and more as it backs
# off): at 1 s (0.5 s to answer), 2 % loss and 200 ms round trips closed each
# connection about once a minute, and each reconnect left that peer's
# messages waiting for several round trips.
PING_INTERVAL_S = 3.0
HANDSHAKE_TIMEOUT_S = 5.0
CLOSE_MALFORMED = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_GOING_AWAY = 1001
CLOSE_ABNORMAL = 1006  # the stream ended without a CLOSE frame
RECONNECT_BACKOFF_S = (0.0, 0.05, 0.1, 0.2, 0.5)  # then 0.5 s between attempts
# Messages taken from one stream and not yet handled by a coroutine callback:
# past this the stream stops reading until the callback catches up.
PENDING_MAX = 64
REPLY_BYTES_MAX = 4096  # what a client takes from a server: refusals, pongs, a close
_ERROR_TEXT_MAX = 300
_NOT_A_PEER = (
    f"this is a failoverd peer port, speaking {PROTOCOL}: not HTTP (a member of a version "
    "before the plain peer streams, or not a member at all)"
)

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


class _Stream(asyncio.Protocol):
    """What both ends of a stream do: frames in, PING/PONG/CLOSE handled
    here, every other frame to `frame_received`; a stream silent for
    `ping_s` is pinged, and one that still says nothing within half of that
    is cut. Timers run only on silence, so a busy stream costs no timer per
    frame."""

    def __init__(self, ping_s: float, limit: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(limit)
        self.ended = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._ping_s = ping_s
        self._heard_at = 0.0
        self._pinged_at: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._heard_at = time.monotonic()
        self._keepalive = asyncio.get_running_loop().call_later(self._ping_s, self._check_alive)

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        self._heard_at = time.monotonic()
        try:
            frames = self.reader.feed(data)
        except FrameError as error:
            self.refuse(error)
            return
        for kind, payload in frames:
            if self.ended:
                return
            if kind == PING:
                self.write(PONG, payload)
            elif kind == PONG:
                pass  # hearing it was the point
            elif kind == CLOSE:
                self._closed_by_peer(payload)
            else:
                self.frame_received(kind, payload)

    def frame_received(self, kind: int, payload: bytes) -> None:
        raise NotImplementedError

    def refuse(self, error: FrameError) -> None:
        """End the stream for a frame that breaks the protocol."""
        raise NotImplementedError

    def write(self, kind: int, payload: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(kind, payload))

    def close(self, code: int, reason: str) -> None:
        """Say why, then end the stream (what was written still goes out)."""
        if self.ended:
            return
        self.ended = True
        self.close_code, self.close_reason = code, reason
        self.write(CLOSE, json.dumps({"code": code, "reason": reason[:120]}).encode())
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.close_code, self.close_reason = CLOSE_ABNORMAL, reason
        if self.transport is not None:
            self.transport.abort()

    def _closed_by_peer(self, payload: bytes) -> None:
        self.ended = True
        try:
            fields = json.loads(payload)
            self.close_code, self.close_reason = int(fields["code"]), str(fields["reason"])[:_ERROR_TEXT_MAX]
        except (ValueError, TypeError, KeyError):
            self.close_code, self.close_reason = CLOSE_MALFORMED, "a close frame that does not parse"
        if self.transport is not None:
            self.transport.close()

    def _check_alive(self) -> None:
        if self.ended:
            return
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        if self._pinged_at is not None and self._heard_at < self._pinged_at:
            if now - self._pinged_at >= self._ping_s / 2:
                self.abort(f"no answer to a ping within {self._ping_s / 2:g} s")
                return
            self._keepalive = loop.call_later(self._pinged_at + self._ping_s / 2 - now, self._check_alive)
            return
        self._pinged_at = None
        silent = now - self._heard_at
        if silent >= self._ping_s:
            self._pinged_at = now
            self.write(PING)
            self._keepalive = loop.call_later(self._ping_s / 2, self._check_alive)
        else:
            self._keepalive = loop.call_later(self._ping_s - silent, self._check_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            self.ended = True
            self.close_code = CLOSE_ABNORMAL
            self.close_reason = f"{type(exc).__name__}: {exc}" if exc is not None else "closed by the peer"
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self.done.done():
            self.done.set_result(None)


# ----------------------------------------------------------------- server


class PeerServer:
    """Accepts peer streams and hands each authenticated message to `on_message`.

    `on_message` may be a plain function or a coroutine function; the
    messages of one stream are handled one after the other, in order; if it
    raises ProtocolError the sender gets its text back as a refusal. Bind
    with `start()`; `port` is then the bound port (useful with port 0).
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
        self.secret = secret
        self.on_message = on_message
        self.host, self._port = host, port
        self.metrics = metrics if metrics is not None else PeerMetrics()
        self._ssl_context = ssl_context
        self.ping_s = ping_interval_s
        self.handshake_s = handshake_timeout_s
        self.streams: set[_Inbound] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the peer server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Inbound(self), self.host, self._port, ssl=self._ssl_context)
        log.info("peer_server_listening", host=self.host, port=self.port, tls=self._ssl_context is not None)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for stream in list(self.streams):
            stream.close(CLOSE_GOING_AWAY, "member stopping")
            stream.stop()
        pending = [s.done for s in self.streams]
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    def decode(self, body: bytes, sender: str) -> Message:
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

    def count_rejection(self, reason: str, detail: str, remote: str | None, **about: str) -> None:
        self.metrics.rejected[reason] += 1
        log.warning("peer_message_rejected", reason=reason, detail=detail[:_ERROR_TEXT_MAX], remote=remote, **about)


class _Inbound(_Stream):
    """The server's end of one stream: preamble, handshake, then messages."""

    def __init__(self, server: PeerServer) -> None:
        super().__init__(server.ping_s, HANDSHAKE_TEXT_MAX)
        self.server = server
        self.remote: str | None = None
        self.sender: str | None = None
        self._preamble: bytearray | None = bytearray()
        self._challenge: Challenge | None = None
        self._opener: Opener | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._pending: collections.deque[tuple[int, Message]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self.server.streams.add(self)
        self._handshake_timer = asyncio.get_running_loop().call_later(self.server.handshake_s, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._preamble is not None and not self.ended:
            self._preamble += data
            got = bytes(self._preamble[: len(PREAMBLE)])
            if not PREAMBLE.startswith(got):
                self._not_a_peer(got)
                return
            if len(self._preamble) < len(PREAMBLE):
                return
            data = bytes(self._preamble[len(PREAMBLE) :])
            self._preamble = None
            self._challenge = Challenge(self.server.member, new_nonce())
            self.write(CHALLENGE, encode_challenge(self._challenge).encode())
            if not data:
                return
        super().data_received(data)

    def _not_a_peer(self, got: bytes) -> None:
        self.server.count_rejection("malformed", _NOT_A_PEER, self.remote)
        self.ended = True
        assert self.transport is not None
        if got[:1].isupper():  # an HTTP request, e.g. from a member of protocol 3
            body = json.dumps({"error": _NOT_A_PEER}).encode()
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        self.transport.close()

    def _too_slow(self) -> None:
        if self._opener is None:
            self.refuse(FrameError("malformed", "no hello within the handshake timeout"))

    def frame_received(self, kind: int, payload: bytes) -> None:
        if self._opener is None:
            self._hello(kind, payload)
            return
        if kind != MESSAGE:
            self.refuse(FrameError("malformed", f"expected a message frame, got a {KIND_NAMES[kind]}"))
            return
        try:
            body = self._opener.open(payload)
        except FrameError as error:
            self.refuse(error)
            return
        assert self.sender is not None
        seq = self._opener.seq
        try:
            message = self.server.decode(body, self.sender)
        except _Refused as refused:
            self._answer(seq, None, refused)
            return
        self._take(seq, message)

    def _hello(self, kind: int, payload: bytes) -> None:
        server = self.server
        assert self._challenge is not None
        try:
            if kind != HELLO:
                raise FrameError("malformed", f"expected a hello, got a {KIND_NAMES[kind]}")
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                raise FrameError("malformed", "hello is not UTF-8") from None
            hello = accept_hello(server.secret, server.cluster_name, self._challenge, text)
        except FrameError as error:
            self.refuse(error)
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.write(WELCOME)
        key = session_key(
            server.secret, server.cluster_name, hello.sender, server.member, self._challenge.nonce, hello.nonce
        )
        self.sender, self._opener = hello.sender, Opener(key)
        self.reader.limit = MAX_FRAME_BYTES
        log.info("peer_stream_opened", peer=hello.sender, direction="in", remote=self.remote)

    # A plain callback is called at once; a coroutine callback's messages are
    # handled in order by one task per burst, not one task per message.
    def _take(self, seq: int, message: Message) -> None:
        if self._worker is not None:
            self._pending.append((seq, message))
            if len(self._pending) >= PENDING_MAX and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            return
        try:
            result = self.server.on_message(message)
        except Exception as error:  # noqa: BLE001 - answered to the sender, counted, logged
            self._answer(seq, message, error)
            return
        if inspect.isawaitable(result):
            self._worker = asyncio.ensure_future(self._work(seq, message, result))
        else:
            self._answer(seq, message, None)

    async def _work(self, seq: int, message: Message, first: Awaitable[None]) -> None:
        try:
            try:
                await first
                error: Exception | None = None
            except Exception as exc:  # noqa: BLE001
                error = exc
            self._answer(seq, message, error)
            while self._pending:
                seq, message = self._pending.popleft()
                if self._paused and len(self._pending) < PENDING_MAX // 2 and not self.ended:
                    self._paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                try:
                    result = self.server.on_message(message)
                    if inspect.isawaitable(result):
                        await result
                    error = None
                except Exception as exc:  # noqa: BLE001
                    error = exc
                self._answer(seq, message, error)
        finally:
            self._worker = None

    def _answer(self, seq: int, message: Message | None, error: Exception | None) -> None:
        """Count a message handled, or refuse it (the stream stays open)."""
        server = self.server
        if error is None:
            server.metrics.received += 1
            return
        assert self.sender is not None
        about = _about(message, self.sender)
        if isinstance(error, _Refused):
            reason, text = error.reason, error.text
        elif isinstance(error, ProtocolError):  # the receiver's verdict: e.g. not a member
            reason, text = "refused", str(error)[:_ERROR_TEXT_MAX]
        else:
            server.metrics.rejected["error"] += 1
            log.error("peer_handler_failed", remote=self.remote, exc_info=error, **about)
            self.write(REFUSAL, json.dumps({"seq": seq, "reason": "error", "error": "internal error"}).encode())
            return
        server.count_rejection(reason, text, self.remote, **about)
        self.write(REFUSAL, json.dumps({"seq": seq, "reason": reason, "error": text}).encode())

    def refuse(self, error: FrameError) -> None:
        if self.ended:
            return
        self.server.count_rejection(error.reason, error.text, self.remote)
        code = CLOSE_UNAUTHENTICATED if error.reason in ("unauthenticated", "replayed") else CLOSE_MALFORMED
        self.close(code, error.text)

    def stop(self) -> None:
        """The server is closing: messages not yet handled are not handled."""
        self._pending.clear()
        if self._worker is not None:
            self._worker.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.server.streams.discard(self)
        if self.sender is not None:
            log.info("peer_stream_closed", peer=self.sender, direction="in", code=self.close_code)


def _about(message: Message | None, sender: str) -> dict[str, str]:
    return {"sender": sender} if message is None else {"sender": sender, "type": message.TYPE}


# ----------------------------------------------------------------- client


@dataclasses.dataclass(slots=True)
class _Outgoing:
    body: bytes
    queued_at: float  # monotonic
    type: str


class _Outbound(_Stream):
    """The client's end of one stream: the handshake's frames go to
    `next_frame`, then refusals of our messages are counted and noted."""

    def __init__(self, client: PeerClient, to: str) -> None:
        super().__init__(client.ping_s, HANDSHAKE_TEXT_MAX)
        self.client, self.to = client, to
        self.handshaken = False
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._stalled: asyncio.TimerHandle | None = None

    def frame_received(self, kind: int, payload: bytes) -> None:
        if not self.handshaken:
            self._frames.append((kind, payload))
            self._wake()
        elif kind == REFUSAL:
            self.client.metrics.send_failed[self.to] += 1
            self.client.note(self.to, f"peer refused a message: {payload[:_ERROR_TEXT_MAX].decode('utf-8', 'replace')}")
        else:
            self.refuse(FrameError("malformed", f"the peer sent a {KIND_NAMES[kind]} frame"))

    async def next_frame(self) -> tuple[int, bytes]:
        while not self._frames:
            if self.ended:
                raise ConnectionError(f"the peer ended the stream: {self.close_code} {self.close_reason}".strip())
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._frames.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def refuse(self, error: FrameError) -> None:
        self.client.note(self.to, f"ended the stream: {error.text}")
        self.close(CLOSE_MALFORMED, error.text)

    def _closed_by_peer(self, payload: bytes) -> None:
        super()._closed_by_peer(payload)
        self._wake()

    # A peer that stops reading fills its socket buffer and then ours: past
    # the transport's high-water mark for `timeout_s` the stream is cut and
    # made again, rather than holding messages no one will read.
    def pause_writing(self) -> None:
        self._stalled = asyncio.get_running_loop().call_later(self.client.timeout_s, self._writes_stalled)

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _writes_stalled(self) -> None:
        self.client.metrics.send_failed[self.to] += 1
        self.abort(f"the peer read nothing for {self.client.timeout_s:g} s")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.resume_writing()
        self._wake()


class _Link:
    """Our stream to one peer: writes at once while it is open, queues
    (bounded, oldest dropped) while it is being made."""

    def __init__(self, client: PeerClient, to: str, address: HostPort) -> None:
        self.client, self.to, self.address = client, to, address
        self.queue: collections.deque[_Outgoing] = collections.deque()
        self.stream: _Outbound | None = None
        self.sealer: Sealer | None = None
        self.task = asyncio.create_task(self._run(), name=f"peer-stream-{to}")

    def send(self, body: bytes, kind: str) -> None:
        stream, metrics = self.stream, self.client.metrics
        if stream is not None and not stream.ended and self.sealer is not None:
            stream.write(MESSAGE, self.sealer.seal(body))
            metrics.sent[self.to] += 1
            return
        if len(self.queue) >= self.client.queue_max:
            self.queue.popleft()
            metrics.dropped[self.to] += 1
            self.client.note(self.to, "queue full, dropped the oldest message")
        self.queue.append(_Outgoing(body, time.monotonic(), kind))

    async def _run(self) -> None:
        """Keep a stream to the peer open, forever."""
        client, to, metrics = self.client, self.to, self.client.metrics
        failures = 0
        while True:
            try:
                stream, sealer = await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a peer that is down is the normal case here
                metrics.connect_failed[to] += 1
                client.note(to, f"cannot connect: {_describe(error)}")
                await asyncio.sleep(RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            metrics.connected[to] += 1
            log.info("peer_stream_opened", peer=to, direction="out")
            self._flush(stream, sealer)
            self.stream, self.sealer = stream, sealer
            try:
                await stream.done
            finally:
                self.stream = self.sealer = None
                stream.abort("the client is closing")  # nothing if the stream has ended already
            log.info("peer_stream_closed", peer=to, direction="out", code=stream.close_code)
            client.note(to, f"stream ended: {stream.close_code} {stream.close_reason}")

    def _flush(self, stream: _Outbound, sealer: Sealer) -> None:
        """Write what waited for the stream, oldest first, but nothing the core has long moved on from."""
        now = time.monotonic()
        metrics, max_age = self.client.metrics, self.client.max_age_s
        while self.queue:
            item = self.queue.popleft()
            if now - item.queued_at > max_age:
                metrics.dropped[self.to] += 1
                self.client.note(self.to, f"dropped a {item.type} queued over {max_age:g} s")
                continue
            stream.write(MESSAGE, sealer.seal(item.body))
            metrics.sent[self.to] += 1

    async def _connect(self) -> tuple[_Outbound, Sealer]:
        client, to, address = self.client, self.to, self.address
        ctx = client.ssl_context
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(client.timeout_s):
            _, stream = await loop.create_connection(
                lambda: _Outbound(client, to),
                address.host,
                address.port,
                ssl=ctx,
                server_hostname=address.host if ctx is not None else None,
            )
            try:
                assert stream.transport is not None
                stream.transport.write(PREAMBLE)
                kind, payload = await stream.next_frame()
                if kind != CHALLENGE:
                    raise FrameError("malformed", f"expected a challenge, got a {KIND_NAMES[kind]}")
                challenge = decode_challenge(payload.decode("utf-8", "replace"))
                if challenge.member != to:
                    raise FrameError("malformed", f"the peer at {_show(address)} is member {challenge.member!r}")
                nonce = new_nonce()
                stream.write(
                    HELLO, make_hello(client.secret, client.cluster_name, client.member, challenge, nonce).encode()
                )
                kind, _ = await stream.next_frame()
                if kind != WELCOME:
                    raise FrameError("malformed", "the peer did not welcome us")
            except BaseException:
                stream.abort("handshake failed")
                raise
        stream.handshaken = True
        stream.reader.limit = REPLY_BYTES_MAX
        key = session_key(client.secret, client.cluster_name, client.member, to, challenge.nonce, nonce)
        return stream, Sealer(key)

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.close(CLOSE_GOING_AWAY, "member stopping")
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class PeerClient:
    """Sends messages to peers without ever blocking or raising to the caller.

    Each peer has one stream, kept open by a task of its own (reconnecting
    with a short backoff); `send` writes to it at once, or, while it is
    being made, queues: a full queue drops its oldest message, and one that
    waited longer than `max_age_s` is dropped unsent (the core has long
    moved on; the network may lose messages anyway). A slow or dead peer
    delays only its own messages. `timeout_s` bounds a connection with its
    handshake, and how long a peer may leave our writes unread. Call
    `close()` before the loop ends.
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
        self.secret = secret
        self._addresses = dict(peers)
        self.timeout_s = timeout_s
        self.queue_max = queue_max
        self.max_age_s = max_age_s
        self.ssl_context = ssl_context
        self.ping_s = ping_interval_s
        self.metrics = metrics if metrics is not None else PeerMetrics()
        self._log_interval_s = log_interval_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._links: dict[str, _Link] = {}
        self._closed = False

    def send(self, to: str, msg: Message) -> None:
        """Send `msg` to peer `to` and return at once. Must be called on the event loop."""
        if to not in self._addresses:
            raise ValueError(f"unknown peer {to!r}")
        if msg.cluster != self.cluster_name:
            raise ValueError(f"message for cluster {msg.cluster!r}, this client is {self.cluster_name!r}")
        if self._closed:
            return
        link = self._links.get(to)
        if link is None:
            link = self._links[to] = _Link(self, to, self._addresses[to])
        link.send(encode_message_bytes(msg), msg.TYPE)

    def note(self, to: str, problem: str) -> None:
        # Debug level and rate-limited: a dead peer would otherwise log ten lines a second.
        now = time.monotonic()
        if now - self._last_logged.get(to, -math.inf) < self._log_interval_s:
            self._suppressed[to] += 1
            return
        self._last_logged[to] = now
        log.debug("peer_send_problem", peer=to, problem=problem, suppressed=self._suppressed.pop(to, 0))

    async def close(self) -> None:
        """Stop sending (queued messages are discarded) and end the streams."""
        self._closed = True
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


def _show(address: HostPort) -> str:
    return f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:_ERROR_TEXT_MAX]
