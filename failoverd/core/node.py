"""The protocol state machine of one supervisor. Pure: no I/O, no clock, no
global randomness. The caller feeds `tick`, `receive`, `observe` and `request`
with its own monotonic time and carries out the returned actions in order
(see `failoverd.core.actions` for the contract and docs/design.md for the
protocol and its safety argument).

The role decides what an input does: a follower answers heartbeats and votes
and may time out into a pre-vote (failoverd.core.follower, voting,
candidacy); a leader heartbeats, holds a lease, promotes once it is safe and
fences itself the moment it is not (leader, heartbeats, switchover). What a
member knows whatever its role is its `Context`; the state of one role
lives in that role's record (failoverd.core.roles).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from failoverd.core import actions as act
from failoverd.core import admin, candidacy, follower, heartbeats, leader, probing, voting
from failoverd.core.context import SAFEGUARDS, Context, InvariantViolation, Rng
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
from failoverd.core.requests import AdminRequest
from failoverd.core.roles import Leadership
from failoverd.core.spec import ClusterSpec, Member, Timing
from failoverd.core.state import ClusterState, PersistentState, PgObservation, PgRole, Role
from failoverd.core.status import MemberStatus

__all__ = ["SAFEGUARDS", "InvariantViolation", "Node", "Role"]


class Node:
    def __init__(
        self,
        spec: ClusterSpec,
        name: str,
        persisted: PersistentState,
        now: float,
        rng: Rng,
        disabled_safeguards: Iterable[str] = (),
    ) -> None:
        self.ctx = Context(spec, name, persisted, now, rng, disabled_safeguards)

    # ----------------------------------------------------------------- inputs

    def tick(self, now: float, wall_time: float | None = None) -> list[act.Action]:
        """Advance timers. `wall_time` only labels history entries."""
        ctx = self.ctx
        if wall_time is not None:
            ctx.wall_time = wall_time
        if ctx.role is Role.LEADER:
            leader.tick(ctx, now)
        elif now >= ctx.election_deadline:
            candidacy.timed_out(ctx, now)
        else:
            candidacy.probe_ahead(ctx, now)
        follower.keep_local_postgres_in_line(ctx, now)
        return ctx.flush()

    def label_wall_time(self, wall_time: float) -> None:
        """The wall time from the next input on: it labels history entries
        and status, and tells when a switchover scheduled for a wall time is
        due; every other timer runs on the monotonic `now`."""
        self.ctx.wall_time = wall_time

    def receive(self, msg: Message, now: float) -> list[act.Action]:
        """Handle a decoded peer message. Raises ProtocolError, changing nothing, if it is not for us."""
        ctx = self.ctx
        self._check_envelope(msg)
        if isinstance(msg, Heartbeat):
            follower.on_heartbeat(ctx, msg, now)
        elif isinstance(msg, HeartbeatAck):
            leader.on_heartbeat_ack(ctx, msg, now)
        elif isinstance(msg, PreVoteRequest):
            voting.on_pre_vote_request(ctx, msg, now)
        elif isinstance(msg, VoteRequest):
            voting.on_vote_request(ctx, msg, now)
        elif isinstance(msg, (PreVoteResponse, VoteResponse)):
            candidacy.on_vote_response(ctx, msg, now)
        elif isinstance(msg, TimeoutNow):
            follower.on_timeout_now(ctx, msg, now)
        else:
            raise ProtocolError(f"unexpected message {type(msg).__name__}")
        follower.keep_local_postgres_in_line(ctx, now)
        return ctx.flush()

    def observe(self, pg: PgObservation, now: float) -> list[act.Action]:
        """Record a probe of the local PostgreSQL (data members only)."""
        ctx = self.ctx
        if not ctx.me.is_data:
            raise ValueError("a witness has no PostgreSQL to observe")
        if ctx.pg is not None and pg.observed_at < ctx.pg.observed_at:
            return ctx.flush()  # an older probe finished late; keep the newer one
        ctx.pg = pg
        if pg.role is not PgRole.ABSENT and not ctx.held_data:
            ctx.held_data = True
            ctx.persist()
        if pg.role is PgRole.UNRESPONSIVE:
            if ctx.pg_unresponsive_since is None:
                ctx.pg_unresponsive_since = pg.observed_at
        else:
            ctx.pg_unresponsive_since = None
        if pg.role is PgRole.UNRESPONSIVE and pg.stalled:
            if ctx.pg_stalled_since is None:
                ctx.pg_stalled_since = pg.observed_at
        else:
            ctx.pg_stalled_since = None
        if ctx.role is Role.LEADER:
            leader.observe(ctx, now)
        elif ctx.role is Role.FOLLOWER:
            follower.report_position(ctx)
            candidacy.on_probe(ctx, now)
        follower.keep_local_postgres_in_line(ctx, now)
        return ctx.flush()

    def request(self, req: AdminRequest, now: float) -> list[act.Action]:
        admin.request(self.ctx, req, now)
        return self.ctx.flush()

    def promotion_failed(self, term: int, reason: str, now: float) -> list[act.Action]:
        """The supervisor could not carry out our `Promote`: see leader.promotion_failed."""
        leader.promotion_failed(self.ctx, term, reason, now)
        return self.ctx.flush()

    def checkpoint_done(self, error: str | None, now: float) -> list[act.Action]:
        """Our `Checkpoint` finished (error None) or failed."""
        leader.checkpoint_done(self.ctx, error, now)
        return self.ctx.flush()

    def rebuild_done(self, error: str | None, now: float) -> list[act.Action]:
        """Our `Rebuild` finished (error None), failed, or was dropped by a fence."""
        admin.rebuild_done(self.ctx, error)
        return self.ctx.flush()

    def restart_done(self, error: str | None, now: float) -> list[act.Action]:
        """Our `RestartServer` finished (error None), failed, or was dropped by a fence."""
        admin.restart_done(self.ctx, error)
        return self.ctx.flush()

    def vip_result(self, term: int, error: str | None, now: float) -> list[act.Action]:
        """How an `AcquireVip` of `term` ended in the background (error None: the address is ours)."""
        leader.vip_result(self.ctx, term, error, now)
        return self.ctx.flush()

    def status(self, now: float) -> MemberStatus:
        """This member as the API reports it; liveness judged here, not by the caller."""
        ctx = self.ctx
        lead = ctx.lead
        leading = ctx.role is Role.LEADER and lead is not None
        live = ctx.leader_live(now)
        primary_position = None
        if leading and lead is not None and lead.primary_ready and ctx.pg is not None:
            primary_position = ctx.pg.position
        elif live and ctx.leader_primary_ready:
            primary_position = ctx.last_primary_position
        return MemberStatus(
            name=ctx.name,
            role=ctx.role,
            term=ctx.term,
            leader=ctx.leader,
            leader_live=live,
            pg=ctx.pg,
            pg_age_s=None if ctx.pg is None else max(0.0, now - ctx.pg.observed_at),
            lease_remaining_s=None if lead is None or not lead.lease_ever else max(0.0, lead.lease_until - now),
            promise_s=ctx.promise_s,
            primary_ready=bool(lead is not None and lead.primary_ready),
            vip_held=ctx.vip_held,
            vip_error=ctx.vip_error,
            paused=ctx.state.paused,
            primary_position=primary_position,
            switchover_to=ctx.state.switchover_to,
            switchover_at=ctx.state.switchover_at,
            state_stamp=ctx.state.stamp,
            history=ctx.state.history,
            rebuild=ctx.rebuild,
            last_failover=ctx.last_failover,
            restarting=ctx.restarting,
            sync_count=ctx.state.sync_count,
            streaming_standbys=None if lead is None else self._streaming_standbys(lead, now),
        )

    def _streaming_standbys(self, lead: Leadership, now: float) -> int:
        limit = self.ctx.timing.election_timeout_min_s
        return sum(1 for v in lead.followers.values() if v.following and v.pg_healthy and now - v.heard_at <= limit)

    def shutdown(self, now: float) -> list[act.Action]:
        """The supervisor is stopping: a leader fences and hands over to its best follower."""
        ctx = self.ctx
        if ctx.role is Role.LEADER:
            ctx.step_down(now, "supervisor shutting down", transfer_to=heartbeats.best_successor(ctx, now))
        return ctx.flush()

    def next_wakeup(self) -> float:
        """The latest local time by which `tick` must be called again."""
        ctx = self.ctx
        if ctx.role is Role.LEADER and ctx.lead is not None:
            return leader.next_wakeup(ctx)
        ahead = candidacy.probe_ahead_at(ctx)
        return ctx.election_deadline if ahead is None else min(ahead, ctx.election_deadline)

    def probe_interval(self) -> float:
        """Seconds from the end of one probe of the local PostgreSQL to the next."""
        return probing.probe_interval(self.ctx)

    def retime(self, timing: Timing) -> None:
        """Adopt reloaded timing; `failoverd.runtime.reload` decides whether it is
        safe while other members still run the old one."""
        ctx = self.ctx
        ctx.spec = dataclasses.replace(ctx.spec, timing=timing)
        ctx.timing = timing
        if ctx.lead is not None:
            ctx.lead.promise.restart(timing)

    def persistent_state(self) -> PersistentState:
        return self.ctx.persistent_state()

    # ---------------------------------------------------------------- views

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def me(self) -> Member:
        return self.ctx.me

    @property
    def spec(self) -> ClusterSpec:
        return self.ctx.spec

    @property
    def timing(self) -> Timing:
        return self.ctx.timing

    @property
    def role(self) -> Role:
        return self.ctx.role

    @property
    def term(self) -> int:
        return self.ctx.term

    @property
    def voted_for(self) -> str | None:
        return self.ctx.voted_for

    @property
    def state(self) -> ClusterState:
        return self.ctx.state

    @property
    def leader(self) -> str | None:
        return self.ctx.leader

    @property
    def leader_primary_ready(self) -> bool:
        return self.ctx.leader_primary_ready

    @property
    def lead(self) -> Leadership | None:
        return self.ctx.lead

    @property
    def pg(self) -> PgObservation | None:
        return self.ctx.pg

    @property
    def watchdog_armed(self) -> bool:
        return self.ctx.watchdog_armed

    @property
    def vip_held(self) -> bool:
        return self.ctx.vip_held

    # ---------------------------------------------------------------- helpers

    def _check_envelope(self, msg: Message) -> None:
        ctx = self.ctx
        if msg.cluster != ctx.spec.name:
            raise ProtocolError(f"message for cluster {msg.cluster!r}, this is {ctx.spec.name!r}")
        if msg.sender == ctx.name or not ctx.spec.has_member(msg.sender):
            raise ProtocolError(f"sender {msg.sender!r} is not another member of this cluster")
