"""CPU cost of one peer message on this machine: the supervisors' transport
(adapters/peers.py, protocol 4: plain length-prefixed frames on a kept TCP
stream) against the websocket of protocol 3 (aiohttp, one binary frame per
message), both on 127.0.0.1 with client and server in this one process, each
message sealed (HMAC-SHA256 with a sequence number) and checked.

    .venv/bin/python bench/peer_transport.py [--messages 2000] [--rounds 3]

Two ways of sending:
- back to back: the CPU of the code path itself;
- paced, one message every 10 ms: what an idle cluster does (ten heartbeats
  a second), where each message also wakes the sender and the receiver from
  sleep; this is the figure that sets an idle member's CPU.

Reported: the median over the rounds, and the range. A measurement for a
design decision and a regression check, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import resource
import statistics
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from failoverd.adapters.peers import PeerClient, PeerServer
from failoverd.config.load import HostPort
from failoverd.core.messages import Heartbeat, decode_message_bytes, encode_message_bytes
from failoverd.core.state import ClusterState, Position, StateStamp

CLUSTER = "bench"
SECRET = b"s" * 32
PACE_S = 0.01
MESSAGE = Heartbeat(
    CLUSTER,
    "a",
    7,
    seq=1,
    state=ClusterState(stamp=StateStamp(7, 3), primary="a"),
    commit_version=3,
    primary_ready=True,
    primary_position=Position(3, 1 << 30),
    promise_s=1.0,
)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def adapter(messages: int, paced: bool) -> float:
    got = asyncio.Event()
    count = 0

    async def on_message(_message: object) -> None:
        nonlocal count
        count += 1
        if count >= messages:
            got.set()

    server = PeerServer(CLUSTER, SECRET, on_message, member="b", host="127.0.0.1", port=0)
    await server.start()
    client = PeerClient(CLUSTER, SECRET, {"b": HostPort("127.0.0.1", server.port)}, member="a")
    try:
        client.send("b", MESSAGE)
        while count < 1:
            await asyncio.sleep(0.01)
        count = 0
        started = cpu_s()
        for _ in range(messages):
            client.send("b", MESSAGE)
            await asyncio.sleep(PACE_S if paced else 0)
        await got.wait()
        return (cpu_s() - started) / messages * 1e6
    finally:
        await client.close()
        await server.close()


async def websocket(messages: int, paced: bool) -> float:
    got = asyncio.Event()
    count = 0
    key = hashlib.sha256(SECRET).digest()

    async def on_message(_message: object) -> None:
        nonlocal count
        count += 1
        if count >= messages:
            got.set()

    async def stream(request: web.Request) -> web.WebSocketResponse:
        nonlocal count
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for frame in ws:  # as protocol 3's server did: decode, then the callback, in the reader
            data = frame.data
            if not hmac.compare_digest(data[8:40], hmac.new(key, data[:8] + data[40:], hashlib.sha256).digest()):
                raise ValueError("bad tag")
            await on_message(decode_message_bytes(data[40:]))
            if count >= messages:
                got.set()
        return ws

    app = web.Application()
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"http://127.0.0.1:{port}/stream")

            async def send(seq: int) -> None:
                head, body = seq.to_bytes(8, "big"), encode_message_bytes(MESSAGE)
                await ws.send_bytes(head + hmac.new(key, head + body, hashlib.sha256).digest() + body)

            await send(0)
            while count < 1:
                await asyncio.sleep(0.01)
            count = 0
            started = cpu_s()
            for seq in range(1, messages + 1):
                await send(seq)
                await asyncio.sleep(PACE_S if paced else 0)
            await got.wait()
            cost = (cpu_s() - started) / messages * 1e6
            await ws.close()
            return cost
    finally:
        await runner.cleanup()


async def main(messages: int, rounds: int) -> None:
    paced_messages = max(100, messages // 5)
    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, run in (("plain frames (protocol 4)", adapter), ("websocket (protocol 3)", websocket)):
            results.setdefault(f"{name}, back to back", []).append(await run(messages, False))
            results.setdefault(f"{name}, paced 10 ms", []).append(await run(paced_messages, True))
    print(f"CPU per message, client and server in one process, {rounds} rounds (median, range):")
    for name, values in sorted(results.items()):
        print(f"  {name:44} {statistics.median(values):6.0f} us  ({min(values):.0f}-{max(values):.0f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.rounds))
