"""The peer transport's handshake and frames, without any I/O (docs/design.md
§11, "Peer transport").

A connection starts with a challenge from the server (its member name and a
fresh nonce) and a hello from the client (its name, its nonce, and a MAC over
both nonces, the cluster, the sender and the recipient). Both sides then
derive a key of their own for this connection, and every message travels as

    seq (8 bytes, big-endian) || HMAC-SHA256(key, seq || body) || body

with seq 1, 2, 3... A frame is accepted only with the next seq and a valid
tag: a replay on the same connection has an old seq, and on any other
connection (or to any other member) a wrong tag. No clock is involved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
from typing import Any

from failoverd.core.messages import MAX_MESSAGE_BYTES

PROTOCOL = "failoverd-peer-3"
NONCE_BYTES = 32
SEQ_BYTES = 8
TAG_BYTES = 32
HEADER_BYTES = SEQ_BYTES + TAG_BYTES
MAX_FRAME_BYTES = HEADER_BYTES + MAX_MESSAGE_BYTES
HANDSHAKE_TEXT_MAX = 1024  # a challenge or a hello is under 300 characters
NAME_CHARS_MAX = 200
SECRET_BYTES_MIN = 16


class FrameError(Exception):
    """A handshake or frame refused; `reason` is the metrics label."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason, self.text = reason, text


def check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < SECRET_BYTES_MIN:
        raise ValueError(f"the secret must be at least {SECRET_BYTES_MIN} bytes")


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _mac(secret: bytes, label: str, cluster: str, sender: str, recipient: str, server: bytes, client: bytes) -> bytes:
    # Length-prefixed fields: no two different tuples give the same material.
    material = bytearray(PROTOCOL.encode())
    for field in (label.encode(), cluster.encode(), sender.encode(), recipient.encode(), server, client):
        material += len(field).to_bytes(4, "big") + field
    return hmac.new(secret, bytes(material), hashlib.sha256).digest()


# ------------------------------------------------------------- handshake


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    member: str  # the server's member name
    nonce: bytes


def encode_challenge(challenge: Challenge) -> str:
    return json.dumps({"protocol": PROTOCOL, "member": challenge.member, "nonce": challenge.nonce.hex()})


def decode_challenge(text: str) -> Challenge:
    fields = _json_object(text, "challenge")
    if fields.get("protocol") != PROTOCOL:
        raise FrameError("malformed", f"the peer does not speak {PROTOCOL}")
    return Challenge(_name(fields, "member"), _nonce(fields))


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    sender: str
    nonce: bytes
    mac: bytes


def make_hello(secret: bytes, cluster: str, sender: str, challenge: Challenge, nonce: bytes) -> str:
    mac = _mac(secret, "hello", cluster, sender, challenge.member, challenge.nonce, nonce)
    return json.dumps({"sender": sender, "nonce": nonce.hex(), "mac": mac.hex()})


def accept_hello(secret: bytes, cluster: str, challenge: Challenge, text: str) -> Hello:
    """The client's hello, checked against the challenge we sent (FrameError if not)."""
    fields = _json_object(text, "hello")
    sender, nonce = _name(fields, "sender"), _nonce(fields)
    mac = fields.get("mac")
    if not isinstance(mac, str) or len(mac) != 2 * TAG_BYTES:
        raise FrameError("malformed", "hello: mac must be 64 hex digits")
    expected = _mac(secret, "hello", cluster, sender, challenge.member, challenge.nonce, nonce)
    if not hmac.compare_digest(mac.encode("ascii", "replace"), expected.hex().encode()):
        raise FrameError("unauthenticated", "bad hello signature")
    return Hello(sender, nonce, expected)


def session_key(secret: bytes, cluster: str, sender: str, recipient: str, server: bytes, client: bytes) -> bytes:
    return _mac(secret, "session", cluster, sender, recipient, server, client)


def _json_object(text: str, what: str) -> dict[str, Any]:
    if len(text) > HANDSHAKE_TEXT_MAX:
        raise FrameError("malformed", f"{what} longer than {HANDSHAKE_TEXT_MAX} characters")
    try:
        fields = json.loads(text)
    except ValueError:
        raise FrameError("malformed", f"{what} is not JSON") from None
    if not isinstance(fields, dict):
        raise FrameError("malformed", f"{what} is not a JSON object")
    return fields


def _name(fields: dict[str, Any], key: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= NAME_CHARS_MAX:
        raise FrameError("malformed", f"{key} must be a member name")
    return value


def _nonce(fields: dict[str, Any]) -> bytes:
    value = fields.get("nonce")
    try:
        nonce = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        nonce = b""
    if len(nonce) != NONCE_BYTES:
        raise FrameError("malformed", f"nonce must be {NONCE_BYTES} bytes in hex")
    return nonce


# ---------------------------------------------------------------- frames


class Sealer:
    """The sending end of one connection."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.seq = 0  # of the last frame sealed

    def seal(self, body: bytes) -> bytes:
        self.seq += 1
        seq = self.seq.to_bytes(SEQ_BYTES, "big")
        return seq + hmac.new(self._key, seq + body, hashlib.sha256).digest() + body


class Opener:
    """The receiving end of one connection: frames in order, each once."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.seq = 0  # of the last frame accepted

    def open(self, frame: bytes) -> bytes:
        """The body of `frame`, or FrameError; a refused frame does not advance seq."""
        if len(frame) < HEADER_BYTES:
            raise FrameError("malformed", f"frame of {len(frame)} bytes is shorter than its header")
        if len(frame) > MAX_FRAME_BYTES:
            raise FrameError("too_large", f"frame exceeds {MAX_FRAME_BYTES} bytes")
        seq, tag, body = frame[:SEQ_BYTES], frame[SEQ_BYTES:HEADER_BYTES], frame[HEADER_BYTES:]
        if not hmac.compare_digest(tag, hmac.new(self._key, seq + body, hashlib.sha256).digest()):
            raise FrameError("unauthenticated", "bad frame signature")
        number = int.from_bytes(seq, "big")
        if number != self.seq + 1:
            raise FrameError("replayed", f"frame {number} where {self.seq + 1} was due")
        self.seq = number
        return body
