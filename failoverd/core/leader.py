"""Leader behaviour of `failoverd.core.node.Node`: heartbeats, lease, commit of
the cluster state, the guarded promotion, self-fencing and leadership transfer.

Kept apart from node.py so each file reads on its own; the mixin relies on the
attributes `Node.__init__` sets.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from failoverd.core import actions as act
from failoverd.core.messages import Heartbeat, HeartbeatAck, TimeoutNow
from failoverd.core.quorum import committed_version, quorum_time
from failoverd.core.requests import AdminRequest, CancelSwitchover, Failover, Pause, RecordEvent, Resume, Switchover
from failoverd.core.spec import ReplicationMode
from failoverd.core.state import HistoryEntry, PgRole, Position, Role
from failoverd.core.voting import standing

if TYPE_CHECKING:
    from failoverd.core.node import Node

SENT_SEQ_KEPT = 128


@dataclasses.dataclass(slots=True)
class FollowerView:
    """What the leader last heard from one follower in this term."""

    position: Position | None
    position_fresh: bool
    pg_healthy: bool
    following: bool
    heard_at: float


@dataclasses.dataclass(slots=True)
class Transfer:
    target: str
    started_at: float
    reason: str
    demote_at: float | None = None  # set when our PostgreSQL was asked to stop (switchover)
    stopped_seen: bool = False  # a probe since demote_at showed our PostgreSQL stopped
    final: Position | None = None  # its end of WAL then: everything it ever wrote


@dataclasses.dataclass(slots=True)
class LeaderState:
    elected_at: float
    election_version: int  # the state version written on election; promotion waits for its commit
    seq: int = 0
    next_heartbeat_at: float = 0.0
    sent_at: dict[int, float] = dataclasses.field(default_factory=dict)
    acked_at: dict[str, float] = dataclasses.field(default_factory=dict)
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
    wal_check_waived: bool = False  # won an operator's failover with allow_data_loss


class LeaderMixin:
    # ------------------------------------------------------------ transitions

    def _become_leader(self: Node, now: float) -> None:
        previous = self.state.primary
        failover = self.operator_failover
        self.operator_failover = None
        if failover is not None:
            reason = "operator failover" + (" (data loss allowed)" if failover.allow_data_loss else "")
        else:
            reason = "transfer" if self.transfer_from else ("bootstrap" if previous is None else "election")
        entry = HistoryEntry(
            term=self.term, from_node=previous, to_node=self.name, reason=reason,
            position=self._my_position(), wall_time=self.wall_time,
        )
        # A scheduled switchover stays scheduled across the change of leader.
        keep_to = self.state.switchover_to if self.state.switchover_at is not None else None
        self.state = self.state.next_version(
            self.term, primary=self.name, switchover_to=keep_to, history=self.state.with_history(entry)
        )
        self.role = Role.LEADER
        self.leader = self.name
        self.lead = LeaderState(elected_at=now, election_version=self.state.stamp.version)
        self.lead.wal_check_waived = failover is not None and failover.allow_data_loss
        self.lead.accepted[self.name] = self.state.stamp.version
        self._persist()
        self._emit("role_changed", role="leader", previous="candidate", reason=reason, votes=sorted(v for v, g in self.grants.items() if g))
        if self.me.is_data:
            self.out.append(act.PrepareVip(self.term))
            # Now rather than with the Promote: on a standby it only takes
            # effect at promotion, and the adapter would otherwise set it
            # while our write pause runs (it checks again before promoting).
            self._configure_sync()
        self.out.append(act.ProbeNow())
        self._send_heartbeats(now)

    def _configure_sync(self: Node) -> None:
        standbys = tuple(n for n in self.data_voters if n != self.name)
        self.out.append(act.ConfigureSync(self.state.sync_count, standbys))

    def _step_down(self: Node, now: float, reason: str, transfer_to: str | None = None) -> None:
        """Leave leadership: fence first (VIP, then PostgreSQL), then tell the successor."""
        lead = self.lead
        self.lead = None
        self.role = Role.FOLLOWER
        self.leader = None
        self.leader_primary_ready = False
        pg_may_write = (
            lead is not None and (lead.promote_requested_at is not None or lead.primary_ready)
        ) or (self.pg is not None and self.pg.role is PgRole.PRIMARY)
        if pg_may_write or self.vip_held:
            self._fence(now, reason)
        if self.watchdog_armed and "lease" not in self.disabled:
            self.out.append(act.ArmWatchdog(now))  # expire now: the watchdog backs the fence up
        self.election_deadline = max(now, self.promise_until) + self._random_timeout()
        self._emit("role_changed", role="follower", previous="leader", reason=reason, transfer_to=transfer_to)
        if transfer_to is not None:
            self._send(transfer_to, TimeoutNow(**self._env()))
            if lead is not None and lead.transfer is not None and lead.transfer.stopped_seen:
                # Our server stopped cleanly for this switchover: leave it
                # stopped a moment, so that it restarts once, streaming from the
                # successor (node._follow_successor_early), not twice.
                self.start_standby_after = now + self.timing.election_timeout_min_s

    # ------------------------------------------------------------------ ticks

    def _leader_tick(self: Node, now: float) -> None:
        lead = self.lead
        if now >= lead.next_heartbeat_at:
            self._send_heartbeats(now)
        if self._lease_lost(now):
            self._emit("lease_lost", lease_until=round(lead.lease_until, 3), now=round(now, 3))
            self._step_down(now, "lease lost")
            return
        self._check_pg_health(now)
        if self.lead is None:
            return
        self._advance_transfer(now)
        if self.lead is None:
            return
        self._maybe_start_scheduled_switchover(now)
        self._maybe_promote(now)

    def _leader_next_wakeup(self: Node) -> float:
        lead = self.lead
        wake = lead.next_heartbeat_at
        if lead.lease_ever and "lease" not in self.disabled:
            wake = min(wake, lead.lease_until)
        return wake

    def _lease_lost(self: Node, now: float) -> bool:
        if "lease" in self.disabled:
            return False
        lead = self.lead
        if lead.lease_ever:
            return now >= lead.lease_until
        # A new leader that cannot gather a first quorum of acks gives up.
        return now - lead.elected_at >= self.timing.election_timeout_min_s

    def _send_heartbeats(self: Node, now: float) -> None:
        lead = self.lead
        lead.seq += 1
        lead.sent_at[lead.seq] = now
        lead.sent_at.pop(lead.seq - SENT_SEQ_KEPT, None)
        lead.acked_at[self.name] = now
        lead.next_heartbeat_at = now + self.timing.heartbeat_interval_s
        if "lease" not in self.disabled:
            # Counting ourselves in the lease quorum is a promise too.
            self.promise_until = max(self.promise_until, now + self.timing.election_timeout_min_s)
        pos = self._my_position() if lead.primary_ready else None
        if lead.transfer is not None and lead.transfer.stopped_seen:
            # primary_ready false with a position: our PostgreSQL has stopped
            # for a switchover and this is where its WAL ends (node._on_heartbeat).
            pos = lead.transfer.final
        for peer in self.others:
            self._send(
                peer,
                Heartbeat(
                    **self._env(), seq=lead.seq, state=self.state, commit_version=self.commit_version,
                    primary_ready=lead.primary_ready, primary_position=pos,
                ),
            )
        self._update_lease(now)

    def _on_heartbeat_ack(self: Node, m: HeartbeatAck, now: float) -> None:
        if m.term > self.term:
            self._become_follower(m.term, now, reason=f"{m.sender} is in term {m.term}")
            return
        if self.role is not Role.LEADER or m.term < self.term or not m.success:
            return
        lead = self.lead
        sent = lead.sent_at.get(m.seq)
        if sent is None:
            return  # an ack for a heartbeat we no longer remember: too old to extend anything
        lead.acked_at[m.sender] = max(lead.acked_at.get(m.sender, sent), sent)
        if m.accepted.written_term == self.term:
            lead.accepted[m.sender] = max(lead.accepted.get(m.sender, 0), m.accepted.version)
        lead.followers[m.sender] = FollowerView(m.position, m.position_fresh, m.pg_healthy, m.following_leader, now)
        self._update_lease(now)
        new_commit = committed_version(self.voters, lead.accepted)
        if new_commit > self.commit_version:
            self.commit_version = new_commit
        self._advance_transfer(now)
        if self.lead is not None:
            self._maybe_promote(now)

    def _update_lease(self: Node, now: float) -> None:
        lead = self.lead
        start = quorum_time(self.voters, lead.acked_at)
        if start is None:
            return
        until = start + self.timing.lease_s
        if until > lead.lease_until:
            lead.lease_until = until
            lead.lease_ever = True
            if self.watchdog_armed and "lease" not in self.disabled:
                self.out.append(act.ArmWatchdog(until))

    # -------------------------------------------------------------- promotion

    def _promotion_blocker(self: Node, now: float) -> str | None:
        """Why we may not make our PostgreSQL writable yet (None: we may)."""
        lead = self.lead
        pg = self.pg
        if self.commit_version < lead.election_version:
            return "cluster state of this term not yet committed by a majority"
        if not lead.lease_ever or now >= lead.lease_until:
            return "no lease"
        if lead.transfer is not None:
            return "leadership transfer in progress"
        if pg is None or pg.observed_at < lead.elected_at:
            return "no probe of the local PostgreSQL since the election"
        if pg.role not in (PgRole.STANDBY, PgRole.ABSENT, PgRole.PRIMARY):
            return f"local PostgreSQL is {pg.role.value}"
        if "lsn-check" in self.disabled or lead.wal_check_waived:
            return None
        blocker = self._wal_blocker(pg.position)
        lead.confirm_failed = blocker is not None
        return blocker

    def _wal_blocker(self: Node, mine: Position | None) -> str | None:
        """The quorum-intersection check on positions probed after this leader was known."""
        lead = self.lead
        vouched = 1
        for name in self.data_voters:
            view = lead.followers.get(name)
            if name == self.name or view is None or not view.position_fresh:
                continue
            # A member ahead of us is no evidence either way (a fenced old
            # primary holds WAL nobody acknowledged); it just does not vouch.
            # A fresh empty position (empty data directory) vouches only while
            # we have no WAL either: the bootstrap.
            if view.position is None:
                if mine is None:
                    vouched += 1
            elif mine is not None and view.position <= mine:
                vouched += 1
        needed = self.spec.data_votes_needed(self.state.sync_count)
        if vouched < needed:
            return f"{vouched} of {needed} data members have confirmed our WAL is the longest"
        if self.spec.replication.mode is ReplicationMode.ASYNC and self._lags_beyond_limit(mine):
            return "we lag the last primary by more than max_lag_bytes"
        return None

    def _maybe_promote(self: Node, now: float) -> None:
        lead = self.lead
        if lead.transfer is not None:
            return  # a switchover has demoted us on purpose; _advance_transfer decides
        if lead.primary_ready or lead.promote_requested_at is not None:
            if lead.promote_requested_at is not None and not lead.primary_ready:
                limit = self.timing.bootstrap_timeout_s if lead.bootstrapping else self.timing.promote_timeout_s
                if now - lead.promote_requested_at > limit:
                    self._step_down(now, "promotion timed out")
            return
        blocker = self._promotion_blocker(now)
        if blocker is not None:
            if blocker != lead.blocked_reason:
                lead.blocked_reason = blocker
                self._emit("promotion_waiting", reason=blocker)
            if self.pg is not None and self.pg.role is PgRole.STOPPED:
                self._request_once(now, "start_standby", act.StartStandby())
            if now - lead.elected_at > self.timing.promote_timeout_s and lead.transfer is None:
                self._step_down(now, f"could not promote: {blocker}", transfer_to=self._best_successor(now))
                return
            ahead = self._member_ahead() if lead.confirm_failed else None
            if ahead is not None and self.spec.member(ahead).can_lead:
                self._step_down(now, f"{ahead} has more WAL", transfer_to=ahead)
            return
        if self.pg is not None and self.pg.role is PgRole.PRIMARY:
            self._configure_sync()  # a running primary takes it at once: not long before
        if "lease" not in self.disabled:
            self.watchdog_armed = True
            self.out.append(act.ArmWatchdog(lead.lease_until))
        lead.promote_requested_at = now
        lead.bootstrapping = self.pg is not None and self.pg.role is PgRole.ABSENT
        self.out.append(act.Promote(self.term))
        self._emit("promote", position=str(self._my_position()), lease_remaining_s=round(lead.lease_until - now, 3))
        if self.pg is not None and self.pg.role is PgRole.PRIMARY:
            self._leader_observe(now)

    def _member_ahead(self: Node) -> str | None:
        mine = self._my_position()
        best = None
        for name, view in self.lead.followers.items():
            if view.position_fresh and view.pg_healthy and view.position is not None and (mine is None or view.position > mine):
                if best is None or view.position > self.lead.followers[best].position:
                    best = name
        return best

    def _leader_observe(self: Node, now: float) -> None:
        lead = self.lead
        pg = self.pg
        # Not during a switchover: it made primary_ready false on purpose, and
        # a probe that began before the Demote may still show a primary.
        if (lead.promote_requested_at is not None and not lead.primary_ready and pg.role is PgRole.PRIMARY
                and lead.transfer is None):
            lead.primary_ready = True
            self._emit("promoted", position=str(pg.position))
            self._leader_acquire_vip(now)
            # Followers start following us when a heartbeat says we are
            # writable; in quorum mode our first commits wait for that.
            self._send_heartbeats(now)
        self._check_pg_health(now)
        if self.lead is not None:
            self._advance_transfer(now)
        if self.lead is not None:
            self._maybe_promote(now)

    def _leader_acquire_vip(self: Node, now: float) -> None:
        lead = self.lead
        if lead.primary_ready and not self.vip_held and lead.transfer is None and now < lead.lease_until:
            self.vip_held = True
            self.out.append(act.AcquireVip(self.term))
            self._emit("vip_acquired")

    def _check_pg_health(self: Node, now: float) -> None:
        """Give up leadership when our promoted PostgreSQL has died or hangs."""
        lead = self.lead
        pg = self.pg
        if not lead.primary_ready or lead.transfer is not None or pg is None or self.state.paused:
            return
        if pg.role is PgRole.PRIMARY:
            return
        hung = pg.role is PgRole.UNRESPONSIVE and now - self.pg_unresponsive_since >= self.timing.pg_unresponsive_s
        if pg.role is PgRole.UNRESPONSIVE and not hung:
            return
        target = self._best_successor(now)
        self._step_down(now, f"local PostgreSQL is {pg.role.value}", transfer_to=target)

    def _best_successor(self: Node, now: float) -> str | None:
        best = None
        best_key = None
        for name, view in self.lead.followers.items():
            member = self.spec.member(name)
            if not member.can_lead or not view.pg_healthy:
                continue
            if now - view.heard_at > self.timing.election_timeout_min_s:
                continue
            key = standing(view.position, member.priority, name)
            if best_key is None or key > best_key:
                best, best_key = name, key
        return best

    # ---------------------------------------------------------------- admin

    def _leader_request(self: Node, req: AdminRequest, now: float) -> None:
        def reply(ok: bool, message: str) -> None:
            self.out.append(act.Reply(req.request_id, ok, message))

        if isinstance(req, (Pause, Resume)):
            paused = isinstance(req, Pause)
            if self.state.paused != paused:
                self._commit_state(now, paused=paused)
                self._emit("paused" if paused else "resumed")
            return reply(True, "paused" if paused else "resumed")
        if isinstance(req, Switchover):
            due_now = req.at is None or self.wall_time is None or req.at <= self.wall_time
            if not due_now:
                refusal = self._schedule_refusal(req.target)
                if refusal is not None:
                    return reply(False, refusal)
                self._commit_state(now, switchover_to=req.target, switchover_at=float(req.at))
                self._emit("switchover_scheduled", target=req.target, at=req.at)
                return reply(True, f"switchover to {req.target or 'the best standby'} scheduled")
            if self.state.switchover_at is not None:
                return reply(False, "a switchover is already scheduled; cancel it first")
            refusal = self._switchover_refusal(req.target, now)
            if refusal is not None:
                return reply(False, refusal)
            target = req.target or self._best_successor(now)
            self._begin_switchover(target, now, "switchover")
            return reply(True, f"switchover to {target} started")
        if isinstance(req, CancelSwitchover):
            if self.state.switchover_at is None:
                running = self.lead.transfer
                return reply(False, f"a switchover to {running.target} is running and cannot be cancelled"
                             if running is not None else "no switchover is scheduled")
            self._commit_state(now, switchover_to=None, switchover_at=None)
            self._emit("switchover_cancelled")
            return reply(True, "scheduled switchover cancelled")
        if isinstance(req, Failover):
            if req.target == self.name:
                return reply(False, f"{self.name} is already the leader")
            refusal = self._switchover_refusal(req.target, now, operator_failover=True)
            if refusal is not None:
                return reply(False, refusal)
            self._begin_switchover(req.target, now, "operator failover")
            return reply(True, f"failover to {req.target} started")
        if isinstance(req, RecordEvent):
            if not isinstance(req.reason, str) or not 1 <= len(req.reason) <= 200:
                return reply(False, "a history note is 1 to 200 characters")
            entry = HistoryEntry(term=self.term, from_node=self.name, to_node=self.name, reason=req.reason,
                                 position=self._my_position(), wall_time=self.wall_time)
            self._commit_state(now, history=self.state.with_history(entry))
            return reply(True, "recorded")
        return reply(False, f"unknown request {type(req).__name__}")

    def _commit_state(self: Node, now: float, **changes) -> None:
        """Write a new version of the replicated state and send it at once."""
        self.state = self.state.next_version(self.term, **changes)
        self.lead.accepted[self.name] = self.state.stamp.version
        self._persist()
        self._send_heartbeats(now)

    def _schedule_refusal(self: Node, target: str | None) -> str | None:
        """What can be checked when a switchover is scheduled; health and lag
        are checked again when it is due."""
        if self.state.paused:
            return "the cluster is paused"
        if self.state.switchover_at is not None:
            return "a switchover is already scheduled; cancel it first"
        if target is None:
            return None
        if not self.spec.has_member(target):
            return f"{target} is not a member"
        if target == self.name:
            return f"{target} is already the primary"
        if not self.spec.member(target).can_lead:
            return f"{target} may not become primary (witness or nofailover)"
        return None

    def _maybe_start_scheduled_switchover(self: Node, now: float) -> None:
        due = self.state.switchover_at
        lead = self.lead
        if due is None or self.wall_time is None or self.wall_time < due:
            return
        if lead.transfer is not None or (not lead.primary_ready and now - lead.elected_at < self.timing.promote_timeout_s):
            return  # a new leader first finishes its own promotion
        target = self.state.switchover_to
        refusal = self._switchover_refusal(target, now)
        if refusal is None:
            self._begin_switchover(target or self._best_successor(now), now, "scheduled switchover")
            return
        # Dropped, not retried: a switchover long after the operator's window is a surprise.
        entry = HistoryEntry(term=self.term, from_node=self.name, to_node=self.name,
                             reason=f"scheduled switchover dropped: {refusal}"[:200],
                             position=self._my_position(), wall_time=self.wall_time)
        self._commit_state(now, switchover_to=None, switchover_at=None, history=self.state.with_history(entry))
        self._emit("switchover_dropped", target=target, reason=refusal)

    def _switchover_refusal(self: Node, target: str | None, now: float, operator_failover: bool = False) -> str | None:
        lead = self.lead
        if self.state.paused and not operator_failover:
            return "the cluster is paused"
        if not lead.primary_ready:
            return "this leader's PostgreSQL is not yet a primary"
        if lead.transfer is not None:
            return f"a transfer to {lead.transfer.target} is already in progress"
        if target is None:
            target = self._best_successor(now)
            if target is None:
                return "no healthy standby to switch over to"
        if not self.spec.has_member(target):
            return f"{target} is not a member"
        member = self.spec.member(target)
        if target == self.name:
            return f"{target} is already the primary"
        if not member.can_lead:
            return f"{target} may not become primary (witness or nofailover)"
        view = lead.followers.get(target)
        if view is None or now - view.heard_at > self.timing.election_timeout_min_s:
            return f"{target} has not answered recently"
        if not view.pg_healthy or not view.following:
            return f"{target} is not a healthy standby streaming from {self.name}"
        mine = self._my_position()
        if view.position is None or mine is None or view.position.timeline != mine.timeline:
            return f"{target}'s WAL position is unknown or on another timeline"
        lag = mine.lsn - view.position.lsn
        if lag > self.timing.switchover_max_lag_bytes and not operator_failover:
            return f"{target} lags by {lag} bytes (limit {self.timing.switchover_max_lag_bytes})"
        return None

    def _begin_switchover(self: Node, target: str, now: float, reason: str) -> None:
        lead = self.lead
        lead.transfer = Transfer(target=target, started_at=now, reason=reason, demote_at=now)
        self.state = self.state.next_version(self.term, switchover_to=target, switchover_at=None)
        lead.accepted[self.name] = self.state.stamp.version
        self._persist()
        if self.vip_held:
            self.vip_held = False
            self.out.append(act.ReleaseVip("switchover"))
            self._emit("vip_released", reason="switchover")
        self.out.append(act.Demote("switchover"))
        lead.primary_ready = False
        self._emit("switchover_started", target=target, reason=reason)
        self.out.append(act.ProbeNow())

    def _advance_transfer(self: Node, now: float) -> None:
        lead = self.lead
        transfer = lead.transfer
        if transfer is None:
            return
        if now - transfer.started_at > self.timing.transfer_timeout_s:
            self._emit("switchover_aborted", target=transfer.target)
            self._step_down(now, "switchover timed out")
            return
        pg = self.pg
        if pg is None or pg.role is not PgRole.STOPPED or pg.observed_at < transfer.demote_at:
            return
        if not transfer.stopped_seen:
            transfer.stopped_seen = True
            transfer.final = pg.position
            if pg.position is not None:
                self.handover = (self.term, pg.position)
            # Heartbeat now rather than at the next interval: the target
            # probes on it and reports at once how far it has caught up.
            self._send_heartbeats(now)
        view = lead.followers.get(transfer.target)
        final = pg.position
        if view is None or not view.position_fresh or view.position is None:
            return
        if final is not None and view.position < final:
            return
        self._emit("switchover_caught_up", target=transfer.target, position=str(final))
        self._step_down(now, "switchover", transfer_to=transfer.target)
