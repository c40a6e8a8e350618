"""The state that belongs to one role only: a candidacy (pre-candidate or
candidate) and a leadership. A member holds at most one of them, and loses
it with the role (docs/design.md §4); what a member knows whatever its role
lives in `failoverd.core.context`.
"""

from __future__ import annotations

import dataclasses

from failoverd.core.promise import PromiseChooser
from failoverd.core.requests import Failover
from failoverd.core.state import Position


@dataclasses.dataclass(slots=True)
class Candidacy:
    """A pre-vote (`pre`) or an election of ours that is being counted."""

    pre: bool
    grants: dict[str, bool]
    vouchers: set[str]
    transfer_from: str | None = None
    # Set while campaigning on an operator's Failover (and kept into the
    # leadership it wins): the history reason, and whether voters were asked
    # to waive the WAL check.
    operator_failover: Failover | None = None

    def granted(self) -> tuple[str, ...]:
        return tuple(sorted(v for v, ok in self.grants.items() if ok))


@dataclasses.dataclass(slots=True)
class FollowerView:
    """What the leader last heard from one follower in this term."""

    position: Position | None
    position_fresh: bool
    holds_nothing: bool  # empty and never held data: confirms any WAL
    pg_healthy: bool
    following: bool
    heard_at: float


@dataclasses.dataclass(slots=True)
class Transfer:
    """A planned switchover this leader is carrying out."""

    target: str
    started_at: float
    reason: str
    demote_at: float | None = None  # set when our PostgreSQL was asked to stop
    stopped_seen: bool = False  # a probe since demote_at showed our PostgreSQL stopped
    final: Position | None = None  # its end of WAL then: everything it ever wrote


@dataclasses.dataclass(slots=True)
class PendingSwitchover:
    """A switchover accepted and waiting for its CHECKPOINT (or for
    CHECKPOINT_WAIT_S) before the demotion; its request is answered then."""

    request_id: int
    target: str
    asked_at: float


@dataclasses.dataclass(slots=True)
class Leadership:
    elected_at: float
    election_version: int  # the state version written on election; promotion waits for its commit
    reason: str  # why we lead: bootstrap, election, transfer, operator failover
    previous_heard_at: float | None  # last heartbeat of the leader before us (for the outage figure)
    promise: PromiseChooser  # what our heartbeats ask followers to promise
    seq: int = 0
    next_heartbeat_at: float = 0.0
    sent_at: dict[int, float] = dataclasses.field(default_factory=dict)
    # Per member, the latest lease end its acknowledgements earned: the send
    # time of a heartbeat plus the lease for the promise it made (§6).
    lease_end_at: dict[str, float] = dataclasses.field(default_factory=dict)
    promised_by: set[str] = dataclasses.field(default_factory=set)  # followers that report their promise
    timed_seq: dict[str, int] = dataclasses.field(default_factory=dict)  # per follower: the last heartbeat timed
    accepted: dict[str, int] = dataclasses.field(default_factory=dict)
    followers: dict[str, FollowerView] = dataclasses.field(default_factory=dict)
    lease_until: float = 0.0
    lease_ever: bool = False
    promote_requested_at: float | None = None
    primary_ready: bool = False
    blocked_reason: str = ""
    confirm_failed: bool = False  # the WAL check itself (not timing) blocks promotion
    bootstrapping: bool = False  # the promotion is an initdb of a new cluster
    transfer: Transfer | None = None
    pending: PendingSwitchover | None = None
    checkpointed_for: float | None = None  # the scheduled switchover (its `at`) we checkpointed ahead of
    wal_check_waived: bool = False  # won an operator's failover with allow_data_loss
