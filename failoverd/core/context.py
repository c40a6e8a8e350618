"""What one member knows and keeps whatever its role, the actions it is
collecting for its caller, and the two transitions every role can take
(`become_follower`, `step_down`).

The role modules (follower, voting, candidacy, leader, admin) are functions
of a `Context`; `failoverd.core.node.Node` owns the context and routes each
input to them. Nothing here does I/O or reads a clock: `now` is always the
caller's local monotonic time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from failoverd.core import actions as act
from failoverd.core import events as ev
from failoverd.core import follow
from failoverd.core.messages import Message, TimeoutNow
from failoverd.core.roles import Candidacy, Leadership
from failoverd.core.spec import ClusterSpec, ReplicationMode
from failoverd.core.state import ClusterState, PersistentState, PgObservation, PgRole, Position, Role
from failoverd.core.status import FailoverRecord, RebuildStatus

# The safety mechanisms the simulator may switch off one at a time, to show
# it catches what each prevents (failoverd simulate --disable-safeguard).
SAFEGUARDS = frozenset({"lease", "promise-max", "lsn-check", "persist-vote", follow.SAFEGUARD})
PG_ACTION_RETRY_S = 5.0
FENCE_RETRY_S = 1.0
VIP_RETRY_S = 2.0  # a failed acquisition of the VIP is tried again this often while we should hold it


class Rng(Protocol):
    """The only randomness the core uses: the caller passes a seeded source
    (random.Random in the daemon and the simulator)."""

    def random(self) -> float: ...


class InvariantViolation(AssertionError):
    """The core found its own state impossible; a bug, never a peer's fault."""


def standing(position: Position | None, priority: int, name: str) -> tuple[bool, Position, int, str]:
    """How strongly a member may stand, the same for choosing a hand-over's
    successor and for settling simultaneous pre-votes: more WAL, then higher
    priority, then the later name (a total order: of two, exactly one is
    stronger)."""
    return (position is not None, position or Position(1, 0), priority, name)


class Context:
    def __init__(
        self, spec: ClusterSpec, name: str, persisted: PersistentState, now: float, rng: Rng, disabled: Iterable[str]
    ) -> None:
        if not spec.has_member(name):
            raise ValueError(f"{name!r} is not a member of cluster {spec.name!r}")
        disabled = frozenset(disabled)
        if disabled - SAFEGUARDS:
            raise ValueError(f"unknown safeguard(s) {sorted(disabled - SAFEGUARDS)}")
        self.spec = spec
        self.name = name
        self.me = spec.member(name)
        self.rng = rng
        self.disabled = disabled
        self.timing = spec.timing
        self.others = tuple(m.name for m in spec.members if m.name != name)
        self.voters = tuple(m.name for m in spec.members)
        self.data_voters = tuple(m.name for m in spec.data_members)

        # Persistent: term, vote and the replicated cluster state.
        self.term = persisted.term
        self.voted_for = persisted.voted_for
        self.state = persisted.state
        if self.state.stamp.version == 0:
            initial_k = spec.replication.sync_count if spec.replication.mode is ReplicationMode.QUORUM else 0
            self.state = ClusterState(sync_count=initial_k)
        self.commit_version = persisted.commit_version
        self.held_data = persisted.held_data
        self.durable = persisted  # what a crash would leave us with

        # The role, and the state only that role has.
        self.role = Role.FOLLOWER
        self.candidacy: Candidacy | None = None
        self.lead: Leadership | None = None

        # The leader as we know it.
        self.leader: str | None = None
        self.leader_since = 0.0  # when we first heard the current leader in this term
        self.leader_heard_at: float | None = None  # its last heartbeat (liveness, the failover figure)
        self.leader_primary_ready = False
        self.last_primary_position: Position | None = None
        # The leader that handed over to a successor while we followed it
        # (we saw its TimeoutNow or its successor's VoteRequest). It fenced
        # itself first, so our promise to it no longer binds a vote for
        # another candidate of the same handover; the next leader we hear
        # ends this.
        self.released_by: str | None = None
        # The last heartbeat we acknowledged, (term, leader, seq), and the
        # (position, position_fresh) that ack reported: a later probe may be
        # worth reporting before the next heartbeat (follower.report_position).
        self.last_heartbeat: tuple[int, str, int] | None = None
        self.reported: tuple[Position | None, bool] | None = None
        # (term, position): the leader of that term stopped its PostgreSQL for
        # a switchover and its WAL ends at position (voting.follow_successor_early).
        self.handover: tuple[int, Position] | None = None
        self.cascade_requested: tuple[str, int] | None = None  # (candidate, term) we Follow early
        self.start_standby_after = 0.0  # no StartStandby before this (after handing over a switchover)

        # Timers. A restarted node may have promised a leader, before it
        # crashed, not to vote until up to election_timeout_min after that; it
        # keeps that promise.
        self.promise_until = now + self.timing.election_timeout_min_s
        # The promise of the last heartbeat we took (or made, as leader):
        # our election timeout scales with it (docs/design.md §6).
        self.promise_s = self.timing.election_timeout_min_s
        self.election_deadline = now + self.random_timeout()
        # (asked at, term, transfer_from): we stand once a probe that started
        # after `asked at` shows our position (candidacy.stand).
        self.stand_after_probe: tuple[float, int, str | None] | None = None
        self.probed_ahead_for: float | None = None  # the election deadline a probe was asked ahead of

        # The local PostgreSQL and the VIP.
        self.pg: PgObservation | None = None
        self.pg_unresponsive_since: float | None = None
        self.pg_stalled_since: float | None = None  # every probe since then: UNRESPONSIVE and stalled
        self.watchdog_armed = False
        self.vip_held = False
        self.vip_error: str | None = None  # why the address could not be added, while we should hold it
        self.vip_retry_at: float | None = None
        self.fence_requested_at: float | None = None
        self.pg_action_requested: tuple[str, float] | None = None

        self.rebuild: RebuildStatus | None = None  # an operator's reinit of our standby
        self.restarting = False  # an operator's restart of our standby runs
        self.last_failover: FailoverRecord | None = None

        self.wall_time: float | None = None  # labels history entries and status only
        self.out: list[act.Action] = []

    # ------------------------------------------------------------- outputs

    def emit(self, event: type[ev.Event], **fields: Any) -> None:
        self.out.append(act.Emit(event(node=self.name, term=self.term, **fields)))

    def send(self, to: str, msg: Message) -> None:
        self.out.append(act.Send(to, msg))

    def envelope(self) -> dict[str, Any]:
        return {"cluster": self.spec.name, "sender": self.name, "term": self.term}

    def persistent_state(self) -> PersistentState:
        return PersistentState(self.term, self.voted_for, self.state, self.commit_version, self.held_data)

    def persist(self) -> None:
        current = self.persistent_state()
        if "persist-vote" in self.disabled:
            # Safeguard test only: term and vote never reach the disk.
            current = PersistentState(
                self.durable.term, self.durable.voted_for, self.state, self.commit_version, self.held_data
            )
        self.durable = current
        self.out.append(act.Persist(current))

    def flush(self) -> list[act.Action]:
        out, self.out = self.out, []
        return out

    def release_vip(self, reason: str) -> None:
        if self.vip_held:
            self.vip_held = False
            self.vip_error = self.vip_retry_at = None
            self.out.append(act.ReleaseVip(reason))
            self.emit(ev.VipReleased, reason=reason)

    def reply(self, request_id: int, code: act.ReplyCode, message: str, redirect: str | None = None) -> None:
        self.out.append(act.Reply(request_id, code, message, redirect))

    def fence(self, now: float, reason: str) -> None:
        self.release_vip(reason)
        self.fence_requested_at = now
        self.out.append(act.Fence(reason))
        self.emit(ev.FenceRequested, reason=reason)

    def request_once(self, now: float, key: str, action: act.Action) -> bool:
        """Emit a slow PostgreSQL action unless the same one was asked for recently."""
        last = self.pg_action_requested
        if last is not None and last[0] == key and now - last[1] < PG_ACTION_RETRY_S:
            return False
        self.pg_action_requested = (key, now)
        self.out.append(action)
        return True

    # ------------------------------------------------------------- queries

    def leading(self) -> Leadership:
        lead = self.lead
        if self.role is not Role.LEADER or lead is None:
            raise InvariantViolation(f"{self.name} acts as leader in role {self.role.value}")
        return lead

    def leader_live(self, now: float) -> bool:
        """We lead, or heard the leader we know within election_timeout_max."""
        if self.leader is None:
            return False
        if self.role is Role.LEADER:
            return True
        heard = self.leader_heard_at
        return heard is not None and now - heard < self.timing.election_timeout_max_s

    def my_position(self) -> Position | None:
        return None if self.pg is None else self.pg.position

    def data_votes_needed(self) -> int:
        if "lsn-check" in self.disabled:
            return 0
        return self.spec.data_votes_needed(self.state.sync_count)

    def lags_beyond_limit(self, position: Position | None) -> bool:
        ref = self.last_primary_position
        if ref is None:
            return False
        if position is None or position.timeline < ref.timeline:
            return True
        return position.timeline == ref.timeline and position.lsn + self.spec.replication.max_lag_bytes < ref.lsn

    def random_timeout(self) -> float:
        """Election timeout for the last promise, biased so higher-priority
        members tend to campaign first."""
        candidates = sorted((m for m in self.spec.data_members if m.can_lead), key=lambda m: (-m.priority, m.name))
        rank = next((i for i, m in enumerate(candidates) if m.name == self.name), len(candidates))
        spread = (rank / max(1, len(candidates))) * 0.5 + self.rng.random() * 0.5
        return self.timing.election_timeout_for(self.promise_s, spread)

    def promise_asked(self, promise_s: float) -> float:
        """The promise we make for a heartbeat asking for `promise_s` (0: an
        older leader, which asks for none): within our own range, so that a
        restart (which refuses votes for election_timeout_min_s) covers it."""
        t = self.timing
        if promise_s == 0:
            return t.election_timeout_min_s
        return min(t.election_timeout_min_s, max(t.promise_floor_s, promise_s))

    def claim(self, name: str, position: Position | None) -> tuple[bool, Position, int, str]:
        return standing(position, self.spec.member(name).priority, name)

    def holds_nothing(self) -> bool:
        """Our data directory is empty and never held data: we acknowledged
        no commit, so no candidate can lack one of ours."""
        return self.pg is not None and self.pg.role is PgRole.ABSENT and not self.held_data

    def position_fresh(self) -> bool:
        """A position counts for the leader's WAL check only if it was probed
        after we heard this leader, and is known (or the directory is empty)."""
        pg = self.pg
        return (
            pg is not None
            and pg.observed_at >= self.leader_since
            and (pg.position is not None or pg.role is PgRole.ABSENT)
        )

    def running_switchover_target(self) -> bool:
        """We are the target of a switchover the leader is carrying out now
        (its PostgreSQL is stopping or stopped; a scheduled one is not running yet)."""
        s = self.state
        return (
            self.role is Role.FOLLOWER
            and self.me.is_data
            and self.leader is not None
            and s.switchover_to == self.name
            and s.switchover_at is None
            and not self.leader_primary_ready
        )

    # --------------------------------------------------------- transitions

    def become_follower(self, term: int, now: float, reason: str) -> None:
        was = self.role
        if was is Role.LEADER:
            self.step_down(now, reason)
        if term > self.term:
            self.term = term
            self.voted_for = None
            self.persist()
        self.role = Role.FOLLOWER
        self.candidacy = None
        self.leader = None
        self.leader_primary_ready = False
        self.election_deadline = max(self.election_deadline, now + self.random_timeout())
        if was is not Role.FOLLOWER:
            self.emit(ev.RoleChanged, role="follower", previous=was.value, reason=reason)

    def step_down(self, now: float, reason: str, transfer_to: str | None = None) -> None:
        """Leave leadership: fence first (VIP, then PostgreSQL), then tell the successor."""
        lead = self.lead
        self.lead = None
        self.role = Role.FOLLOWER
        self.leader = None
        self.leader_primary_ready = False
        pg_may_write = (lead is not None and (lead.promote_requested_at is not None or lead.primary_ready)) or (
            self.pg is not None and self.pg.role is PgRole.PRIMARY
        )
        if pg_may_write or self.vip_held:
            self.fence(now, reason)
        if self.watchdog_armed and "lease" not in self.disabled:
            self.out.append(act.ArmWatchdog(now))  # expire now: the watchdog backs the fence up
        self.election_deadline = max(now, self.promise_until) + self.random_timeout()
        self.emit(ev.RoleChanged, role="follower", previous="leader", reason=reason, transfer_to=transfer_to)
        if lead is not None and lead.pending is not None:
            self.reply(
                lead.pending.request_id,
                act.ReplyCode.UNAVAILABLE,
                f"{self.name} lost the leadership ({reason}) before the switchover started; retry",
            )
        if transfer_to is not None:
            self.send(transfer_to, TimeoutNow(**self.envelope()))
            if lead is not None and lead.transfer is not None and lead.transfer.stopped_seen:
                # Our server stopped cleanly for this switchover: leave it
                # stopped a moment, so that it restarts once, streaming from the
                # successor (voting.follow_successor_early), not twice.
                self.start_standby_after = now + self.timing.election_timeout_min_s
