"""Talk to a peer port as a member, or as an attacker: a hand-driven client
end of one stream (`RawStream`, for coroutine tests), and `exchange`, one
stream per call, synchronous, for tests that are not coroutines."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import ssl

from failoverd.adapters.peer_frames import (
    CHALLENGE,
    CLOSE,
    HELLO,
    MESSAGE,
    PING,
    PONG,
    PREAMBLE,
    REFUSAL,
    WELCOME,
    Challenge,
    FrameReader,
    Sealer,
    decode_challenge,
    encode_frame,
    make_hello,
    new_nonce,
    session_key,
)

QUIET_S = 0.3  # no answer for this long after the last frame: the frames were taken
ABNORMAL = 1006  # the stream ended without a CLOSE frame


class RawStream:
    """One client stream driven frame by frame. `close_all` closes every
    stream a test left open."""

    opened: list[RawStream] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        RawStream.opened.append(self)
        self.reader, self.writer = reader, writer
        self._frames = FrameReader(1 << 20)
        self._got: collections.deque[tuple[int, bytes]] = collections.deque()
        self.sealer: Sealer | None = None
        self.challenge: Challenge | None = None
        self.close_code: int | None = None
        self.closed = False

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext | None = None, preamble: bytes = PREAMBLE) -> RawStream:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context is not None else None
        )
        writer.write(preamble)
        return cls(reader, writer)

    def write(self, kind: int, payload: bytes = b"") -> None:
        self.write_raw(encode_frame(kind, payload))

    def write_raw(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    async def send(self, body: bytes) -> bytes:
        """Seal `body` and send it as a message frame; the sealed frame."""
        assert self.sealer is not None
        frame = self.sealer.seal(body)
        self.write(MESSAGE, frame)
        await self.writer.drain()
        return frame

    async def next_frame(self, timeout_s: float = 3.0) -> tuple[int, bytes] | None:
        """The next frame other than a pong (pings are answered); None when
        the stream has ended (`close_code` says how)."""
        while True:
            while self._got:
                kind, payload = self._got.popleft()
                if kind == PING:
                    self.write(PONG, payload)
                elif kind == CLOSE:
                    self.closed, self.close_code = True, json.loads(payload)["code"]
                    self.writer.close()
                    return None
                elif kind != PONG:
                    return kind, payload
            if self.closed:
                return None
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                self.closed, self.close_code = True, ABNORMAL
                self.writer.close()
                return None
            self._got.extend(self._frames.feed(data))

    async def next_text(self, timeout_s: float = 3.0) -> dict:
        """The next refusal (or welcome, as {"welcome": true}), parsed."""
        frame = await self.next_frame(timeout_s)
        assert frame is not None, f"the stream ended ({self.close_code})"
        kind, payload = frame
        if kind == WELCOME:
            return {"welcome": True}
        assert kind == REFUSAL, (kind, payload)
        return json.loads(payload)

    async def closed_with(self, timeout_s: float = 3.0) -> int | None:
        """Read until the stream ends; the code it ended with."""
        while await self.next_frame(timeout_s) is not None:
            pass
        return self.close_code

    @classmethod
    async def close_all(cls) -> None:
        streams, cls.opened = cls.opened, []
        for stream in streams:
            await stream.close()

    async def close(self) -> None:
        self.closed = True
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def open_stream(
    port: int,
    *,
    secret: bytes,
    cluster: str,
    sender: str = "a",
    recipient: str | None = None,
    hello: str | bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[RawStream, bool]:
    """Connect and shake hands as `sender`, or send `hello` instead of the
    real one; (the stream, whether we were welcomed). A hello for
    `recipient` is made as if the challenge came from that member."""
    stream = await RawStream.connect(port, context)
    frame = await stream.next_frame()
    assert frame is not None and frame[0] == CHALLENGE, (frame, stream.close_code)
    stream.challenge = challenge = decode_challenge(frame[1].decode())
    if hello is not None:
        stream.write(HELLO, hello if isinstance(hello, bytes) else hello.encode("utf-8", "surrogatepass"))
        return stream, False
    nonce = new_nonce()
    if recipient is not None:
        challenge = Challenge(recipient, challenge.nonce)
    stream.write(HELLO, make_hello(secret, cluster, sender, challenge, nonce).encode())
    stream.sealer = Sealer(session_key(secret, cluster, sender, challenge.member, challenge.nonce, nonce))
    reply = await stream.next_frame()
    return stream, reply is not None and reply[0] == WELCOME


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
    junk: bytes = b"",
    hello: str | bytes | None = None,
    context: ssl.SSLContext | None = None,
    replay: bool = False,
) -> Outcome:
    """Open a stream, shake hands (or send `hello` instead), seal and send
    `bodies` (and, with `replay`, the same frames once more), then send `raw`
    payloads as message frames, unsealed, then `junk` bytes as they are;
    collect what comes back."""
    return asyncio.run(
        _exchange(port, secret, cluster, recipient, sender, list(bodies), list(raw), junk, hello, context, replay)
    )


async def _exchange(port, secret, cluster, recipient, sender, bodies, raw, junk, hello, context, replay) -> Outcome:
    stream, welcomed = await open_stream(
        port, secret=secret, cluster=cluster, sender=sender, hello=hello, context=context
    )
    try:
        assert stream.challenge is not None and stream.challenge.member == recipient, stream.challenge
        frames = [stream.sealer.seal(b) for b in bodies] if welcomed and stream.sealer else []
        for frame in [*frames, *(frames if replay else [])]:
            stream.write(MESSAGE, frame)
        for payload in raw:
            stream.write(MESSAGE, payload)
        stream.write_raw(junk)
        answers: list[dict] = []
        sent = len(frames) * (2 if replay else 1)
        # Every sealed frame gets a refusal or is taken; raw ones end the stream.
        while not stream.closed and (hello is not None or raw or junk or len(answers) < sent):
            try:
                got = await stream.next_frame(QUIET_S)
            except TimeoutError:  # quiet: what we sent was taken
                break
            if got is None:
                break
            if got[0] == REFUSAL:
                answers.append(json.loads(got[1]))
        return Outcome(welcomed, answers, stream.close_code if stream.closed else None, frames)
    finally:
        await stream.close()
