"""CPU cost of one peer message on this machine: the supervisors' former
transport (v2: one aiohttp POST per message, answered 204) against a kept
websocket (one frame per message, what adapters/peers.py now does), both on
127.0.0.1, client and server in this one process, each message HMAC-signed
and verified.

    .venv/bin/python bench/peer_transport.py [--messages 3000]

Idle supervisors spend most of their CPU on peer messages (ten heartbeats a
second to each standby, and their acknowledgements) and on probes; this
measures how much a persistent framed stream would save per message. It is
a measurement for a design decision, not a test of adapters/peers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import resource

import aiohttp
from aiohttp import web

BODY = b"x" * 300  # about the size of an encoded heartbeat
SECRET = b"s" * 32
WARMUP = 50


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sign(body: bytes) -> str:
    return hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def verify(signature: str, body: bytes) -> None:
    if not hmac.compare_digest(signature, sign(body)):
        raise ValueError("bad signature")


async def serve() -> tuple[web.AppRunner, int]:
    """The server on a port the kernel picks as it binds (no free-port guess to race on), and that port."""

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        verify(request.headers["X-Signature"], body)
        return web.Response(status=204)

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for frame in ws:
            signature, body = frame.data[:64].decode(), frame.data[64:]
            verify(signature, body)
            if body.startswith(b"ack"):
                await ws.send_bytes(b"ok")
        return ws

    app = web.Application()
    app.router.add_post("/message", post)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def main(messages: int) -> None:
    runner, port = await serve()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def one_post() -> None:
                async with session.post(f"{base}/message", data=BODY, headers={"X-Signature": sign(BODY)}) as r:
                    await r.read()

            for _ in range(WARMUP):
                await one_post()
            started = cpu_s()
            for _ in range(messages):
                await one_post()
            post_us = (cpu_s() - started) / messages * 1e6

            ws = await session.ws_connect(f"{base}/stream")
            acked = b"ack" + BODY[3:]
            for _ in range(WARMUP):
                await ws.send_bytes(sign(acked).encode() + acked)
                await ws.receive()
            started = cpu_s()
            for _ in range(messages):  # each frame answered, as the POST is
                await ws.send_bytes(sign(acked).encode() + acked)
                await ws.receive()
            answered_us = (cpu_s() - started) / messages * 1e6
            started = cpu_s()
            for _ in range(messages):  # one way, as heartbeats and acks would be
                await ws.send_bytes(sign(BODY).encode() + BODY)
                await asyncio.sleep(0)
            await ws.send_bytes(sign(acked).encode() + acked)
            await ws.receive()  # the server has read everything before this
            one_way_us = (cpu_s() - started) / messages * 1e6
            await ws.close()
    finally:
        await runner.cleanup()
    print(f"{messages} messages each, client and server in one process, CPU per message:")
    print(f"  HTTP POST answered 204 (today):   {post_us:6.0f} us")
    print(f"  websocket frame, answered:        {answered_us:6.0f} us")
    print(f"  websocket frame, one way:         {one_way_us:6.0f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    asyncio.run(main(parser.parse_args().messages))
