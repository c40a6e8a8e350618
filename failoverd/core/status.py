"""What one member reports about itself (the REST API, `failoverctl`,
sd_notify's STATUS line): a read-only snapshot the core builds, so that
liveness and every other judgement come from the same place as the
protocol's decisions."""

from __future__ import annotations

import dataclasses

from failoverd.core.state import HistoryEntry, PgObservation, PgRole, Position, Role, StateStamp


@dataclasses.dataclass(frozen=True, slots=True)
class RebuildStatus:
    """The last rebuild of this member's standby an operator asked for (reinit).
    Wall-clock times, for display only."""

    leader: str
    started_at: float | None
    running: bool = True
    finished_at: float | None = None
    error: str | None = None  # None while running or when it succeeded


@dataclasses.dataclass(frozen=True, slots=True)
class FailoverRecord:
    """The last promotion here that replaced another primary (not the bootstrap).
    `outage_s` runs from the last heartbeat this member heard from the
    previous leader to its own PostgreSQL seen writable (None when it heard
    none); `wall_time` labels when (display only)."""

    term: int
    reason: str
    outage_s: float | None
    wall_time: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class MemberStatus:
    name: str
    role: Role
    term: int
    leader: str | None
    leader_live: bool  # the leader is us, or was heard within election_timeout_max
    pg: PgObservation | None
    pg_age_s: float | None  # how old the PostgreSQL observation is
    lease_remaining_s: float | None  # a leader's lease left (None: not leading or never had one)
    promise_s: float  # the promise of the last heartbeat made or taken (docs/design.md §6)
    primary_ready: bool  # we lead and have seen our PostgreSQL writable
    vip_held: bool
    vip_error: str | None  # why the last acquisition of the VIP failed, while we should hold it
    paused: bool
    # The primary's WAL position as last known here: our own on a primary-ready
    # leader, else the one the live leader's heartbeats carry.
    primary_position: Position | None
    switchover_to: str | None
    switchover_at: float | None
    state_stamp: StateStamp
    history: tuple[HistoryEntry, ...]
    rebuild: RebuildStatus | None
    last_failover: FailoverRecord | None
    restarting: bool = False  # an operator's restart of our standby runs
    sync_count: int = 0  # k of the replicated state: commits wait for this many standbys
    # Leader only: followers heard within election_timeout_min whose PostgreSQL
    # streams from us (None elsewhere). Below sync_count, commits wait.
    streaming_standbys: int | None = None

    @property
    def writable(self) -> bool:
        """A leader holding a valid lease whose PostgreSQL it has seen writable."""
        return (
            self.role is Role.LEADER
            and self.primary_ready
            and (self.lease_remaining_s or 0.0) > 0.0
            and self.pg is not None
            and self.pg.role is PgRole.PRIMARY
        )

    @property
    def streaming_standby(self) -> bool:
        pg = self.pg
        return (
            self.role is not Role.LEADER and pg is not None and pg.role is PgRole.STANDBY and pg.following is not None
        )
