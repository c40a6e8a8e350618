"""Talk to a running supervisor's peer port as a member, or as an attacker:
one stream per call, synchronous, for tests that are not coroutines."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl

import aiohttp

from failoverd.adapters.peer_frames import Sealer, decode_challenge, make_hello, new_nonce, session_key
from failoverd.adapters.peers import STREAM_PATH

QUIET_S = 0.3  # no answer for this long after the last frame: the frames were taken


@dataclasses.dataclass
class Outcome:
    welcomed: bool
    answers: list[dict]  # the refusals the server sent back, in order
    close_code: int | None  # None: the stream was still open when we left
    sealed: list[bytes] = dataclasses.field(default_factory=list)  # the frames made of `bodies`, as sent

    @property
    def refused(self) -> bool:
        return bool(self.answers) or self.close_code is not None


def exchange(
    port: int,
    *,
    secret: bytes,
    cluster: str,
    recipient: str,
    sender: str = "db1",
    bodies: list[bytes] = (),  # type: ignore[assignment]
    raw: list[bytes] = (),  # type: ignore[assignment]
    hello: str | bytes | None = None,
    context: ssl.SSLContext | None = None,
    replay: bool = False,
) -> Outcome:
    """Open a stream, shake hands (or send `hello` instead), seal and send
    `bodies` (and, with `replay`, the same frames once more), then send `raw`
    frames as they are; collect what comes back."""
    return asyncio.run(
        _exchange(port, secret, cluster, recipient, sender, list(bodies), list(raw), hello, context, replay)
    )


async def _exchange(*args) -> Outcome:
    try:
        return await _exchange_once(*args)
    finally:
        # aiohttp's advice for TLS: let the closing handshake finish before the loop ends.
        await asyncio.sleep(0.25 if args[-2] is not None else 0)


async def _exchange_once(port, secret, cluster, recipient, sender, bodies, raw, hello, context, replay) -> Outcome:
    scheme = "wss" if context is not None else "ws"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{scheme}://127.0.0.1:{port}{STREAM_PATH}", ssl=context or True, max_msg_size=0)
        challenge = decode_challenge((await ws.receive(timeout=5)).data)
        welcomed = False
        code: int | None = None
        if hello is None:
            nonce = new_nonce()
            await ws.send_str(make_hello(secret, cluster, sender, challenge, nonce))
            reply = await ws.receive(timeout=5)
            welcomed = reply.type == aiohttp.WSMsgType.TEXT and json.loads(reply.data) == {"welcome": True}
            if reply.type == aiohttp.WSMsgType.CLOSE:
                code = ws.close_code
            sealer = Sealer(session_key(secret, cluster, sender, recipient, challenge.nonce, nonce))
        else:
            await (ws.send_bytes(hello) if isinstance(hello, bytes) else ws.send_str(hello))
        frames = [sealer.seal(b) for b in bodies] if welcomed else []
        answers: list[dict] = []
        for frame in [*frames, *(frames if replay else []), *raw]:
            if ws.closed:
                break
            try:
                await ws.send_bytes(frame)
            except ConnectionError:
                break
        sent = len(frames) * (2 if replay else 1)
        # Every sealed frame gets a refusal or is taken; raw ones close the stream.
        while not ws.closed and (hello is not None or raw or len(answers) < sent):
            try:
                reply = await ws.receive(timeout=QUIET_S)
            except TimeoutError:  # aiohttp marks the stream closed (1006) here: it was open
                break
            if reply.type != aiohttp.WSMsgType.TEXT:
                code = ws.close_code
                break
            answers.append(json.loads(reply.data))
        await ws.close()
        return Outcome(welcomed, answers, code, frames)
