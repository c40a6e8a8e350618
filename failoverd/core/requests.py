"""Admin requests the core accepts (from the REST API or failoverctl).

Most go to the leader; a non-leader answers "not the leader". The exception is
`Failover` when no leader is alive: the operator sends it to the member that
should take over, which then campaigns even while the cluster is paused.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Switchover:
    """Planned handover of the primary role.

    `target` None lets the leader pick the best standby. `at` (seconds since
    the epoch) schedules it: the schedule is kept in the replicated state, so
    it survives a change of leader; None or a time already past means now.
    """

    request_id: int
    target: str | None = None
    at: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class CancelSwitchover:
    """Drop a scheduled switchover (one already running cannot be cancelled)."""

    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Failover:
    """Operator-chosen failover to `target`.

    With a live leader it is a switchover to `target` that is allowed while
    paused and does not insist on a small lag (the handover still waits for the
    target to receive every WAL record). Without a live leader the target
    campaigns at once, pause or not. `allow_data_loss` lets its voters waive
    the WAL check: the new primary may miss acknowledged commits.
    """

    request_id: int
    target: str
    allow_data_loss: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Pause:
    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Resume:
    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class RecordEvent:
    """Append an operator note (e.g. a drill's result) to the replicated history."""

    request_id: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Reinit:
    """Rebuild `member`'s standby from the primary (a fresh clone; the old data
    directory is kept aside). Only that member carries it out."""

    request_id: int
    member: str


@dataclasses.dataclass(frozen=True, slots=True)
class Restart:
    """Restart `member`'s standby (fast stop, start as it was), so that
    settings pending a restart take effect. Only that member carries it out;
    a primary is restarted through a switchover (failoverctl restart --rolling)."""

    request_id: int
    member: str


AdminRequest = Switchover | CancelSwitchover | Failover | Pause | Resume | RecordEvent | Reinit | Restart
