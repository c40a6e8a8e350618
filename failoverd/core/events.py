"""What the core reports: one typed event per role change, vote, lease loss,
fence, promotion, demotion, VIP move and the like (`actions.Emit` carries it).

Every event names the member and the term it happened in. The daemon logs it
as one structured line (`NAME` is the event's name, `fields()` its values);
metrics, hooks, the API and the simulator read its fields, never its text.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from failoverd.core.state import Position


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    NAME: ClassVar[str] = "event"

    node: str
    term: int

    def fields(self) -> dict[str, Any]:
        """Every field, the member and the term first, as the log line has them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        """One line for a trace: the name, then every field but the member."""
        parts = [self.NAME]
        for key, value in self.fields().items():
            if key != "node":
                parts.append(f"{key}={_text(value)}")
        return " ".join(parts)


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------- elections


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PreVoteStarted(Event):
    NAME: ClassVar[str] = "pre_vote_started"
    position: Position | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PreVoteYielded(Event):
    """Two pre-candidates of the same term: the weaker claim steps back."""

    NAME: ClassVar[str] = "pre_vote_yielded"
    to: str
    position: Position | None
    other_position: Position | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ElectionStarted(Event):
    NAME: ClassVar[str] = "election_started"
    transfer_from: str | None
    position: Position | None
    waive_wal_check: bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ElectionTimedOut(Event):
    NAME: ClassVar[str] = "election_timed_out"
    role: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ElectionLost(Event):
    NAME: ClassVar[str] = "election_lost"
    pre_vote: bool
    grants: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VoteGranted(Event):
    NAME: ClassVar[str] = "vote_granted"
    candidate: str
    transfer_from: str | None
    waive_wal_check: bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VoteRefused(Event):
    NAME: ClassVar[str] = "vote_refused"
    candidate: str
    candidate_term: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HandoverTakenOver(Event):
    """A member with more WAL than the chosen successor campaigns for the same hand-over."""

    NAME: ClassVar[str] = "handover_taken_over"
    candidate: str
    transfer_from: str | None
    position: Position | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TransferDeclined(Event):
    NAME: ClassVar[str] = "transfer_declined"
    leader: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OperatorFailover(Event):
    NAME: ClassVar[str] = "operator_failover"
    allow_data_loss: bool


# ------------------------------------------------------------------- roles


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RoleChanged(Event):
    """`votes` when elected; `transfer_to` when a leader steps down handing over."""

    NAME: ClassVar[str] = "role_changed"
    role: str
    previous: str
    reason: str
    transfer_to: str | None = None
    votes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LeaderKnown(Event):
    NAME: ClassVar[str] = "leader_known"
    leader: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LeaseLost(Event):
    NAME: ClassVar[str] = "lease_lost"
    lease_until: float
    now: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PromiseChanged(Event):
    """The leader asks for another promise: acknowledgements (or its own
    heartbeats) became slower, or have been quick for a whole window."""

    NAME: ClassVar[str] = "promise_changed"
    promise_s: float
    previous_s: float
    lease_s: float  # what each heartbeat's lease is now
    delay_s: float  # the delay that was just taken in


# ---------------------------------------------------------------- postgres


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PromotionWaiting(Event):
    NAME: ClassVar[str] = "promotion_waiting"
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PromoteRequested(Event):
    NAME: ClassVar[str] = "promote"
    position: Position | None
    lease_remaining_s: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Promoted(Event):
    """Our PostgreSQL was seen writable. `reason` is why we lead (bootstrap,
    election, transfer, operator failover); `outage_s` runs from the last
    heartbeat we heard from the previous leader to now (None when we heard
    none, e.g. after our own restart): the write outage as this member saw it."""

    NAME: ClassVar[str] = "promoted"
    position: Position | None
    reason: str
    outage_s: float | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PromotionFailed(Event):
    NAME: ClassVar[str] = "promotion_failed"
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemoteRequested(Event):
    NAME: ClassVar[str] = "demote"
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FenceRequested(Event):
    NAME: ClassVar[str] = "fence"
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FollowRequested(Event):
    NAME: ClassVar[str] = "follow"
    leader: str
    pg_role: str
    before_promotion: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointRequested(Event):
    NAME: ClassVar[str] = "checkpoint"
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RebuildStarted(Event):
    """An operator's reinit: the standby is rebuilt from `leader`."""

    NAME: ClassVar[str] = "reinit_started"
    leader: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RebuildFinished(Event):
    NAME: ClassVar[str] = "reinit_finished"
    leader: str
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RestartStarted(Event):
    """An operator's restart of this member's standby."""

    NAME: ClassVar[str] = "restart_started"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RestartFinished(Event):
    NAME: ClassVar[str] = "restart_finished"
    error: str | None = None


# --------------------------------------------------------------------- vip


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VipAcquired(Event):
    """We decided to hold the VIP; the address is added in the background
    (`VipAcquireFailed` if that fails)."""

    NAME: ClassVar[str] = "vip_acquired"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VipReleased(Event):
    NAME: ClassVar[str] = "vip_released"
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VipAcquireFailed(Event):
    """The address could not be added (another host answers, a command
    failed; the adapter logged how as `vip_acquire_failed`): tried again in
    `retry_s`, and so on while we should hold it."""

    NAME: ClassVar[str] = "vip_acquire_retry"
    error: str
    retry_s: float


# ------------------------------------------------------------ switchovers


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverScheduled(Event):
    NAME: ClassVar[str] = "switchover_scheduled"
    target: str | None
    at: float | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverStarted(Event):
    NAME: ClassVar[str] = "switchover_started"
    target: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverCaughtUp(Event):
    NAME: ClassVar[str] = "switchover_caught_up"
    target: str
    position: Position | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverAborted(Event):
    NAME: ClassVar[str] = "switchover_aborted"
    target: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverDropped(Event):
    NAME: ClassVar[str] = "switchover_dropped"
    target: str | None
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverCancelled(Event):
    NAME: ClassVar[str] = "switchover_cancelled"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Paused(Event):
    NAME: ClassVar[str] = "paused"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Resumed(Event):
    NAME: ClassVar[str] = "resumed"
