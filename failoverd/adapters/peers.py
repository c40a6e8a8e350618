"""The supervisors' RPC: one authenticated POST per message, over aiohttp.

Wire format (safety properties 4 and 6):

    POST /peer/v1/message
    X-Failoverd-Timestamp: <unix seconds, e.g. 1718000000.123456>
    X-Failoverd-Signature: v2=<hex HMAC-SHA256(secret, timestamp + "\\n" + recipient + "\\n" + body)>
    body: encode_message_bytes(msg), at most MAX_MESSAGE_BYTES

Answers: 204 accepted; 400 malformed (bad timestamp header, a body
`decode_message_bytes` refuses, or a message the receiver refuses with
ProtocolError, e.g. another cluster's); 401 unauthenticated (no or bad
signature, a timestamp outside the window, a replay); 413 too large; 500 the
receiver failed (logged, never crashes the server). Every error body is JSON
`{"error": "..."}`. The receiver's callback runs only for authenticated,
decoded messages of our cluster, so nothing unauthenticated changes state.

The recipient's member name is part of what is signed, so a message captured
on its way to one member is refused by every other member.

Replay: the timestamp window bounds how long a captured message stays valid,
and the server remembers the signatures it accepted within the window, so a
byte-for-byte replay to the same server is refused too. The window compares
wall clocks across hosts, so it needs NTP-disciplined clocks; it is not a
safety mechanism (the core's term and sequence rules are, and they use only
monotonic time), so a badly skewed host loses liveness, never safety.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import inspect
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from failoverd.config.load import HostPort
from failoverd.core.messages import (
    MAX_MESSAGE_BYTES,
    Message,
    ProtocolError,
    decode_message_bytes,
    encode_message_bytes,
)

PATH = "/peer/v1/message"
SIGNATURE_HEADER = "X-Failoverd-Signature"
TIMESTAMP_HEADER = "X-Failoverd-Timestamp"
CLOCK_SKEW_MAX_S = 30.0
SECRET_BYTES_MIN = 16
REPLAY_CACHE_MAX = 65536  # at ~10 messages/s per peer, hours of headroom within a 60 s memory
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_ERROR_TEXT_MAX = 300

OnMessage = Callable[[Message], Awaitable[None] | None]
log = structlog.get_logger("failoverd.adapters.peers")


@dataclasses.dataclass(slots=True)
class PeerMetrics:
    """Counters for the API's metrics endpoint; shared by server and client."""

    received: int = 0
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by reason
    sent: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by peer
    send_failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    dropped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # queue full / too old


def sign(secret: bytes, timestamp: str, recipient: str, body: bytes) -> str:
    """The signature header value for `body` sent to member `recipient` at
    `timestamp` (the header's exact text)."""
    material = timestamp.encode("ascii") + b"\n" + recipient.encode("utf-8") + b"\n" + body
    return "v2=" + hmac.new(secret, material, hashlib.sha256).hexdigest()


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < SECRET_BYTES_MIN:
        raise ValueError(f"the secret must be at least {SECRET_BYTES_MIN} bytes")


class _Rejected(Exception):
    def __init__(self, status: int, reason: str, text: str) -> None:
        super().__init__(text)
        self.status, self.reason, self.text = status, reason, text[:_ERROR_TEXT_MAX]


class PeerServer:
    """Accepts authenticated peer messages and hands them to `on_message`.

    `on_message` may be a plain function or a coroutine function; if it raises
    ProtocolError the sender gets 400 with its text. Bind with `start()`;
    `port` is then the bound port (useful with port 0).
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
        clock_skew_max_s: float = CLOCK_SKEW_MAX_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        _check_secret(secret)
        self.cluster_name = cluster_name
        self.member = member  # our name: messages signed for another member are refused
        self._secret = secret
        self._on_message = on_message
        self.host, self._port = host, port
        self.metrics = metrics if metrics is not None else PeerMetrics()
        self._ssl_context = ssl_context
        self._skew_s = clock_skew_max_s
        self._wall_clock = wall_clock
        # signature -> monotonic time to forget it; insertion order is expiry order
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the peer server is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_MESSAGE_BYTES)
        app.router.add_post(PATH, self._handle)
        # A short shutdown: in-flight peer messages are worth little once we stop.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, ssl_context=self._ssl_context)
        await site.start()
        log.info("peer_server_listening", host=self.host, port=self.port, tls=self._ssl_context is not None)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        message: Message | None = None
        try:
            message = await self._accept(request)
            result = self._on_message(message)
            if inspect.isawaitable(result):
                await result
        except _Rejected as rejected:
            return self._reject(request, rejected, message)
        except ProtocolError as error:  # the receiver's verdict: e.g. not a member
            return self._reject(request, _Rejected(400, "refused", str(error)), message)
        except Exception:
            self.metrics.rejected["error"] += 1
            log.exception("peer_handler_failed", remote=request.remote, **_about(message))
            return web.json_response({"error": "internal error"}, status=500)
        self.metrics.received += 1
        return web.Response(status=204)

    def _reject(self, request: web.Request, rejected: _Rejected, message: Message | None) -> web.Response:
        self.metrics.rejected[rejected.reason] += 1
        log.warning(
            "peer_message_rejected",
            reason=rejected.reason,
            status=rejected.status,
            detail=rejected.text,
            remote=request.remote,
            **_about(message),
        )
        return web.json_response({"error": rejected.text}, status=rejected.status)

    async def _accept(self, request: web.Request) -> Message:
        """The message in `request`, or _Rejected; checks are ordered cheapest and
        least trusting first, and nothing is decoded before it is authenticated."""
        if request.content_length is not None and request.content_length > MAX_MESSAGE_BYTES:
            raise _Rejected(413, "too_large", f"body exceeds {MAX_MESSAGE_BYTES} bytes")
        body = await _read_limited(request, MAX_MESSAGE_BYTES)
        signature = request.headers.get(SIGNATURE_HEADER)
        if signature is None:
            raise _Rejected(401, "unauthenticated", f"missing {SIGNATURE_HEADER}")
        stamp = request.headers.get(TIMESTAMP_HEADER, "")
        if not _TIMESTAMP_RE.fullmatch(stamp):
            raise _Rejected(400, "malformed", f"{TIMESTAMP_HEADER} is not unix seconds")
        expected = sign(self._secret, stamp, self.member, body).encode()
        if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected):
            raise _Rejected(401, "unauthenticated", "bad signature")
        if abs(float(stamp) - self._wall_clock()) > self._skew_s:
            raise _Rejected(401, "stale", f"stale or future timestamp (more than {self._skew_s:g} s off)")
        self._remember(signature)
        try:
            message = decode_message_bytes(body)
        except ProtocolError as error:
            raise _Rejected(400, "malformed", str(error)) from None
        except RecursionError:  # nesting just below the parser's limit (tests/unit/test_messages.py)
            raise _Rejected(400, "malformed", "message nested too deeply") from None
        except ValueError as error:  # e.g. an integer of more than 4300 digits
            raise _Rejected(400, "malformed", f"message is not valid: {error}") from None
        if message.cluster != self.cluster_name:
            raise _Rejected(400, "refused", f"message for cluster {message.cluster!r}, this is {self.cluster_name!r}")
        return message

    def _remember(self, signature: str) -> None:
        now = time.monotonic()
        while self._seen and (next(iter(self._seen.values())) <= now or len(self._seen) >= REPLAY_CACHE_MAX):
            self._seen.popitem(last=False)
        if signature in self._seen:
            raise _Rejected(401, "replayed", "message already received")
        # A timestamp up to skew ahead stays acceptable until 2 * skew from now.
        self._seen[signature] = now + 2 * self._skew_s


def _about(message: Message | None) -> dict[str, str]:
    return {} if message is None else {"sender": message.sender, "type": message.TYPE}


async def _read_limited(request: web.Request, limit: int) -> bytes:
    # request.read() would raise aiohttp's own 413 past client_max_size; reading
    # ourselves keeps one path for counting and logging every rejection.
    chunks: list[bytes] = []
    total = 0
    while chunk := await request.content.read(limit + 1 - total):
        total += len(chunk)
        if total > limit:
            raise _Rejected(413, "too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclasses.dataclass(slots=True)
class _Outgoing:
    body: bytes
    queued_at: float  # monotonic
    type: str


class PeerClient:
    """Sends messages to peers without ever blocking or raising to the caller.

    Each peer has its own bounded queue and `concurrency` worker tasks, so a
    slow or dead peer delays only its own messages. A full queue drops its
    oldest message; a message queued longer than `max_age_s` is dropped
    unsent (the core has long moved on; the network may lose messages
    anyway). Call `close()` before the loop ends.
    """

    def __init__(
        self,
        cluster_name: str,
        secret: bytes,
        peers: dict[str, HostPort],
        *,
        timeout_s: float = 0.5,
        queue_max: int = 256,
        max_age_s: float = 5.0,
        concurrency: int = 4,
        ssl_context: ssl.SSLContext | None = None,
        metrics: PeerMetrics | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        _check_secret(secret)
        if not (timeout_s > 0 and queue_max >= 1 and max_age_s > 0 and concurrency >= 1):
            raise ValueError("timeout_s, queue_max, max_age_s and concurrency must be positive")
        self.cluster_name = cluster_name
        self._secret = secret
        scheme = "https" if ssl_context is not None else "http"
        self._urls = {name: f"{scheme}://{address}{PATH}" for name, address in peers.items()}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._queue_max = queue_max
        self._max_age_s = max_age_s
        self._concurrency = concurrency
        self._ssl_context = ssl_context
        self.metrics = metrics if metrics is not None else PeerMetrics()
        self._log_interval_s = log_interval_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._queues: dict[str, asyncio.Queue[_Outgoing]] = {}
        self._workers: list[asyncio.Task[None]] = []
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

    def _start_peer(self, to: str) -> asyncio.Queue[_Outgoing]:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                ssl=self._ssl_context if self._ssl_context is not None else True,
                limit=0,
                limit_per_host=self._concurrency,
                keepalive_timeout=30.0,
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        queue: asyncio.Queue[_Outgoing] = asyncio.Queue(self._queue_max)
        self._queues[to] = queue
        for i in range(self._concurrency):
            self._workers.append(asyncio.create_task(self._worker(to, queue), name=f"peer-send-{to}-{i}"))
        return queue

    async def _worker(self, to: str, queue: asyncio.Queue[_Outgoing]) -> None:
        while True:
            item = await queue.get()
            if time.monotonic() - item.queued_at > self._max_age_s:
                self.metrics.dropped[to] += 1
                self._note(to, f"dropped a {item.type} queued over {self._max_age_s:g} s")
                continue
            try:
                await self._post(to, item)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - never let one failure end the worker
                self.metrics.send_failed[to] += 1
                self._note(to, f"{type(error).__name__}: {error}"[:_ERROR_TEXT_MAX])

    async def _post(self, to: str, item: _Outgoing) -> None:
        assert self._session is not None
        stamp = f"{time.time():.6f}"  # signed when sent, not when queued, so queueing cannot make it stale
        headers = {
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: sign(self._secret, stamp, to, item.body),
            "Content-Type": "application/json",
        }
        async with self._session.post(self._urls[to], data=item.body, headers=headers) as response:
            if response.status == 204:
                self.metrics.sent[to] += 1
                return
            text = (await response.content.read(_ERROR_TEXT_MAX)).decode("utf-8", "replace")
        self.metrics.send_failed[to] += 1
        self._note(to, f"peer answered {response.status} to a {item.type}: {text}")

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
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
