"""A leader's planned handover (docs/design.md §5 "Planned switchover",
"Scheduled switchover"): the checks, the demotion, waiting for the target to
catch up with the stopped primary's last WAL, and the handover itself."""

from __future__ import annotations

from failoverd.core import actions as act
from failoverd.core import events as ev
from failoverd.core import heartbeats
from failoverd.core.context import Context
from failoverd.core.roles import PendingSwitchover, Transfer
from failoverd.core.state import HistoryEntry, PgRole

# How long a switchover waits for its CHECKPOINT before it demotes anyway
# (the shutdown checkpoint then does the work, with writes waiting).
CHECKPOINT_WAIT_S = 30.0
# A scheduled switchover gets its CHECKPOINT this long before it is due.
CHECKPOINT_AHEAD_S = 10.0


def refusal(ctx: Context, target: str | None, now: float, operator_failover: bool = False) -> str | None:
    """Why a switchover to `target` (None: the best standby) cannot start now."""
    lead = ctx.leading()
    if ctx.state.paused and not operator_failover:
        return "the cluster is paused"
    if not lead.primary_ready:
        return "this leader's PostgreSQL is not yet a primary"
    if lead.transfer is not None:
        return f"a transfer to {lead.transfer.target} is already in progress"
    if lead.pending is not None:
        return f"a switchover to {lead.pending.target} is being prepared (checkpoint)"
    if target is None:
        target = heartbeats.best_successor(ctx, now)
        if target is None:
            return "no healthy standby to switch over to"
    if not ctx.spec.has_member(target):
        return f"{target} is not a member"
    member = ctx.spec.member(target)
    if target == ctx.name:
        return f"{target} is already the primary"
    if not member.can_lead:
        return f"{target} may not become primary (witness or nofailover)"
    view = lead.followers.get(target)
    if view is None or now - view.heard_at > ctx.timing.election_timeout_min_s:
        return f"{target} has not answered recently"
    if not view.pg_healthy or not view.following:
        return f"{target} is not a healthy standby streaming from {ctx.name}"
    mine = ctx.my_position()
    if view.position is None or mine is None or view.position.timeline != mine.timeline:
        return f"{target}'s WAL position is unknown or on another timeline"
    lag = mine.lsn - view.position.lsn
    if lag > ctx.timing.switchover_max_lag_bytes and not operator_failover:
        return f"{target} lags by {lag} bytes (limit {ctx.timing.switchover_max_lag_bytes})"
    return None


def schedule_refusal(ctx: Context, target: str | None) -> str | None:
    """What can be checked when a switchover is scheduled; health and lag
    are checked again when it is due."""
    if ctx.state.paused:
        return "the cluster is paused"
    if ctx.state.switchover_at is not None:
        return "a switchover is already scheduled; cancel it first"
    if target is None:
        return None
    if not ctx.spec.has_member(target):
        return f"{target} is not a member"
    if target == ctx.name:
        return f"{target} is already the primary"
    if not ctx.spec.member(target).can_lead:
        return f"{target} may not become primary (witness or nofailover)"
    return None


def prepare(ctx: Context, request_id: int, target: str, now: float) -> None:
    """Accepted: CHECKPOINT first, so that the shutdown checkpoint during
    which writes wait has little left to do; `start_prepared` demotes once it
    is done (checkpoint_done) or after CHECKPOINT_WAIT_S, and answers."""
    lead = ctx.leading()
    lead.pending = PendingSwitchover(request_id, target, now)
    ctx.out.append(act.Checkpoint("switchover"))
    ctx.emit(ev.CheckpointRequested, reason=f"switchover to {target}")


def start_prepared(ctx: Context, now: float) -> None:
    lead = ctx.leading()
    pending, lead.pending = lead.pending, None
    if pending is None:
        return
    why = refusal(ctx, pending.target, now)
    if why is not None:
        ctx.emit(ev.SwitchoverDropped, target=pending.target, reason=why)
        ctx.reply(pending.request_id, act.ReplyCode.CONFLICT, why)
        return
    begin(ctx, pending.target, now, "switchover")
    ctx.reply(pending.request_id, act.ReplyCode.OK, f"switchover to {pending.target} started")


def checkpoint_ahead(ctx: Context, now: float) -> None:
    """CHECKPOINT once, shortly before a scheduled switchover is due."""
    lead = ctx.leading()
    at = ctx.state.switchover_at
    if at is None or ctx.wall_time is None or not lead.primary_ready or lead.checkpointed_for == at:
        return
    if 0 <= at - ctx.wall_time <= CHECKPOINT_AHEAD_S:
        lead.checkpointed_for = at
        ctx.out.append(act.Checkpoint("scheduled switchover"))
        ctx.emit(ev.CheckpointRequested, reason="scheduled switchover")


def begin(ctx: Context, target: str, now: float, reason: str) -> None:
    lead = ctx.leading()
    lead.transfer = Transfer(target=target, started_at=now, reason=reason, demote_at=now)
    ctx.state = ctx.state.next_version(ctx.term, switchover_to=target, switchover_at=None)
    lead.accepted[ctx.name] = ctx.state.stamp.version
    ctx.persist()
    ctx.release_vip("switchover")
    ctx.out.append(act.Demote("switchover"))
    ctx.emit(ev.DemoteRequested, reason=reason)
    lead.primary_ready = False
    ctx.emit(ev.SwitchoverStarted, target=target, reason=reason)
    ctx.out.append(act.ProbeNow())


def maybe_start_scheduled(ctx: Context, now: float) -> None:
    due = ctx.state.switchover_at
    lead = ctx.leading()
    if due is None or ctx.wall_time is None or ctx.wall_time < due:
        return
    if lead.transfer is not None or (not lead.primary_ready and now - lead.elected_at < ctx.timing.promote_timeout_s):
        return  # a new leader first finishes its own promotion
    target = ctx.state.switchover_to
    why = refusal(ctx, target, now)
    if why is None:
        chosen = target or heartbeats.best_successor(ctx, now)
        if chosen is not None:
            begin(ctx, chosen, now, "scheduled switchover")
            return
    # Dropped, not retried: a switchover long after the operator's window is a surprise.
    entry = HistoryEntry(
        term=ctx.term,
        from_node=ctx.name,
        to_node=ctx.name,
        reason=f"scheduled switchover dropped: {why}"[:200],
        position=ctx.my_position(),
        wall_time=ctx.wall_time,
    )
    heartbeats.commit_state(ctx, now, switchover_to=None, switchover_at=None, history=ctx.state.with_history(entry))
    ctx.emit(ev.SwitchoverDropped, target=target, reason=str(why))


def advance(ctx: Context, now: float) -> None:
    """Move a switchover on: start a prepared one whose checkpoint is overdue;
    time out, see the demoted server stop, and hand over once the target
    holds all of its WAL."""
    lead = ctx.leading()
    if lead.pending is not None and now >= lead.pending.asked_at + CHECKPOINT_WAIT_S:
        start_prepared(ctx, now)
    transfer = lead.transfer
    if transfer is None:
        return
    if now - transfer.started_at > ctx.timing.transfer_timeout_s:
        ctx.emit(ev.SwitchoverAborted, target=transfer.target)
        ctx.step_down(now, "switchover timed out")
        return
    pg = ctx.pg
    if pg is None or pg.role is not PgRole.STOPPED or transfer.demote_at is None or pg.observed_at < transfer.demote_at:
        return
    if not transfer.stopped_seen:
        transfer.stopped_seen = True
        transfer.final = pg.position
        if pg.position is not None:
            ctx.handover = (ctx.term, pg.position)
        # Heartbeat now rather than at the next interval: the target
        # probes on it and reports at once how far it has caught up.
        heartbeats.send_heartbeats(ctx, now)
    view = lead.followers.get(transfer.target)
    final = pg.position
    if view is None or not view.position_fresh or view.position is None:
        return
    if final is not None and view.position < final:
        return
    ctx.emit(ev.SwitchoverCaughtUp, target=transfer.target, position=final)
    ctx.step_down(now, "switchover", transfer_to=transfer.target)
