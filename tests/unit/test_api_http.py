"""failoverd.api.http over real sockets on 127.0.0.1: what the server
refuses before any handler (and says why), keep-alive, HEAD, its limits,
and the client's two kinds of failure (never delivered, maybe delivered)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from failoverd.api.http import (
    HEAD_BYTES_MAX,
    ConnectFailed,
    HttpServer,
    NoAnswer,
    Request,
    Response,
    fetch,
    json_response,
)
from tests.support import free_port

BODY_MAX = 1024


class Recorder:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.refused: list[int] = []

    async def handle(self, request: Request) -> Response:
        self.requests.append(request)
        if request.path == "/slow":
            await asyncio.sleep(5)
        return json_response(
            {"method": request.method, "path": request.path, "query": request.query, "body": request.body.decode()},
            headers={"X-Seen": request.headers.get("x-thing", "")},
        )


@pytest.fixture
async def served() -> AsyncIterator[tuple[HttpServer, Recorder]]:
    recorder = Recorder()
    server = HttpServer(
        recorder.handle,
        host="127.0.0.1",
        port=0,
        body_max=BODY_MAX,
        on_refused=lambda status, remote: recorder.refused.append(status),
        read_timeout_s=0.5,
        idle_timeout_s=0.5,
    )
    await server.start()
    yield server, recorder
    await server.close()


async def raw(port: int, data: bytes, *, read_all: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read() if read_all else reader.read(65536), 5)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def test_a_request_with_query_headers_and_body(served) -> None:
    server, recorder = served
    status, body = await fetch(
        "127.0.0.1",
        server.port,
        "POST",
        "/a%20b?x=1&x=2&y=",
        body=b'{"k": 1}',
        headers={"X-Thing": "seen"},
        timeout_s=2,
        connect_timeout_s=1,
        answer_max=1 << 20,
    )
    assert status == 200
    assert json.loads(body) == {"method": "POST", "path": "/a b", "query": {"x": "1", "y": ""}, "body": '{"k": 1}'}
    assert recorder.requests[0].headers["X-THING"] == "seen" and "x-thing" in recorder.requests[0].headers


async def test_keep_alive_head_and_connection_close(served) -> None:
    server, recorder = served
    two = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nHEAD /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await raw(server.port, two)
    status, headers, rest = parse(answer)
    assert status == 200 and headers["connection"] == "keep-alive"
    status, headers, body = parse(rest[int(headers["content-length"]) :])
    assert status == 200 and headers["connection"] == "close" and int(headers["content-length"]) > 0 and body == b""
    assert [r.method for r in recorder.requests] == ["GET", "HEAD"]


@pytest.mark.parametrize(
    "request_bytes, status, text",
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
        (b"GET /x HTTP/2.0\r\n\r\n", 505, "HTTP/1.0 or HTTP/1.1"),
        (b"GET x HTTP/1.1\r\n\r\n", 400, "malformed request line"),
        (b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed header"),
        (b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "appears twice"),
        (b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501, "Content-Length"),
        (b"POST /x HTTP/1.1\r\nContent-Length: 1025\r\n\r\n", 413, "exceeds 1024"),
        (b"GET /x HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "more than 100"),
        (b"GET /x HTTP/1.1\r\nX-A: " + b"b" * HEAD_BYTES_MAX + b"\r\n\r\n", 431, "exceed"),
        (b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 408, "did not arrive"),
    ],
)
async def test_protocol_errors_are_answered_and_close_the_connection(served, request_bytes, status, text) -> None:
    server, recorder = served
    got, headers, body = parse(await raw(server.port, request_bytes))
    assert got == status and text in json.loads(body)["error"], body
    assert headers["connection"] == "close"
    assert recorder.requests == [] and recorder.refused == [status]


async def test_an_idle_connection_is_closed(served) -> None:
    server, recorder = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed after idle_timeout_s, nothing said
    writer.close()
    assert recorder.refused == []


async def test_too_many_connections_are_refused() -> None:
    recorder = Recorder()
    server = HttpServer(recorder.handle, host="127.0.0.1", port=0, body_max=BODY_MAX)
    await server.start()
    held = []
    try:
        for _ in range(64):
            held.append(await asyncio.open_connection("127.0.0.1", server.port))
        await asyncio.sleep(0.1)
        status, _, body = parse(await raw(server.port, b""))  # answered at once, before any request
        assert status == 503 and "too many connections" in json.loads(body)["error"]
    finally:
        for _, writer in held:
            writer.close()
        await server.close()


async def test_the_client_tells_never_delivered_from_maybe_delivered(served) -> None:
    server, _ = served
    with pytest.raises(ConnectFailed):
        await fetch("127.0.0.1", free_port(), "GET", "/", timeout_s=1, connect_timeout_s=0.5, answer_max=100)
    with pytest.raises(NoAnswer, match=r"no answer within 0\.3 s"):
        await fetch("127.0.0.1", server.port, "GET", "/slow", timeout_s=0.3, connect_timeout_s=0.5, answer_max=100)
    with pytest.raises(NoAnswer, match="more than 10"):
        await fetch("127.0.0.1", server.port, "GET", "/big", timeout_s=1, connect_timeout_s=0.5, answer_max=10)


async def test_the_client_reads_chunked_and_unsized_answers() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.0 503 Service Unavailable\r\n\r\nuntil the end",
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        got = [
            await fetch("127.0.0.1", port, "GET", "/", timeout_s=2, connect_timeout_s=1, answer_max=100) for _ in "ab"
        ]
        assert got == [(200, b"abcde"), (503, b"until the end")]
    finally:
        server.close()
