"""Peer messages: frozen dataclasses that validate themselves, and their wire form.

Two error classes, as in h11: `ProtocolError` means a peer sent something we
cannot accept (the adapter answers 400 and counts it); `ValueError`/`TypeError`
raised while *building* a message means our own code misused the API.
`decode_message` is the one boundary where peer input enters, so it converts
every problem with a peer's bytes into `ProtocolError` and never lets a
half-checked value through.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from failoverd.core.state import ClusterState, Position, StateStamp, describe

MAX_MESSAGE_BYTES = 64 * 1024
MAX_TERM = 2**62
MAX_SEQ = 2**62
MAX_SECONDS = 3600.0


class ProtocolError(Exception):
    """A peer's message is malformed, oversized or not for this cluster."""


def _check_int(name: str, value: Any, low: int = 0, high: int = MAX_TERM) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: {describe(value)} is not an integer")
    if not low <= value <= high:
        raise ValueError(f"{name}: {describe(value)} is not within {low}..{high}")


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: {describe(value)} is not a number")
    if not 0 <= value <= MAX_SECONDS:  # also refuses NaN
        raise ValueError(f"{name}: {describe(value)} is not within 0..{MAX_SECONDS} s")


def _check_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= 63:
        raise ValueError(f"{name}: {describe(value)} is not a member name")


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """Fields every message carries: which cluster, who sent it, in which term."""

    cluster: str
    sender: str
    term: int

    def __post_init__(self) -> None:
        _check_name("cluster", self.cluster)
        _check_name("sender", self.sender)
        _check_int("term", self.term)


@dataclasses.dataclass(frozen=True, slots=True)
class PreVoteRequest(Envelope):
    """Would you vote for me in `term` (my current term + 1)? Changes nothing on the voter."""

    TYPE: ClassVar[str] = "pre_vote"
    position: Position | None = None
    stamp: StateStamp = StateStamp(0, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class PreVoteResponse(Envelope):
    TYPE: ClassVar[str] = "pre_vote_response"
    granted: bool = False
    vouches_wal: bool = False  # a data voter whose own WAL position is not ahead of the candidate's
    reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class VoteRequest(Envelope):
    TYPE: ClassVar[str] = "vote"
    position: Position | None = None
    stamp: StateStamp = StateStamp(0, 0)
    # Set when the leader of term-1 handed over leadership (TimeoutNow) after
    # fencing itself; voters that follow that leader then waive their lease promise.
    transfer_from: str | None = None
    # An operator's failover with allow_data_loss: voters waive the WAL check
    # (never the lease promise). Only reachable through the authenticated admin API.
    waive_wal_check: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class VoteResponse(Envelope):
    TYPE: ClassVar[str] = "vote_response"
    granted: bool = False
    vouches_wal: bool = False
    reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat(Envelope):
    """Leader -> follower: renews the follower's promise and carries the cluster state."""

    TYPE: ClassVar[str] = "heartbeat"
    seq: int = 0
    state: ClusterState = ClusterState()
    commit_version: int = 0
    primary_ready: bool = False  # the leader's PostgreSQL is promoted and writable
    primary_position: Position | None = None  # leader's WAL position when it is primary
    # How long the follower promises not to vote (docs/design.md §6); 0: its
    # own election_timeout_min_s (a leader of an older version sends none).
    promise_s: float = 0.0

    def __post_init__(self) -> None:
        Envelope.__post_init__(self)
        _check_int("seq", self.seq, 0, MAX_SEQ)
        _check_int("commit_version", self.commit_version)
        _check_seconds("promise_s", self.promise_s)


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatAck(Envelope):
    TYPE: ClassVar[str] = "heartbeat_ack"
    seq: int = 0
    success: bool = False
    accepted: StateStamp = StateStamp(0, 0)
    position: Position | None = None
    # True when `position` was probed after this follower first heard from the
    # current leader, so it cannot move on because of an older primary.
    position_fresh: bool = False
    # position None because the data directory is empty and never held data:
    # this member acknowledged nothing, so it confirms any leader's WAL.
    holds_nothing: bool = False
    pg_healthy: bool = False
    following_leader: bool = False
    reason: str = ""
    # The promise this follower made for the heartbeat; 0: a member of an
    # older version, which promised its election_timeout_min_s.
    promised_s: float = 0.0

    def __post_init__(self) -> None:
        Envelope.__post_init__(self)
        _check_int("seq", self.seq, 0, MAX_SEQ)
        _check_seconds("promised_s", self.promised_s)


@dataclasses.dataclass(frozen=True, slots=True)
class TimeoutNow(Envelope):
    """Leader -> chosen successor: I have fenced myself; campaign now."""

    TYPE: ClassVar[str] = "timeout_now"


Message = PreVoteRequest | PreVoteResponse | VoteRequest | VoteResponse | Heartbeat | HeartbeatAck | TimeoutNow
MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (PreVoteRequest, PreVoteResponse, VoteRequest, VoteResponse, Heartbeat, HeartbeatAck, TimeoutNow)
}


def encode_message(msg: Message) -> dict[str, Any]:
    """The JSON-ready form of a message. A field still at its default is left
    out (the envelope never is): a member of an older version, which refuses
    fields it does not know, understands a newer one until a new feature is
    in use."""
    out: dict[str, Any] = {"type": msg.TYPE}
    for field in dataclasses.fields(msg):
        value = getattr(msg, field.name)
        if field.name not in ("cluster", "sender", "term") and value == field.default:
            continue
        if isinstance(value, (Position, StateStamp, ClusterState)):
            value = value.to_wire()
        out[field.name] = value
    return out


def encode_message_bytes(msg: Message) -> bytes:
    return json.dumps(encode_message(msg), separators=(",", ":"), sort_keys=True).encode()


def decode_message_bytes(body: bytes) -> Message:
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # also over-long integer literals
        raise ProtocolError(f"message is not JSON: {str(exc)[:200]}") from None
    return decode_message(data)


_BOOL_FIELDS = {
    "granted",
    "vouches_wal",
    "success",
    "position_fresh",
    "pg_healthy",
    "following_leader",
    "primary_ready",
    "waive_wal_check",
    "holds_nothing",
}
_STR_FIELDS = {"reason"}
_NAME_OR_NONE_FIELDS = {"transfer_from"}


def decode_message(data: Any) -> Message:
    """Build a message from its JSON form; every defect raises ProtocolError."""
    if not isinstance(data, dict):
        raise ProtocolError("message is not a JSON object")
    kind = data.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {describe(kind)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names - {"type"}
    if unknown:
        shown = sorted(describe(k) for k in unknown)[:5]
        raise ProtocolError(f"{kind}: unknown field(s) {', '.join(shown)}")
    missing = {"cluster", "sender", "term"} - set(data)
    if missing:
        raise ProtocolError(f"{kind}: missing field(s) {sorted(missing)}")
    kwargs: dict[str, Any] = {}
    try:
        for name in names & set(data):
            kwargs[name] = _decode_field(name, data[name])
        message: Message = cls(**kwargs)
        return message
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError, RecursionError) as exc:
        raise ProtocolError(f"{kind}: {str(exc)[:200]}") from None


def _decode_field(name: str, value: Any) -> Any:
    if name in ("position", "primary_position"):
        return None if value is None else Position.from_wire(value)
    if name in ("stamp", "accepted"):
        return StateStamp.from_wire(value)
    if name == "state":
        return ClusterState.from_wire(value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {describe(value)} is not a boolean")
        return value
    if name in _STR_FIELDS:
        if not isinstance(value, str) or len(value) > 500:
            raise TypeError(f"{name}: not a string of at most 500 characters")
        return value
    if name in _NAME_OR_NONE_FIELDS:
        if value is not None:
            _check_name(name, value)
        return value
    return value  # cluster, sender, term, seq, commit_version: checked by __post_init__
