"""A leader: winning, heartbeating (failoverd.core.heartbeats), the guarded
promotion, watching its own PostgreSQL, and self-fencing the moment it may
not write (docs/design.md §5 "Leader", §6)."""

from __future__ import annotations

from failoverd.core import actions as act
from failoverd.core import events as ev
from failoverd.core import heartbeats, switchover
from failoverd.core.context import VIP_RETRY_S, Context
from failoverd.core.messages import HeartbeatAck
from failoverd.core.promise import PromiseChooser
from failoverd.core.roles import Leadership
from failoverd.core.spec import ReplicationMode
from failoverd.core.state import HistoryEntry, PgRole, Position, Role
from failoverd.core.status import FailoverRecord


def become_leader(ctx: Context, now: float) -> None:
    candidacy = ctx.candidacy
    previous = ctx.state.primary
    failover = None if candidacy is None else candidacy.operator_failover
    if failover is not None:
        reason = "operator failover" + (" (data loss allowed)" if failover.allow_data_loss else "")
    else:
        transfer = candidacy is not None and candidacy.transfer_from is not None
        reason = "transfer" if transfer else ("bootstrap" if previous is None else "election")
    votes = () if candidacy is None else candidacy.granted()
    entry = HistoryEntry(
        term=ctx.term,
        from_node=previous,
        to_node=ctx.name,
        reason=reason,
        position=ctx.my_position(),
        wall_time=ctx.wall_time,
    )
    # A scheduled switchover stays scheduled across the change of leader.
    keep_to = ctx.state.switchover_to if ctx.state.switchover_at is not None else None
    ctx.state = ctx.state.next_version(
        ctx.term, primary=ctx.name, switchover_to=keep_to, history=ctx.state.with_history(entry)
    )
    ctx.role = Role.LEADER
    ctx.candidacy = None
    ctx.leader = ctx.name
    lead = ctx.lead = Leadership(
        elected_at=now,
        election_version=ctx.state.stamp.version,
        reason=reason,
        previous_heard_at=ctx.leader_heard_at,
        promise=PromiseChooser.new(ctx.timing, now),
    )
    ctx.leader_heard_at = None
    lead.wal_check_waived = failover is not None and failover.allow_data_loss
    lead.accepted[ctx.name] = ctx.state.stamp.version
    ctx.persist()
    ctx.emit(ev.RoleChanged, role="leader", previous="candidate", reason=reason, votes=votes)
    if ctx.me.is_data:
        ctx.out.append(act.PrepareVip(ctx.term))
        # Now rather than with the Promote: on a standby it only takes
        # effect at promotion, and the adapter would otherwise set it
        # while our write pause runs (it checks again before promoting).
        configure_sync(ctx)
    ctx.out.append(act.ProbeNow())
    heartbeats.send_heartbeats(ctx, now)


def configure_sync(ctx: Context) -> None:
    standbys = tuple(n for n in ctx.data_voters if n != ctx.name)
    ctx.out.append(act.ConfigureSync(ctx.state.sync_count, standbys))


def tick(ctx: Context, now: float) -> None:
    lead = ctx.leading()
    if now >= lead.next_heartbeat_at:
        heartbeats.send_heartbeats(ctx, now)
    if heartbeats.lease_lost(ctx, now):
        ctx.emit(ev.LeaseLost, lease_until=round(lead.lease_until, 3), now=round(now, 3))
        ctx.step_down(now, "lease lost")
        return
    check_pg_health(ctx, now)
    if ctx.lead is None:
        return
    switchover.advance(ctx, now)
    if ctx.lead is None:
        return
    switchover.maybe_start_scheduled(ctx, now)
    if ctx.lead is None:
        return
    switchover.checkpoint_ahead(ctx, now)
    retry_vip(ctx, now)
    maybe_promote(ctx, now)


def next_wakeup(ctx: Context) -> float:
    lead = ctx.leading()
    wake = lead.next_heartbeat_at
    if lead.lease_ever and "lease" not in ctx.disabled:
        wake = min(wake, lead.lease_until)
    if ctx.vip_retry_at is not None:
        wake = min(wake, ctx.vip_retry_at)
    if lead.pending is not None:
        wake = min(wake, lead.pending.asked_at + switchover.CHECKPOINT_WAIT_S)
    return wake


def checkpoint_done(ctx: Context, error: str | None, now: float) -> None:
    """Our CHECKPOINT finished (or failed: the switchover goes on anyway; its
    shutdown checkpoint then does the work)."""
    if ctx.role is Role.LEADER and ctx.lead is not None and ctx.lead.pending is not None:
        switchover.start_prepared(ctx, now)


def vip_result(ctx: Context, term: int, error: str | None, now: float) -> None:
    """How the background acquisition of the VIP ended (None: added). A
    failure is tried again every VIP_RETRY_S while we should hold it: the
    primary stays correct and reachable through the DSN meanwhile."""
    if not ctx.vip_held or term != ctx.term or ctx.role is not Role.LEADER:
        return
    if error is None:
        ctx.vip_error = ctx.vip_retry_at = None
        return
    ctx.vip_error = error
    ctx.vip_retry_at = now + VIP_RETRY_S
    ctx.emit(ev.VipAcquireFailed, error=error[:300], retry_s=VIP_RETRY_S)


def retry_vip(ctx: Context, now: float) -> None:
    if ctx.vip_held and ctx.vip_retry_at is not None and now >= ctx.vip_retry_at:
        ctx.vip_retry_at = None
        ctx.out.append(act.AcquireVip(ctx.term))


def on_heartbeat_ack(ctx: Context, m: HeartbeatAck, now: float) -> None:
    if m.term > ctx.term:
        ctx.become_follower(m.term, now, reason=f"{m.sender} is in term {m.term}")
        return
    if ctx.role is not Role.LEADER or m.term < ctx.term or not m.success:
        return
    if not heartbeats.record_ack(ctx, m, now):
        return
    switchover.advance(ctx, now)
    if ctx.lead is not None:
        maybe_promote(ctx, now)


# ------------------------------------------------------------------ promotion


def promotion_blocker(ctx: Context, now: float) -> str | None:
    """Why we may not make our PostgreSQL writable yet (None: we may)."""
    lead = ctx.leading()
    pg = ctx.pg
    if ctx.commit_version < lead.election_version:
        return "cluster state of this term not yet committed by a majority"
    if not lead.lease_ever or now >= lead.lease_until:
        return "no lease"
    if lead.transfer is not None:
        return "leadership transfer in progress"
    if pg is None or pg.observed_at < lead.elected_at:
        return "no probe of the local PostgreSQL since the election"
    if pg.role not in (PgRole.STANDBY, PgRole.ABSENT, PgRole.PRIMARY):
        return f"local PostgreSQL is {pg.role.value}"
    if "lsn-check" in ctx.disabled or lead.wal_check_waived:
        return None
    blocker = wal_blocker(ctx, pg.position)
    lead.confirm_failed = blocker is not None
    return blocker


def wal_blocker(ctx: Context, mine: Position | None) -> str | None:
    """The quorum-intersection check on positions probed after this leader was known."""
    lead = ctx.leading()
    vouched = 1
    for name in ctx.data_voters:
        view = lead.followers.get(name)
        if name == ctx.name or view is None or not view.position_fresh:
            continue
        # A member ahead of us is no evidence either way (a fenced old
        # primary holds WAL nobody acknowledged); it just does not vouch.
        # A fresh empty position (empty data directory) vouches while we
        # have no WAL either (the bootstrap), or when it never held data.
        if view.position is None:
            if mine is None or view.holds_nothing:
                vouched += 1
        elif mine is not None and view.position <= mine:
            vouched += 1
    needed = ctx.spec.data_votes_needed(ctx.state.sync_count)
    if vouched < needed:
        return f"{vouched} of {needed} data members have confirmed our WAL is the longest"
    if ctx.spec.replication.mode is ReplicationMode.ASYNC and ctx.lags_beyond_limit(mine):
        return "we lag the last primary by more than max_lag_bytes"
    return None


def maybe_promote(ctx: Context, now: float) -> None:
    lead = ctx.leading()
    if lead.transfer is not None:
        return  # a switchover has demoted us on purpose; switchover.advance decides
    if lead.primary_ready or lead.promote_requested_at is not None:
        if lead.promote_requested_at is not None and not lead.primary_ready:
            limit = ctx.timing.bootstrap_timeout_s if lead.bootstrapping else ctx.timing.promote_timeout_s
            if now - lead.promote_requested_at > limit:
                ctx.step_down(now, "promotion timed out")
        return
    blocker = promotion_blocker(ctx, now)
    if blocker is not None:
        if blocker != lead.blocked_reason:
            lead.blocked_reason = blocker
            ctx.emit(ev.PromotionWaiting, reason=blocker)
        if ctx.pg is not None and ctx.pg.role is PgRole.STOPPED:
            ctx.request_once(now, "start_standby", act.StartStandby())
        if now - lead.elected_at > ctx.timing.promote_timeout_s and lead.transfer is None:
            ctx.step_down(now, f"could not promote: {blocker}", transfer_to=heartbeats.best_successor(ctx, now))
            return
        ahead = member_ahead(ctx) if lead.confirm_failed else None
        if ahead is not None and ctx.spec.member(ahead).can_lead:
            ctx.step_down(now, f"{ahead} has more WAL", transfer_to=ahead)
        return
    if ctx.pg is not None and ctx.pg.role is PgRole.PRIMARY:
        configure_sync(ctx)  # a running primary takes it at once: not long before
    if "lease" not in ctx.disabled:
        ctx.watchdog_armed = True
        ctx.out.append(act.ArmWatchdog(lead.lease_until))
    lead.promote_requested_at = now
    lead.bootstrapping = ctx.pg is not None and ctx.pg.role is PgRole.ABSENT
    ctx.out.append(act.Promote(ctx.term))
    ctx.emit(ev.PromoteRequested, position=ctx.my_position(), lease_remaining_s=round(lead.lease_until - now, 3))
    if ctx.pg is not None and ctx.pg.role is PgRole.PRIMARY:
        observe(ctx, now)


def member_ahead(ctx: Context) -> str | None:
    lead = ctx.leading()
    mine = ctx.my_position()
    best: str | None = None
    best_position: Position | None = None
    for name, view in lead.followers.items():
        position = view.position
        if view.position_fresh and view.pg_healthy and position is not None and (mine is None or position > mine):
            if best_position is None or position > best_position:
                best, best_position = name, position
    return best


def promotion_failed(ctx: Context, term: int, reason: str, now: float) -> None:
    """The supervisor could not carry out our `Promote` (the pre_promote
    hook vetoed it, or the promotion command failed): give up leadership
    now instead of waiting out promote_timeout, so another member can try."""
    lead = ctx.lead
    if (
        ctx.role is Role.LEADER
        and lead is not None
        and ctx.term == term
        and lead.promote_requested_at is not None
        and not lead.primary_ready
    ):
        ctx.emit(ev.PromotionFailed, reason=reason)
        ctx.step_down(now, f"promotion failed: {reason}", transfer_to=heartbeats.best_successor(ctx, now))


# ------------------------------------------------------- our own PostgreSQL


def observe(ctx: Context, now: float) -> None:
    lead = ctx.leading()
    pg = ctx.pg
    # Not during a switchover: it made primary_ready false on purpose, and
    # a probe that began before the Demote may still show a primary.
    if (
        pg is not None
        and lead.promote_requested_at is not None
        and not lead.primary_ready
        and pg.role is PgRole.PRIMARY
        and lead.transfer is None
    ):
        lead.primary_ready = True
        outage = None if lead.previous_heard_at is None else max(0.0, now - lead.previous_heard_at)
        ctx.emit(ev.Promoted, position=pg.position, reason=lead.reason, outage_s=outage)
        if lead.reason != "bootstrap":
            ctx.last_failover = FailoverRecord(ctx.term, lead.reason, outage, ctx.wall_time)
        acquire_vip(ctx, now)
        # Followers start following us when a heartbeat says we are
        # writable; in quorum mode our first commits wait for that. The
        # first primary of the cluster also records it is initialised.
        if ctx.state.initialized:
            heartbeats.send_heartbeats(ctx, now)
        else:
            heartbeats.commit_state(ctx, now, initialized=True)
    check_pg_health(ctx, now)
    if ctx.lead is not None:
        switchover.advance(ctx, now)
    if ctx.lead is not None:
        maybe_promote(ctx, now)


def acquire_vip(ctx: Context, now: float) -> None:
    lead = ctx.leading()
    if lead.primary_ready and not ctx.vip_held and lead.transfer is None and now < lead.lease_until:
        ctx.vip_held = True
        ctx.out.append(act.AcquireVip(ctx.term))
        ctx.emit(ev.VipAcquired)


def check_pg_health(ctx: Context, now: float) -> None:
    """Give up leadership when our promoted PostgreSQL has died or hangs."""
    lead = ctx.leading()
    pg = ctx.pg
    if not lead.primary_ready or lead.transfer is not None or pg is None or ctx.state.paused:
        return
    if pg.role is PgRole.PRIMARY:
        return
    since, stalled_since = ctx.pg_unresponsive_since, ctx.pg_stalled_since
    # A server that only fails its probes may be busy: pg_unresponsive_s.
    # One whose every process is stopped or blocked on storage, probe after
    # probe, runs nothing: pg_stalled_s is enough (docs/failure-modes.md).
    stalled = stalled_since is not None and now - stalled_since >= ctx.timing.pg_stalled_s
    hung = pg.role is PgRole.UNRESPONSIVE and (
        stalled or (since is not None and now - since >= ctx.timing.pg_unresponsive_s)
    )
    if pg.role is PgRole.UNRESPONSIVE and not hung:
        return
    target = heartbeats.best_successor(ctx, now)
    state = "stalled (no process of it can run)" if stalled else pg.role.value
    ctx.step_down(now, f"local PostgreSQL is {state}", transfer_to=target)
