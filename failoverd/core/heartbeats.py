"""A leader's heartbeats and what they earn: the lease (docs/design.md §6),
commits of the replicated cluster state, and the leader's view of each
follower (position, health), including which one should succeed it."""

from __future__ import annotations

from typing import Any

from failoverd.core import actions as act
from failoverd.core import events as ev
from failoverd.core.context import Context, standing
from failoverd.core.messages import Heartbeat, HeartbeatAck
from failoverd.core.quorum import committed_version, quorum_time
from failoverd.core.roles import FollowerView

SENT_SEQ_KEPT = 128


def send_heartbeats(ctx: Context, now: float) -> None:
    lead = ctx.leading()
    if lead.seq > 0 and now > lead.next_heartbeat_at:
        # A heartbeat that goes out late (a busy host) cuts into the lease
        # like a slow acknowledgement does.
        note_delay(ctx, now - lead.next_heartbeat_at, now)
    lead.seq += 1
    lead.sent_at[lead.seq] = now
    lead.sent_at.pop(lead.seq - SENT_SEQ_KEPT, None)
    promise = lead.promise.promise_s
    ctx.promise_s = promise
    lead.lease_end_at[ctx.name] = now + ctx.timing.lease_for(promise)
    lead.next_heartbeat_at = now + ctx.timing.heartbeat_interval_s
    if "lease" not in ctx.disabled:
        # Counting ourselves in the lease quorum is a promise too.
        ctx.promise_until = max(ctx.promise_until, now + promise)
    pos = ctx.my_position() if lead.primary_ready else None
    if lead.transfer is not None and lead.transfer.stopped_seen:
        # primary_ready false with a position: our PostgreSQL has stopped
        # for a switchover and this is where its WAL ends (follower.on_heartbeat).
        pos = lead.transfer.final
    for peer in ctx.others:
        ctx.send(
            peer,
            Heartbeat(
                **ctx.envelope(),
                seq=lead.seq,
                state=ctx.state,
                commit_version=ctx.commit_version,
                primary_ready=lead.primary_ready,
                primary_position=pos,
                # A follower that never said which promise it made may be of
                # an older version, which refuses the field: it is asked for
                # none, and promises its election_timeout_min_s.
                promise_s=promise if peer in lead.promised_by else 0.0,
            ),
        )
    update_lease(ctx, now)


def note_delay(ctx: Context, delay_s: float, now: float) -> None:
    lead = ctx.leading()
    before = lead.promise.promise_s
    if lead.promise.note_delay(delay_s, now, ctx.timing):
        ctx.emit(
            ev.PromiseChanged,
            promise_s=round(lead.promise.promise_s, 3),
            previous_s=round(before, 3),
            lease_s=round(ctx.timing.lease_for(lead.promise.promise_s), 3),
            delay_s=round(delay_s, 3),
        )


def record_ack(ctx: Context, m: HeartbeatAck, now: float) -> bool:
    """Take a follower's acknowledgement in: lease, commit, its view. False
    when it acknowledges a heartbeat too old to count."""
    lead = ctx.leading()
    sent = lead.sent_at.get(m.seq)
    if sent is None:
        return False  # an ack for a heartbeat we no longer remember: too old to extend anything
    if m.promised_s:
        lead.promised_by.add(m.sender)
    # An older member promised its election_timeout_min_s: ours, as the
    # configuration is the same everywhere (reload.lease_fits).
    promised = m.promised_s or ctx.timing.election_timeout_min_s
    end = sent + ctx.timing.lease_for(promised)
    lead.lease_end_at[m.sender] = max(lead.lease_end_at.get(m.sender, end), end)
    if m.seq > lead.timed_seq.get(m.sender, 0):
        # A round trip from the first ack of each heartbeat only: a repeated
        # ack (follower.report_position) answers a probe, not the heartbeat.
        lead.timed_seq[m.sender] = m.seq
        note_delay(ctx, now - sent, now)
    if m.accepted.written_term == ctx.term:
        lead.accepted[m.sender] = max(lead.accepted.get(m.sender, 0), m.accepted.version)
    lead.followers[m.sender] = FollowerView(
        m.position, m.position_fresh, m.holds_nothing, m.pg_healthy, m.following_leader, now
    )
    update_lease(ctx, now)
    new_commit = committed_version(ctx.voters, lead.accepted)
    if new_commit > ctx.commit_version:
        ctx.commit_version = new_commit
    return True


def update_lease(ctx: Context, now: float) -> None:
    lead = ctx.leading()
    # The latest end that a majority's acknowledgements each reach (§6).
    until = quorum_time(ctx.voters, lead.lease_end_at)
    if until is None:
        return
    if until > lead.lease_until:
        lead.lease_until = until
        lead.lease_ever = True
        if ctx.watchdog_armed and "lease" not in ctx.disabled:
            ctx.out.append(act.ArmWatchdog(until))


def lease_lost(ctx: Context, now: float) -> bool:
    if "lease" in ctx.disabled:
        return False
    lead = ctx.leading()
    if lead.lease_ever:
        return now >= lead.lease_until
    # A new leader that cannot gather a first quorum of acks gives up.
    return now - lead.elected_at >= ctx.timing.election_timeout_min_s


def commit_state(ctx: Context, now: float, **changes: Any) -> None:
    """Write a new version of the replicated state and send it at once."""
    lead = ctx.leading()
    ctx.state = ctx.state.next_version(ctx.term, **changes)
    lead.accepted[ctx.name] = ctx.state.stamp.version
    ctx.persist()
    send_heartbeats(ctx, now)


def best_successor(ctx: Context, now: float) -> str | None:
    """The healthy follower heard lately that stands strongest (most WAL, then priority)."""
    best = None
    best_key = None
    for name, view in ctx.leading().followers.items():
        member = ctx.spec.member(name)
        if not member.can_lead or not view.pg_healthy:
            continue
        if now - view.heard_at > ctx.timing.election_timeout_min_s:
            continue
        key = standing(view.position, member.priority, name)
        if best_key is None or key > best_key:
            best, best_key = name, key
    return best
