"""The little of HTTP/1.1 the REST API needs, on asyncio streams: a server
(requests with a Content-Length body, keep-alive, HEAD, TLS) and a client
(one request per connection). docs/api.md is what is served on it.

Why not an HTTP library: the supervisor runs on every database host for
months, and aiohttp alone added 15 MB to its memory (docs/design.md §11,
"Peer transport"), for an API that answers a health check every few seconds.

The server is strict where a peer could hurt it, and says why in a JSON
error: request line and headers at most `HEAD_BYTES_MAX` (431), a body only
with Content-Length and at most the server's limit (413; 501 for a chunked
body), whole requests within `READ_TIMEOUT_S` once started (408), and idle
keep-alive connections closed after `IDLE_TIMEOUT_S`. A protocol error
closes the connection after its answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

HEAD_BYTES_MAX = 16 * 1024
HEADERS_MAX = 100
READ_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 30.0
REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """An answer other than the handler's: `status`, a text for the JSON error, extra headers."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or {}


class Headers(dict[str, str]):
    """Header fields by lower-cased name (a repeated field keeps its first value)."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]  # the first value of each parameter
    headers: Headers
    remote: str | None
    body: bytes = b""

    async def read(self) -> bytes:
        return self.body


@dataclasses.dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status, json.dumps(data).encode(), {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
    )


def error_response(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": text}, status, headers)


Handler = Callable[[Request], Awaitable[Response]]
OnRefused = Callable[[int, str | None], None]  # status, remote: a request refused before any handler


class HttpServer:
    """Serves `handler` on host:port. `start()` binds (OSError when it cannot);
    `port` is then the bound port (useful with port 0)."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str,
        port: int,
        body_max: int,
        ssl_context: ssl.SSLContext | None = None,
        on_refused: OnRefused | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.host, self._port = host, port
        self.body_max = body_max
        self._ssl_context = ssl_context
        self._on_refused = on_refused
        self._read_timeout_s = read_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, ssl=self._ssl_context, limit=HEAD_BYTES_MAX
        )

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if len(self._connections) >= CONNECTIONS_MAX:
            self._refused(503, remote)
            await _answer(writer, error_response(503, "too many connections"), keep_alive=False, head_only=False)
            writer.close()
            return
        self._connections.add(task)
        try:
            while await self._one(reader, writer, remote):
                pass
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            self._connections.discard(task)
            await _close(writer)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: str | None) -> bool:
        """Read one request, answer it; whether the connection stays open."""
        try:
            async with asyncio.timeout(self._idle_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return False  # idle, or a head dripping in for too long
        except asyncio.IncompleteReadError as error:
            if error.partial.strip():
                self._refused(400, remote)
            return False
        except asyncio.LimitOverrunError:
            return await self._refuse(writer, remote, 431, f"request line and headers exceed {HEAD_BYTES_MAX} bytes")
        try:
            method, target, version, headers = _parse_head(head)
        except HttpError as error:
            return await self._refuse(writer, remote, error.status, error.text)
        head_only = method == "HEAD"
        if "transfer-encoding" in headers:
            return await self._refuse(writer, remote, 501, "send the body with Content-Length, not chunked")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or len(length_text) > 12:
            return await self._refuse(writer, remote, 400, "Content-Length is not a number")
        length = int(length_text)
        if length > self.body_max:
            return await self._refuse(writer, remote, 413, f"the body exceeds {self.body_max} bytes")
        try:
            async with asyncio.timeout(self._read_timeout_s):
                body = await reader.readexactly(length) if length else b""
        except TimeoutError:
            return await self._refuse(writer, remote, 408, f"the body did not arrive within {self._read_timeout_s:g} s")
        split = urllib.parse.urlsplit(target)
        query: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(split.query, keep_blank_values=True):
            query.setdefault(name, value)
        request = Request(method, urllib.parse.unquote(split.path) or "/", query, headers, remote, body)
        response = await self.handler(request)
        connection = headers.get("connection", "").lower()
        keep_alive = (version == "HTTP/1.1" and connection != "close") or connection == "keep-alive"
        await _answer(writer, response, keep_alive=keep_alive, head_only=head_only)
        return keep_alive

    async def _refuse(self, writer: asyncio.StreamWriter, remote: str | None, status: int, text: str) -> bool:
        self._refused(status, remote)
        await _answer(writer, error_response(status, text), keep_alive=False, head_only=False)
        return False

    def _refused(self, status: int, remote: str | None) -> None:
        if self._on_refused is not None:
            self._on_refused(status, remote)


CONNECTIONS_MAX = 64
CLOSE_WAIT_S = 1.0
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _parse_head(head: bytes) -> tuple[str, str, str, Headers]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError(400, "the request is not text") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS or not parts[1].startswith("/"):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"{version[:20]!r} is not HTTP/1.0 or HTTP/1.1")
    if len(lines) - 1 > HEADERS_MAX:
        raise HttpError(431, f"more than {HEADERS_MAX} header fields")
    headers = Headers()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name) <= _TOKEN_CHARS:
            raise HttpError(400, "malformed header field")
        key = name.lower()
        if key not in headers:
            dict.__setitem__(headers, key, value.strip(" \t"))
        elif key in ("content-length", "transfer-encoding", "host", "authorization"):
            raise HttpError(400, f"{name} appears twice")
    return method, target, version, headers


async def _answer(writer: asyncio.StreamWriter, response: Response, *, keep_alive: bool, head_only: bool) -> None:
    reason = REASONS.get(response.status, "Unknown")
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    for name, value in response.headers.items():
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(response.body)}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))
    if not head_only:
        writer.write(response.body)
    await writer.drain()


# ----------------------------------------------------------------- client


class ConnectFailed(Exception):
    """No connection was made: the request never left."""


class NoAnswer(Exception):
    """The request may have arrived; no complete answer came back."""


async def fetch(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout_s: float,
    connect_timeout_s: float,
    answer_max: int,
) -> tuple[int, bytes]:
    """One request on a connection of its own; (status, body). `timeout_s`
    bounds the whole call, `connect_timeout_s` the connection (TLS included)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        async with asyncio.timeout(min(timeout_s, connect_timeout_s)):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=ssl_context,
                server_hostname=host if ssl_context is not None else None,
                limit=HEAD_BYTES_MAX,
            )
    except TimeoutError:
        raise ConnectFailed(f"no connection within {min(timeout_s, connect_timeout_s):g} s") from None
    except (OSError, ssl.SSLError) as error:
        raise ConnectFailed(_describe(error)) from None
    try:
        async with asyncio.timeout_at(deadline):
            lines = [f"{method} {path} HTTP/1.1", f"Host: {_host_header(host, port)}", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            lines.append(f"Content-Length: {len(body or b'')}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + (body or b""))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status, answer_headers = _parse_answer_head(head)
            if method == "HEAD" or status in (204, 304):
                return status, b""
            if answer_headers.get("transfer-encoding", "").lower() == "chunked":
                return status, await _read_chunked(reader, answer_max)
            length = answer_headers.get("content-length")
            if length is not None and length.isdigit():
                if int(length) > answer_max:
                    raise NoAnswer(f"an answer of {length} bytes, more than {answer_max}")
                return status, await reader.readexactly(int(length))
            return status, await reader.read(answer_max)
    except TimeoutError:
        raise NoAnswer(f"no answer within {timeout_s:g} s") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
        raise NoAnswer(f"an incomplete answer: {type(error).__name__}") from None
    except (OSError, ssl.SSLError, HttpError, ValueError) as error:
        raise NoAnswer(_describe(error)) from None
    finally:
        await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close and wait for it (TLS has a closing exchange), but not for long:
    a transport still open when its loop ends is a socket leaked."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_WAIT_S):
            await writer.wait_closed()
    except (TimeoutError, OSError, ssl.SSLError):
        writer.transport.abort()


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_answer_head(head: bytes) -> tuple[int, Headers]:
    lines = head.decode("latin-1")[:-4].split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(502, f"not an HTTP answer: {lines[0][:60]!r}")
    headers = Headers()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon and name.lower() not in headers:
            dict.__setitem__(headers, name.lower(), value.strip(" \t"))
    return int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader, answer_max: int) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are expected
            return bytes(body)
        if len(body) + size > answer_max:
            raise NoAnswer(f"an answer of more than {answer_max} bytes")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {error}"[:300]
