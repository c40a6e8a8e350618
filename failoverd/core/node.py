"""The protocol state machine of one supervisor. Pure: no I/O, no clock, no
global randomness. The caller feeds `tick`, `receive`, `observe` and `request`
with its own monotonic time and carries out the returned actions in order
(see `failoverd.core.actions` for the contract and docs/design.md for the
protocol and its safety argument).

Roles decide behaviour: a follower answers heartbeats and votes and may time
out into a pre-vote; a candidate collects votes; a leader heartbeats, holds a
lease, promotes once it is safe and fences itself the moment it is not.
Leader-only logic lives in `failoverd.core.leader`, voting in
`failoverd.core.voting`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

from failoverd.core import actions as act
from failoverd.core import follow
from failoverd.core.leader import LeaderMixin, LeaderState
from failoverd.core.messages import (
    Heartbeat,
    HeartbeatAck,
    Message,
    PreVoteRequest,
    PreVoteResponse,
    ProtocolError,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from failoverd.core.requests import AdminRequest, Failover
from failoverd.core.spec import ClusterSpec, ReplicationMode, Timing
from failoverd.core.state import ClusterState, PersistentState, PgObservation, PgRole, Position, Role
from failoverd.core.voting import VotingMixin

SAFEGUARDS = frozenset({"lease", "lsn-check", "persist-vote", follow.SAFEGUARD})
PG_ACTION_RETRY_S = 5.0
FENCE_RETRY_S = 1.0


class Rng(Protocol):
    """The only randomness the core uses: the caller passes a seeded source
    (random.Random in the daemon and the simulator)."""

    def random(self) -> float: ...


class InvariantViolation(AssertionError):
    """The core found its own state impossible; a bug, never a peer's fault."""


class Node(LeaderMixin, VotingMixin):
    def __init__(
        self,
        spec: ClusterSpec,
        name: str,
        persisted: PersistentState,
        now: float,
        rng: Rng,
        disabled_safeguards: Iterable[str] = (),
    ) -> None:
        if not spec.has_member(name):
            raise ValueError(f"{name!r} is not a member of cluster {spec.name!r}")
        disabled = frozenset(disabled_safeguards)
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

        self.term = persisted.term
        self.voted_for = persisted.voted_for
        self.state = persisted.state
        if self.state.stamp.version == 0:
            initial_k = spec.replication.sync_count if spec.replication.mode is ReplicationMode.QUORUM else 0
            self.state = ClusterState(sync_count=initial_k)
        self.commit_version = persisted.commit_version
        self._durable = persisted  # what a crash would leave us with

        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self.leader_since = 0.0  # when we first heard the current leader in this term
        self.leader_primary_ready = False
        self.last_primary_position: Position | None = None
        # A restarted node may have promised a leader, before it crashed, not to
        # vote until up to election_timeout_min after that; it keeps that promise.
        self.promise_until = now + self.timing.election_timeout_min_s
        self.election_deadline = now + self._random_timeout()
        self.pg: PgObservation | None = None
        self.pg_unresponsive_since: float | None = None
        self.watchdog_armed = False
        self.vip_held = False
        self.fence_requested_at: float | None = None
        self.pg_action_requested: tuple[str, float] | None = None
        self.grants: dict[str, bool] = {}
        self.vouchers: set[str] = set()
        self.transfer_from: str | None = None
        # The leader that handed over to a successor while we followed it
        # (we saw its TimeoutNow or its successor's VoteRequest). It fenced
        # itself first, so our promise to it no longer binds a vote for
        # another candidate of the same handover; the next leader we hear
        # ends this.
        self.released_by: str | None = None
        # Set while campaigning on an operator's Failover (and kept into the
        # leadership it wins): the history reason, and whether voters were
        # asked to waive the WAL check.
        self.operator_failover: Failover | None = None
        self.lead: LeaderState | None = None
        # The last heartbeat we acknowledged, (term, leader, seq), and the
        # (position, position_fresh) that ack reported: a later probe may be
        # worth reporting before the next heartbeat (_report_position).
        self.last_heartbeat: tuple[int, str, int] | None = None
        self.reported: tuple[Position | None, bool] | None = None
        # (term, position): the leader of that term stopped its PostgreSQL for
        # a switchover and its WAL ends at position (_follow_successor_early).
        self.handover: tuple[int, Position] | None = None
        self.cascade_requested: tuple[str, int] | None = None  # (candidate, term) we Follow early
        self.start_standby_after = 0.0  # no StartStandby before this (after handing over a switchover)
        self.wall_time: float | None = None
        self.out: list[act.Action] = []

    # ----------------------------------------------------------------- inputs

    def tick(self, now: float, wall_time: float | None = None) -> list[act.Action]:
        """Advance timers. `wall_time` only labels history entries."""
        if wall_time is not None:
            self.wall_time = wall_time
        if self.role is Role.LEADER:
            self._leader_tick(now)
        elif now >= self.election_deadline:
            if self.role in (Role.PRE_CANDIDATE, Role.CANDIDATE):
                self._emit("election_timed_out", role=self.role.value)
                self.role = Role.FOLLOWER
                self.operator_failover = None
            if self._may_campaign(now):
                self._start_pre_vote(now)
            else:
                self.election_deadline = now + self._random_timeout()
        self._keep_local_postgres_in_line(now)
        return self._flush()

    def receive(self, msg: Message, now: float) -> list[act.Action]:
        """Handle a decoded peer message. Raises ProtocolError, changing nothing, if it is not for us."""
        self._check_envelope(msg)
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(msg, now)
        elif isinstance(msg, HeartbeatAck):
            self._on_heartbeat_ack(msg, now)
        elif isinstance(msg, PreVoteRequest):
            self._on_pre_vote_request(msg, now)
        elif isinstance(msg, VoteRequest):
            self._on_vote_request(msg, now)
        elif isinstance(msg, (PreVoteResponse, VoteResponse)):
            self._on_vote_response(msg, now)
        elif isinstance(msg, TimeoutNow):
            self._on_timeout_now(msg, now)
        else:
            raise ProtocolError(f"unexpected message {type(msg).__name__}")
        self._keep_local_postgres_in_line(now)
        return self._flush()

    def observe(self, pg: PgObservation, now: float) -> list[act.Action]:
        """Record a probe of the local PostgreSQL (data members only)."""
        if not self.me.is_data:
            raise ValueError("a witness has no PostgreSQL to observe")
        if self.pg is not None and pg.observed_at < self.pg.observed_at:
            return self._flush()  # an older probe finished late; keep the newer one
        self.pg = pg
        if pg.role is PgRole.UNRESPONSIVE:
            if self.pg_unresponsive_since is None:
                self.pg_unresponsive_since = pg.observed_at
        else:
            self.pg_unresponsive_since = None
        if self.role is Role.LEADER:
            self._leader_observe(now)
        elif self.role is Role.FOLLOWER:
            self._report_position()
        self._keep_local_postgres_in_line(now)
        return self._flush()

    def request(self, req: AdminRequest, now: float) -> list[act.Action]:
        if self.role is Role.LEADER:
            self._leader_request(req, now)
        elif isinstance(req, Failover) and req.target == self.name:
            self._operator_failover(req, now)
        else:
            self.out.append(act.Reply(req.request_id, False, f"{self.name} is not the leader (leader: {self.leader})"))
        return self._flush()

    def promotion_failed(self, term: int, reason: str, now: float) -> list[act.Action]:
        """The supervisor could not carry out our `Promote` (the pre_promote
        hook vetoed it, or the promotion command failed): give up leadership
        now instead of waiting out promote_timeout, so another member can try."""
        lead = self.lead
        if (self.role is Role.LEADER and self.term == term and lead.promote_requested_at is not None
                and not lead.primary_ready):
            self._emit("promotion_failed", reason=reason)
            self._step_down(now, f"promotion failed: {reason}", transfer_to=self._best_successor(now))
        return self._flush()

    def shutdown(self, now: float) -> list[act.Action]:
        """The supervisor is stopping: a leader fences and hands over to its best follower."""
        if self.role is Role.LEADER:
            self._step_down(now, "supervisor shutting down", transfer_to=self._best_successor(now))
        return self._flush()

    def next_wakeup(self) -> float:
        """The latest local time by which `tick` must be called again."""
        if self.role is Role.LEADER and self.lead is not None:
            return self._leader_next_wakeup()
        return self.election_deadline

    def retime(self, timing: Timing) -> None:
        """Adopt reloaded timing; `failoverd.runtime.reload` decides whether it is
        safe while other members still run the old one."""
        self.spec = dataclasses.replace(self.spec, timing=timing)
        self.timing = timing

    def persistent_state(self) -> PersistentState:
        return PersistentState(self.term, self.voted_for, self.state, self.commit_version)

    # ------------------------------------------------------------ follower side

    def _on_heartbeat(self, m: Heartbeat, now: float) -> None:
        if m.term < self.term:
            self._send(m.sender, HeartbeatAck(**self._env(), seq=m.seq, success=False, reason="stale term"))
            return
        if m.term == self.term and self.role is Role.LEADER:
            raise InvariantViolation(f"two leaders in term {m.term}: {self.name} and {m.sender}")
        if m.term > self.term or self.role is not Role.FOLLOWER:
            self._become_follower(m.term, now, reason=f"heartbeat from {m.sender}")
        if self.leader != m.sender:
            self.leader = m.sender
            self.leader_since = now
            self.released_by = None
            self._emit("leader_known", leader=m.sender)
            if self.me.is_data:
                self.out.append(act.ProbeNow())
        if "lease" not in self.disabled:
            self.promise_until = max(self.promise_until, now + self.timing.election_timeout_min_s)
        self.election_deadline = now + self._random_timeout()
        self.leader_primary_ready = m.primary_ready
        if m.primary_position is not None:
            self.last_primary_position = m.primary_position
            if not m.primary_ready:
                self.handover = (m.term, m.primary_position)
        if m.state.stamp > self.state.stamp:
            self.state = m.state
            self._persist()
        if m.state.stamp == self.state.stamp and m.commit_version > self.commit_version:
            self.commit_version = min(m.commit_version, self.state.stamp.version)
        self._acknowledge(m.sender, m.seq)
        if self._running_switchover_target():
            # Probe at once, and report the result at once (_report_position):
            # the leader hands over as soon as it sees we have all its WAL.
            self.out.append(act.ProbeNow())

    def _acknowledge(self, leader: str, seq: int) -> None:
        pg = self.pg
        position = None if pg is None else pg.position
        fresh = self._position_fresh()
        self.last_heartbeat = (self.term, leader, seq)
        self.reported = (position, fresh)
        self._send(
            leader,
            HeartbeatAck(
                **self._env(),
                seq=seq,
                success=True,
                accepted=self.state.stamp,
                position=position,
                position_fresh=fresh,
                pg_healthy=pg is not None and pg.running,
                following_leader=pg is not None and pg.role is PgRole.STANDBY and pg.following == leader,
            ),
        )

    def _position_fresh(self) -> bool:
        """A position counts for the leader's WAL check only if it was probed
        after we heard this leader, and is known (or the directory is empty)."""
        pg = self.pg
        return (
            pg is not None
            and pg.observed_at >= self.leader_since
            and (pg.position is not None or pg.role is PgRole.ABSENT)
        )

    def _running_switchover_target(self) -> bool:
        """We are the target of a switchover the leader is carrying out now
        (its PostgreSQL is stopping or stopped; a scheduled one is not running yet)."""
        s = self.state
        return (self.role is Role.FOLLOWER and self.me.is_data and self.leader is not None
                and s.switchover_to == self.name and s.switchover_at is None and not self.leader_primary_ready)

    def _report_position(self) -> None:
        """Acknowledge the last heartbeat again, right after a probe, when the
        leader is waiting for what it shows: our first position probed since we
        heard this leader (a new leader needs D - k of them before it promotes),
        or, as the target of a running switchover, how far we have caught up.
        Otherwise the news would wait for the next heartbeat. The repeated ack
        names the same heartbeat (seq) and the state we already acknowledged,
        so it extends no lease and commits nothing the first ack did not."""
        last = self.last_heartbeat
        if last is None or last[0] != self.term or last[1] != self.leader or not self.me.is_data:
            return
        pg = self.pg
        now_reported = (None if pg is None else pg.position, self._position_fresh())
        newly_fresh = now_reported[1] and not (self.reported is not None and self.reported[1])
        if newly_fresh or (self._running_switchover_target() and now_reported != self.reported):
            self._acknowledge(last[1], last[2])

    def _on_timeout_now(self, m: TimeoutNow, now: float) -> None:
        if m.term != self.term or m.sender != self.leader or self.role is not Role.FOLLOWER:
            return
        self.released_by = m.sender
        if not self._may_campaign(now, transfer=True):
            self._emit("transfer_declined", leader=m.sender)
            return
        self._start_election(now, transfer_from=m.sender)

    def _keep_local_postgres_in_line(self, now: float) -> None:
        """Outside leadership our PostgreSQL must never be a primary; follow the leader otherwise."""
        pg = self.pg
        if pg is None or self.role is Role.LEADER:
            return
        if pg.role is PgRole.PRIMARY:
            if self.fence_requested_at is None or now - self.fence_requested_at >= FENCE_RETRY_S:
                self._fence(now, "primary without leadership")
            return
        if self.watchdog_armed and pg.role in (PgRole.STOPPED, PgRole.STANDBY, PgRole.ABSENT):
            self.watchdog_armed = False
            self.out.append(act.ArmWatchdog(None))
        if self.role is not Role.FOLLOWER or self.leader is None or not self.leader_primary_ready:
            if pg.role is PgRole.STOPPED and not self.watchdog_armed and now >= self.start_standby_after:
                self._request_once(now, "start_standby", act.StartStandby())
            return
        if pg.role is PgRole.STANDBY and pg.following == self.leader:
            return
        if pg.role is PgRole.UNRESPONSIVE or self.watchdog_armed:
            return
        if self._request_once(now, f"follow {self.leader} {self.term}", act.Follow(self.leader, self.term)):
            self._emit("follow", leader=self.leader, pg_role=pg.role.value)

    def _request_once(self, now: float, key: str, action: act.Action) -> bool:
        """Emit a slow PostgreSQL action unless the same one was asked for recently."""
        last = self.pg_action_requested
        if last is not None and last[0] == key and now - last[1] < PG_ACTION_RETRY_S:
            return False
        self.pg_action_requested = (key, now)
        self.out.append(action)
        return True

    def _operator_failover(self, req: Failover, now: float) -> None:
        """The operator names us to take over and no leader is alive: campaign
        now, skipping the pre-vote and, while paused, the pause. The lease
        promise still holds here and on every voter, so a leader that is in
        fact alive keeps its term and its lease."""
        def refuse(why: str) -> None:
            self.out.append(act.Reply(req.request_id, False, why))

        if not self.me.can_lead:
            return refuse(f"{self.name} may not become primary (witness or nofailover)")
        if now < self.promise_until and "lease" not in self.disabled:
            # Heartbeats renew this promise, so a leader heard within
            # election_timeout_min is alive as far as we know.
            wait = self.promise_until - now
            if self.leader is not None:
                return refuse(f"{self.leader} was heard {self.timing.election_timeout_min_s - wait:.1f} s ago "
                              f"and may hold a lease: send the failover to the leader, or retry in {wait:.1f} s")
            return refuse(f"a leader's lease may still be valid; retry in {wait:.1f} s")
        pg = self.pg
        if pg is None or now - pg.observed_at > self.timing.election_timeout_max_s:
            return refuse(f"{self.name} has no recent probe of its PostgreSQL")
        if pg.role is not PgRole.STANDBY:
            return refuse(f"{self.name}'s PostgreSQL is {pg.role.value}, not a standby")
        self.operator_failover = req
        self._emit("operator_failover", allow_data_loss=req.allow_data_loss)
        self._start_election(now, transfer_from=None)
        self.out.append(act.Reply(req.request_id, True, f"{self.name} is campaigning for term {self.term}"))

    # ---------------------------------------------------------------- helpers

    def _become_follower(self, term: int, now: float, reason: str) -> None:
        was = self.role
        if was is Role.LEADER:
            self._step_down(now, reason)
        if term > self.term:
            self.term = term
            self.voted_for = None
            self._persist(vote=True)
        self.role = Role.FOLLOWER
        self.leader = None
        self.leader_primary_ready = False
        self.operator_failover = None
        self.election_deadline = max(self.election_deadline, now + self._random_timeout())
        if was is not Role.FOLLOWER:
            self._emit("role_changed", role="follower", previous=was.value, reason=reason)

    def _fence(self, now: float, reason: str) -> None:
        if self.vip_held:
            self.vip_held = False
            self.out.append(act.ReleaseVip(reason))
            self._emit("vip_released", reason=reason)
        self.fence_requested_at = now
        self.out.append(act.Fence(reason))
        self._emit("fence", reason=reason)

    def _my_position(self) -> Position | None:
        return None if self.pg is None else self.pg.position

    def _data_votes_needed(self) -> int:
        if "lsn-check" in self.disabled:
            return 0
        return self.spec.data_votes_needed(self.state.sync_count)

    def _lags_beyond_limit(self, position: Position | None) -> bool:
        ref = self.last_primary_position
        if ref is None:
            return False
        if position is None or position.timeline < ref.timeline:
            return True
        return position.timeline == ref.timeline and position.lsn + self.spec.replication.max_lag_bytes < ref.lsn

    def _random_timeout(self) -> float:
        """Election timeout, biased so higher-priority members tend to campaign first."""
        t = self.timing
        candidates = sorted((m for m in self.spec.data_members if m.can_lead), key=lambda m: (-m.priority, m.name))
        rank = next((i for i, m in enumerate(candidates) if m.name == self.name), len(candidates))
        spread = (rank / max(1, len(candidates))) * 0.5 + self.rng.random() * 0.5
        return t.election_timeout_min_s + spread * (t.election_timeout_max_s - t.election_timeout_min_s)

    def _check_envelope(self, msg: Message) -> None:
        if msg.cluster != self.spec.name:
            raise ProtocolError(f"message for cluster {msg.cluster!r}, this is {self.spec.name!r}")
        if msg.sender == self.name or not self.spec.has_member(msg.sender):
            raise ProtocolError(f"sender {msg.sender!r} is not another member of this cluster")

    def _env(self) -> dict:
        return {"cluster": self.spec.name, "sender": self.name, "term": self.term}

    def _send(self, to: str, msg: Message) -> None:
        self.out.append(act.Send(to, msg))

    def _persist(self, vote: bool = False) -> None:
        current = self.persistent_state()
        if "persist-vote" in self.disabled:
            # Safeguard test only: term and vote never reach the disk.
            current = PersistentState(self._durable.term, self._durable.voted_for, self.state, self.commit_version)
        self._durable = current
        self.out.append(act.Persist(current))

    def _emit(self, event: str, **fields) -> None:
        base = (("node", self.name), ("term", self.term))
        self.out.append(act.Emit(event, base + tuple(fields.items())))

    def _flush(self) -> list[act.Action]:
        out, self.out = self.out, []
        return out
