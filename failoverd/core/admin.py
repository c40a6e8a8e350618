"""Operators' requests (failoverd.core.requests): which member answers each,
and the leader's answers. Every request gets exactly one `Reply` with a code
(`actions.ReplyCode`): the API turns codes into HTTP statuses and follows
redirects; it decides nothing itself (docs/design.md §13)."""

from __future__ import annotations

from failoverd.core import actions as act
from failoverd.core import candidacy, heartbeats, switchover
from failoverd.core import events as ev
from failoverd.core.actions import ReplyCode
from failoverd.core.context import Context
from failoverd.core.requests import (
    AdminRequest,
    CancelSwitchover,
    Failover,
    Pause,
    RecordEvent,
    Reinit,
    Restart,
    Resume,
    Switchover,
)
from failoverd.core.state import HistoryEntry, PgRole, Role
from failoverd.core.status import RebuildStatus


def request(ctx: Context, req: AdminRequest, now: float) -> None:
    """Answer `req` here, or say who should (REDIRECT), or that nobody can now
    (UNAVAILABLE). Most requests are the leader's; a failover with no live
    leader is its target's, which campaigns; a reinit is the rebuilt member's."""
    if isinstance(req, Reinit):
        reinit(ctx, req, now)
    elif isinstance(req, Restart):
        restart(ctx, req)
    elif ctx.role is Role.LEADER:
        leader_request(ctx, req, now)
    elif ctx.leader is not None and ctx.leader_live(now):
        ctx.reply(
            req.request_id, ReplyCode.REDIRECT, f"{ctx.name} is not the leader; {ctx.leader} is", redirect=ctx.leader
        )
    elif isinstance(req, Failover) and req.target == ctx.name:
        candidacy.operator_failover(ctx, req, now)
    elif isinstance(req, Failover) and ctx.spec.has_member(req.target):
        ctx.reply(
            req.request_id,
            ReplyCode.REDIRECT,
            f"no live leader: the failover goes to {req.target}",
            redirect=req.target,
        )
    else:
        ctx.reply(req.request_id, ReplyCode.UNAVAILABLE, f"{ctx.name} knows no live leader; retry shortly")


def reinit(ctx: Context, req: Reinit, now: float) -> None:
    """Rebuild our standby from the live primary: only a follower's standby,
    never a primary, never without a primary to clone from, one at a time."""

    def refuse(code: ReplyCode, why: str) -> None:
        ctx.reply(req.request_id, code, why)

    if req.member != ctx.name:
        if not ctx.spec.has_member(req.member):
            return refuse(ReplyCode.INVALID, f"{req.member} is not a member")
        ctx.reply(req.request_id, ReplyCode.REDIRECT, f"{req.member} rebuilds itself", redirect=req.member)
        return
    if not ctx.me.is_data:
        return refuse(ReplyCode.INVALID, f"{ctx.name} is a witness: it has no PostgreSQL")
    if ctx.role is not Role.FOLLOWER:
        return refuse(ReplyCode.CONFLICT, f"{ctx.name} is {ctx.role.value}: only a follower's standby can be rebuilt")
    if ctx.pg is not None and ctx.pg.role is PgRole.PRIMARY:
        return refuse(ReplyCode.CONFLICT, f"{ctx.name}'s PostgreSQL is a primary")
    if ctx.leader is None or not ctx.leader_primary_ready or not ctx.leader_live(now):
        return refuse(ReplyCode.CONFLICT, f"{ctx.name} knows no live primary to clone from")
    if ctx.rebuild is not None and ctx.rebuild.running:
        return refuse(ReplyCode.CONFLICT, f"a rebuild of {ctx.name} from {ctx.rebuild.leader} is already running")
    ctx.rebuild = RebuildStatus(leader=ctx.leader, started_at=ctx.wall_time)
    ctx.out.append(act.Rebuild(ctx.leader))
    ctx.emit(ev.RebuildStarted, leader=ctx.leader)
    ctx.reply(req.request_id, ReplyCode.OK, f"rebuilding {ctx.name} from {ctx.leader}")


def restart(ctx: Context, req: Restart) -> None:
    """Restart our standby so that settings pending a restart take effect:
    only a follower's running standby, one restart or rebuild at a time. The
    primary is restarted through a switchover, which failoverctl restart
    --rolling does; never two members down at once is its job, since it sees
    the whole cluster."""

    def refuse(code: ReplyCode, why: str) -> None:
        ctx.reply(req.request_id, code, why)

    if req.member != ctx.name:
        if not ctx.spec.has_member(req.member):
            return refuse(ReplyCode.INVALID, f"{req.member} is not a member")
        ctx.reply(req.request_id, ReplyCode.REDIRECT, f"{req.member} restarts its own PostgreSQL", redirect=req.member)
        return
    if not ctx.me.is_data:
        return refuse(ReplyCode.INVALID, f"{ctx.name} is a witness: it has no PostgreSQL")
    if ctx.role is not Role.FOLLOWER:
        return refuse(
            ReplyCode.CONFLICT,
            f"{ctx.name} is {ctx.role.value}: its primary is restarted through a "
            "switchover (failoverctl restart --rolling)",
        )
    if ctx.pg is None or ctx.pg.role is not PgRole.STANDBY:
        state = "unknown" if ctx.pg is None else ctx.pg.role.value
        return refuse(ReplyCode.CONFLICT, f"{ctx.name}'s PostgreSQL is {state}, not a running standby")
    if ctx.restarting or (ctx.rebuild is not None and ctx.rebuild.running):
        return refuse(ReplyCode.CONFLICT, f"a restart or rebuild of {ctx.name} is already running")
    ctx.restarting = True
    ctx.out.append(act.RestartServer())
    ctx.emit(ev.RestartStarted)
    ctx.reply(req.request_id, ReplyCode.OK, f"restarting {ctx.name}'s PostgreSQL")


def restart_done(ctx: Context, error: str | None) -> None:
    if ctx.restarting:
        ctx.restarting = False
        ctx.emit(ev.RestartFinished, error=error)


def rebuild_done(ctx: Context, error: str | None) -> None:
    rebuild = ctx.rebuild
    if rebuild is None or not rebuild.running:
        return
    ctx.rebuild = RebuildStatus(rebuild.leader, rebuild.started_at, False, ctx.wall_time, error)
    ctx.emit(ev.RebuildFinished, leader=rebuild.leader, error=error)


def leader_request(ctx: Context, req: AdminRequest, now: float) -> None:
    lead = ctx.leading()

    def reply(code: ReplyCode, message: str) -> None:
        ctx.out.append(act.Reply(req.request_id, code, message))

    if isinstance(req, (Pause, Resume)):
        paused = isinstance(req, Pause)
        if ctx.state.paused != paused:
            heartbeats.commit_state(ctx, now, paused=paused)
            ctx.emit(ev.Paused if paused else ev.Resumed)
        return reply(ReplyCode.OK, "paused" if paused else "resumed")
    if isinstance(req, Switchover):
        due_now = req.at is None or ctx.wall_time is None or req.at <= ctx.wall_time
        if not due_now:
            refused = switchover.schedule_refusal(ctx, req.target)
            if refused is not None:
                return reply(_code(ctx, req.target), refused)
            heartbeats.commit_state(ctx, now, switchover_to=req.target, switchover_at=float(req.at or 0))
            ctx.emit(ev.SwitchoverScheduled, target=req.target, at=req.at)
            return reply(ReplyCode.OK, f"switchover to {req.target or 'the best standby'} scheduled")
        if ctx.state.switchover_at is not None:
            return reply(ReplyCode.CONFLICT, "a switchover is already scheduled; cancel it first")
        refused = switchover.refusal(ctx, req.target, now)
        if refused is not None:
            return reply(_code(ctx, req.target), refused)
        target = req.target or heartbeats.best_successor(ctx, now)
        if target is None:
            return reply(ReplyCode.CONFLICT, "no healthy standby to switch over to")
        switchover.prepare(ctx, req.request_id, target, now)  # answered when it starts
        return None
    if isinstance(req, CancelSwitchover):
        if ctx.state.switchover_at is None:
            running = lead.transfer
            return reply(
                ReplyCode.CONFLICT,
                f"a switchover to {running.target} is running and cannot be cancelled"
                if running is not None
                else "no switchover is scheduled",
            )
        heartbeats.commit_state(ctx, now, switchover_to=None, switchover_at=None)
        ctx.emit(ev.SwitchoverCancelled)
        return reply(ReplyCode.OK, "scheduled switchover cancelled")
    if isinstance(req, Failover):
        if not ctx.spec.has_member(req.target):
            return reply(ReplyCode.INVALID, f"{req.target} is not a member")
        if req.target == ctx.name:
            return reply(ReplyCode.INVALID, f"{ctx.name} is already the leader")
        refused = switchover.refusal(ctx, req.target, now, operator_failover=True)
        if refused is not None:
            return reply(_code(ctx, req.target), refused)
        switchover.begin(ctx, req.target, now, "operator failover")
        return reply(ReplyCode.OK, f"failover to {req.target} started")
    if isinstance(req, RecordEvent):
        if not isinstance(req.reason, str) or not 1 <= len(req.reason) <= 200:
            return reply(ReplyCode.INVALID, "a history note is 1 to 200 characters")
        entry = HistoryEntry(
            term=ctx.term,
            from_node=ctx.name,
            to_node=ctx.name,
            reason=req.reason,
            position=ctx.my_position(),
            wall_time=ctx.wall_time,
        )
        heartbeats.commit_state(ctx, now, history=ctx.state.with_history(entry))
        return reply(ReplyCode.OK, "recorded")
    return reply(ReplyCode.INVALID, f"unknown request {type(req).__name__}")


def _code(ctx: Context, target: str | None) -> ReplyCode:
    """A refusal about the target itself (not a member, may never lead, is
    us) is INVALID whatever the state; any other is a CONFLICT with it."""
    if target is not None and (
        not ctx.spec.has_member(target) or target == ctx.name or not ctx.spec.member(target).can_lead
    ):
        return ReplyCode.INVALID
    return ReplyCode.CONFLICT
