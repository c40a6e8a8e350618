"""Values the core reasons about: WAL positions, the replicated cluster state,
what each node persists, and what it observed of its own PostgreSQL.

All are immutable and check themselves; `from_wire` constructors are used on
peer input and on the state file, so they reject anything odd with
ValueError/TypeError (turned into ProtocolError or a start-up error by callers).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

MAX_LSN = 2**64 - 1
MAX_TIMELINE = 2**32 - 1
MAX_HISTORY = 50


def describe(value: Any) -> str:
    """A short description of a value that came from a peer or a file.

    Never `repr()` such a value whole: it may be 64 KiB of text for a log line,
    a huge integer, or nested deeply enough to exhaust the stack.
    """
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value) if -(10**30) < value < 10**30 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return f"a {type(value).__name__}"


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: {describe(value)} is not an integer")
    if not low <= value <= high:
        raise ValueError(f"{name}: {describe(value)} is not within {low}..{high}")
    return value


def _name_or_none(name: str, value: Any) -> str | None:
    if value is None:
        return None
    return _name(name, value)


def _epoch_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: not a number")
    if not 0 <= value < 1e11:  # also refuses NaN and infinities
        raise ValueError(f"{name}: not a time in seconds since the epoch")


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 63:
        raise ValueError(f"{name}: {describe(value)} is not a member name")
    return value


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Position:
    """How far a PostgreSQL's WAL goes: (timeline, LSN), compared in that order.

    For a primary the LSN is its current write position; for a standby the
    position it has received and flushed; for a stopped server the end of WAL
    recorded by its last checkpoint or found on disk.
    """

    timeline: int
    lsn: int

    def __post_init__(self) -> None:
        _int("timeline", self.timeline, 1, MAX_TIMELINE)
        _int("lsn", self.lsn, 0, MAX_LSN)

    def to_wire(self) -> list[int]:
        return [self.timeline, self.lsn]

    @classmethod
    def from_wire(cls, value: Any) -> Position:
        if not isinstance(value, list) or len(value) != 2:
            raise TypeError(f"position: {describe(value)} is not [timeline, lsn]")
        return cls(value[0], value[1])

    def __str__(self) -> str:
        return f"{self.timeline}/{self.lsn >> 32:X}/{self.lsn & 0xFFFFFFFF:X}"


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class StateStamp:
    """Orders versions of the cluster state: (term of the leader that wrote it, version)."""

    written_term: int
    version: int

    def __post_init__(self) -> None:
        _int("written_term", self.written_term, 0, 2**62)
        _int("version", self.version, 0, 2**62)

    def to_wire(self) -> list[int]:
        return [self.written_term, self.version]

    @classmethod
    def from_wire(cls, value: Any) -> StateStamp:
        if not isinstance(value, list) or len(value) != 2:
            raise TypeError(f"stamp: {describe(value)} is not [written_term, version]")
        return cls(value[0], value[1])


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One leadership change, kept in the replicated state."""

    term: int
    from_node: str | None
    to_node: str
    reason: str
    position: Position | None = None
    wall_time: float | None = None  # seconds since the epoch, for display only

    def __post_init__(self) -> None:
        _int("term", self.term, 0, 2**62)
        _name_or_none("from_node", self.from_node)
        _name("to_node", self.to_node)
        if not isinstance(self.reason, str) or len(self.reason) > 200:
            raise ValueError("reason: not a string of at most 200 characters")
        _epoch_or_none("wall_time", self.wall_time)

    def to_wire(self) -> dict[str, Any]:
        return {
            "term": self.term,
            "from": self.from_node,
            "to": self.to_node,
            "reason": self.reason,
            "position": None if self.position is None else self.position.to_wire(),
            "wall_time": self.wall_time,
        }

    @classmethod
    def from_wire(cls, value: Any) -> HistoryEntry:
        if not isinstance(value, dict) or set(value) != {"term", "from", "to", "reason", "position", "wall_time"}:
            raise TypeError("history entry: wrong shape")
        pos = value["position"]
        return cls(
            term=value["term"],
            from_node=value["from"],
            to_node=value["to"],
            reason=value["reason"],
            position=None if pos is None else Position.from_wire(pos),
            wall_time=value["wall_time"],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterState:
    """The small replicated record every member holds; a leader changes it by
    writing a new version that counts once a majority has persisted it."""

    stamp: StateStamp = StateStamp(0, 0)
    primary: str | None = None
    sync_count: int = 1
    paused: bool = False
    switchover_to: str | None = None  # target of a running (or scheduled) switchover; None = leader picks / none
    history: tuple[HistoryEntry, ...] = ()
    # A scheduled switchover: due at this wall-clock time (seconds since the
    # epoch). Wall time only decides *when* to start a switchover, which is
    # as safe at any moment as an operator's request; no safety rule uses it.
    switchover_at: float | None = None
    # The first leader's initdb finished: it saw its new server writable. Until
    # then members with an empty data directory may stand (the bootstrap);
    # after it, never (an empty directory is a member to clone, not a cluster).
    initialized: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.stamp, StateStamp):
            raise TypeError("stamp: not a StateStamp")
        _name_or_none("primary", self.primary)
        _int("sync_count", self.sync_count, 0, 16)
        if not isinstance(self.paused, bool):
            raise TypeError("paused: not a boolean")
        _name_or_none("switchover_to", self.switchover_to)
        _epoch_or_none("switchover_at", self.switchover_at)
        if not isinstance(self.initialized, bool):
            raise TypeError("initialized: not a boolean")
        if len(self.history) > MAX_HISTORY:
            raise ValueError(f"history: more than {MAX_HISTORY} entries")

    def next_version(self, term: int, **changes: Any) -> ClusterState:
        """A successor written by the leader of `term`."""
        stamp = StateStamp(term, self.stamp.version + 1)
        return dataclasses.replace(self, stamp=stamp, **changes)

    def with_history(self, entry: HistoryEntry) -> tuple[HistoryEntry, ...]:
        return ((*self.history, entry))[-MAX_HISTORY:]

    def to_wire(self) -> dict[str, Any]:
        return {
            "stamp": self.stamp.to_wire(),
            "primary": self.primary,
            "sync_count": self.sync_count,
            "paused": self.paused,
            "switchover_to": self.switchover_to,
            "history": [h.to_wire() for h in self.history],
            "switchover_at": self.switchover_at,
            "initialized": self.initialized,
        }

    @classmethod
    def from_wire(cls, value: Any) -> ClusterState:
        keys = {"stamp", "primary", "sync_count", "paused", "switchover_to", "history"}
        # switchover_at and initialized are optional so that state files written
        # before they existed still load; a cluster that had a primary then was
        # initialised under the rule of that time.
        if not isinstance(value, dict) or set(value) - {"switchover_at", "initialized"} != keys:
            raise TypeError("state: wrong shape")
        history = value["history"]
        if not isinstance(history, list) or len(history) > MAX_HISTORY:
            raise TypeError("state.history: not a list of at most 50 entries")
        return cls(
            stamp=StateStamp.from_wire(value["stamp"]),
            primary=value["primary"],
            sync_count=value["sync_count"],
            paused=value["paused"],
            switchover_to=value["switchover_to"],
            history=tuple(HistoryEntry.from_wire(h) for h in history),
            switchover_at=value.get("switchover_at"),
            initialized=value.get("initialized", value["primary"] is not None),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PersistentState:
    """Everything a node must find again after a crash (see docs/design.md)."""

    term: int = 0
    voted_for: str | None = None
    state: ClusterState = ClusterState()
    commit_version: int = 0
    # This member's PostgreSQL has had a data directory: from then on it may
    # have acknowledged commits, and if its directory is ever empty again
    # (wiped), it vouches for nobody's WAL. A member that never held data
    # acknowledged nothing: it may vouch for any candidate (docs/design.md §7).
    held_data: bool = False

    def __post_init__(self) -> None:
        _int("term", self.term, 0, 2**62)
        _name_or_none("voted_for", self.voted_for)
        if not isinstance(self.state, ClusterState):
            raise TypeError("state: not a ClusterState")
        _int("commit_version", self.commit_version, 0, 2**62)
        if not isinstance(self.held_data, bool):
            raise TypeError("held_data: not a boolean")

    def to_wire(self) -> dict[str, Any]:
        return {
            "term": self.term,
            "voted_for": self.voted_for,
            "state": self.state.to_wire(),
            "commit_version": self.commit_version,
            "held_data": self.held_data,
        }

    @classmethod
    def from_wire(cls, value: Any) -> PersistentState:
        keys = {"term", "voted_for", "state", "commit_version"}
        # A state file from before held_data existed says nothing either way:
        # it is read as "held data", which vouches no more than it did then.
        if not isinstance(value, dict) or set(value) - {"held_data"} != keys:
            raise TypeError("persistent state: wrong shape")
        return cls(
            term=value["term"],
            voted_for=value["voted_for"],
            state=ClusterState.from_wire(value["state"]),
            commit_version=value["commit_version"],
            held_data=value.get("held_data", True),
        )


class Role(enum.Enum):
    """A member's role in the protocol (volatile: a restart begins as follower)."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class PgRole(enum.Enum):
    PRIMARY = "primary"  # running, out of recovery
    STANDBY = "standby"  # running, in recovery
    STOPPED = "stopped"  # definitely not running (no postmaster)
    UNRESPONSIVE = "unresponsive"  # a postmaster exists but the probe failed or timed out
    ABSENT = "absent"  # no data directory yet: bootstrap (initdb) or clone needed


@dataclasses.dataclass(frozen=True, slots=True)
class PgObservation:
    """One probe of the local PostgreSQL.

    `observed_at` is the local monotonic time at which the probe *started*, so
    any WAL acknowledged before that instant is included in `position`.
    """

    role: PgRole
    observed_at: float
    position: Position | None = None
    following: str | None = None  # member this standby streams from, if known
    # UNRESPONSIVE, and no process of the server could run when it was
    # probed (each stopped by a signal or waiting on storage): a hang, not
    # load. A slow server's processes run (or wait for a socket or a lock).
    stalled: bool = False

    @property
    def running(self) -> bool:
        return self.role in (PgRole.PRIMARY, PgRole.STANDBY)
