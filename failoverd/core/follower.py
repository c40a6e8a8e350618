"""A follower's side: taking heartbeats (promise, cluster state, leader
knowledge), acknowledging them with our WAL position, a leader's hand-over
(TimeoutNow), and keeping the local PostgreSQL in line with the leader
(docs/design.md §5 "Step-down and fencing")."""

from __future__ import annotations

from failoverd.core import actions as act
from failoverd.core import candidacy
from failoverd.core import events as ev
from failoverd.core.context import FENCE_RETRY_S, Context, InvariantViolation
from failoverd.core.messages import Heartbeat, HeartbeatAck, TimeoutNow
from failoverd.core.state import PgRole, Role


def on_heartbeat(ctx: Context, m: Heartbeat, now: float) -> None:
    if m.term < ctx.term:
        ctx.send(m.sender, HeartbeatAck(**ctx.envelope(), seq=m.seq, success=False, reason="stale term"))
        return
    if m.term == ctx.term and ctx.role is Role.LEADER:
        raise InvariantViolation(f"two leaders in term {m.term}: {ctx.name} and {m.sender}")
    if m.term > ctx.term or ctx.role is not Role.FOLLOWER:
        ctx.become_follower(m.term, now, reason=f"heartbeat from {m.sender}")
    if ctx.leader != m.sender:
        ctx.leader = m.sender
        ctx.leader_since = now
        ctx.released_by = None
        ctx.emit(ev.LeaderKnown, leader=m.sender)
        if ctx.me.is_data:
            ctx.out.append(act.ProbeNow())
    ctx.leader_heard_at = now
    ctx.promise_s = ctx.promise_asked(m.promise_s)
    if "promise-max" in ctx.disabled:
        ctx.promise_until = now + ctx.promise_s  # wrong on purpose: a shorter promise cuts one already made
    elif "lease" not in ctx.disabled:
        # A running maximum: a shorter promise never shortens one already
        # made, on which an earlier heartbeat's lease may rest (§6).
        ctx.promise_until = max(ctx.promise_until, now + ctx.promise_s)
    ctx.election_deadline = now + ctx.random_timeout()
    ctx.leader_primary_ready = m.primary_ready
    if m.primary_position is not None:
        ctx.last_primary_position = m.primary_position
        if not m.primary_ready:
            ctx.handover = (m.term, m.primary_position)
    if m.state.stamp > ctx.state.stamp:
        ctx.state = m.state
        ctx.persist()
    if m.state.stamp == ctx.state.stamp and m.commit_version > ctx.commit_version:
        ctx.commit_version = min(m.commit_version, ctx.state.stamp.version)
    acknowledge(ctx, m.sender, m.seq)
    if ctx.running_switchover_target():
        # Probe at once, and report the result at once (report_position):
        # the leader hands over as soon as it sees we have all its WAL.
        ctx.out.append(act.ProbeNow())


def acknowledge(ctx: Context, leader: str, seq: int) -> None:
    pg = ctx.pg
    position = None if pg is None else pg.position
    fresh = ctx.position_fresh()
    ctx.last_heartbeat = (ctx.term, leader, seq)
    ctx.reported = (position, fresh)
    ctx.send(
        leader,
        HeartbeatAck(
            **ctx.envelope(),
            seq=seq,
            success=True,
            accepted=ctx.state.stamp,
            position=position,
            position_fresh=fresh,
            holds_nothing=fresh and ctx.holds_nothing(),
            pg_healthy=pg is not None and pg.running,
            following_leader=pg is not None and pg.role is PgRole.STANDBY and pg.following == leader,
            promised_s=ctx.promise_s,
        ),
    )


def report_position(ctx: Context) -> None:
    """Acknowledge the last heartbeat again, right after a probe, when the
    leader is waiting for what it shows: our first position probed since we
    heard this leader (a new leader needs D - k of them before it promotes),
    or, as the target of a running switchover, how far we have caught up.
    Otherwise the news would wait for the next heartbeat. The repeated ack
    names the same heartbeat (seq) and the state we already acknowledged,
    so it extends no lease and commits nothing the first ack did not."""
    last = ctx.last_heartbeat
    if last is None or last[0] != ctx.term or last[1] != ctx.leader or not ctx.me.is_data:
        return
    pg = ctx.pg
    now_reported = (None if pg is None else pg.position, ctx.position_fresh())
    newly_fresh = now_reported[1] and not (ctx.reported is not None and ctx.reported[1])
    if newly_fresh or (ctx.running_switchover_target() and now_reported != ctx.reported):
        acknowledge(ctx, last[1], last[2])


def on_timeout_now(ctx: Context, m: TimeoutNow, now: float) -> None:
    if m.term != ctx.term or m.sender != ctx.leader or ctx.role is not Role.FOLLOWER:
        return
    ctx.released_by = m.sender
    if not candidacy.may_campaign(ctx, now, transfer=True):
        ctx.emit(ev.TransferDeclined, leader=m.sender)
        return
    candidacy.stand(ctx, now, transfer_from=m.sender)


def keep_local_postgres_in_line(ctx: Context, now: float) -> None:
    """Outside leadership our PostgreSQL must never be a primary; follow the leader otherwise."""
    pg = ctx.pg
    if pg is None or ctx.role is Role.LEADER:
        return
    if pg.role is PgRole.PRIMARY:
        if ctx.fence_requested_at is None or now - ctx.fence_requested_at >= FENCE_RETRY_S:
            ctx.fence(now, "primary without leadership")
        return
    if ctx.watchdog_armed and pg.role in (PgRole.STOPPED, PgRole.STANDBY, PgRole.ABSENT):
        ctx.watchdog_armed = False
        ctx.out.append(act.ArmWatchdog(None))
    if ctx.role is not Role.FOLLOWER or ctx.leader is None or not ctx.leader_primary_ready:
        if pg.role is PgRole.STOPPED and not ctx.watchdog_armed and now >= ctx.start_standby_after:
            ctx.request_once(now, "start_standby", act.StartStandby())
        return
    if pg.role is PgRole.STANDBY and pg.following == ctx.leader:
        return
    if pg.role is PgRole.UNRESPONSIVE or ctx.watchdog_armed:
        return
    if ctx.request_once(now, f"follow {ctx.leader} {ctx.term}", act.Follow(ctx.leader, ctx.term)):
        ctx.emit(ev.FollowRequested, leader=ctx.leader, pg_role=pg.role.value)
