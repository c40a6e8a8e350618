"""The voter's side of an election: the refusal rules (lease promise,
eligibility, cluster state, WAL check; docs/design.md §5 "Voting rules"),
answering pre-votes and votes, taking over a hand-over to a candidate with
less WAL, and following a switchover's target early."""

from __future__ import annotations

from failoverd.core import actions as act
from failoverd.core import candidacy
from failoverd.core import events as ev
from failoverd.core.context import Context
from failoverd.core.messages import PreVoteRequest, PreVoteResponse, VoteRequest, VoteResponse
from failoverd.core.spec import ReplicationMode
from failoverd.core.state import PgRole, Position, Role, StateStamp

LEASE_REFUSAL = "a leader's lease may still be valid here"
MAY_NOT_LEAD_REFUSAL = "candidate may not lead (witness or nofailover)"


def refusal(
    ctx: Context,
    candidate: str,
    position: Position | None,
    stamp: StateStamp,
    now: float,
    transfer_from: str | None,
    waive_wal_check: bool = False,
) -> str | None:
    """Why we would not vote for `candidate` now (None: we would)."""
    waived = is_handover_from(ctx, transfer_from)
    if now < ctx.promise_until and not waived and "lease" not in ctx.disabled:
        return LEASE_REFUSAL
    if not ctx.spec.member(candidate).can_lead:
        return MAY_NOT_LEAD_REFUSAL
    if stamp < ctx.state.stamp:
        return "candidate's cluster state is older than mine"
    if waive_wal_check:
        return None
    if holds_more_wal_than(ctx, position):
        return f"candidate's WAL {position} is behind mine {ctx.my_position()}"
    if ctx.spec.replication.mode is ReplicationMode.ASYNC and "lsn-check" not in ctx.disabled:
        if ctx.lags_beyond_limit(position):
            return "candidate lags the last primary by more than max_lag_bytes"
    return None


def is_handover_from(ctx: Context, transfer_from: str | None) -> bool:
    return transfer_from is not None and transfer_from in (ctx.leader, ctx.name, ctx.released_by)


def holds_more_wal_than(ctx: Context, position: Position | None) -> bool:
    if not ctx.me.is_data or "lsn-check" in ctx.disabled:
        return False
    mine = ctx.my_position()
    return mine is not None and (position is None or position < mine)


def on_pre_vote_request(ctx: Context, m: PreVoteRequest, now: float) -> None:
    reason = "stale term" if m.term <= ctx.term else refusal(ctx, m.sender, m.position, m.stamp, now, None)
    ctx.send(
        m.sender,
        PreVoteResponse(
            **ctx.envelope(),
            granted=reason is None,
            vouches_wal=reason is None and candidacy.vouches(ctx, m.position),
            reason=reason or "",
        ),
    )
    if (
        reason is None
        and ctx.role is Role.PRE_CANDIDATE
        and m.term == ctx.term + 1
        and ctx.claim(m.sender, m.position) > ctx.claim(ctx.name, ctx.my_position())
    ):
        # Two members that timed out together would both pass the pre-vote
        # and split the vote, costing another election timeout: the weaker
        # claim steps back (liveness only; votes decide safety).
        ctx.role = Role.FOLLOWER
        ctx.candidacy = None
        ctx.election_deadline = now + ctx.random_timeout()
        ctx.emit(ev.PreVoteYielded, to=m.sender, position=ctx.my_position(), other_position=m.position)


def on_vote_request(ctx: Context, m: VoteRequest, now: float) -> None:
    leader_before = ctx.leader
    handover = m.term > ctx.term and is_handover_from(ctx, m.transfer_from)
    reason = refusal(ctx, m.sender, m.position, m.stamp, now, m.transfer_from, m.waive_wal_check)
    if m.term < ctx.term:
        reason = "stale term"
    elif reason in (LEASE_REFUSAL, MAY_NOT_LEAD_REFUSAL):
        pass  # do not even adopt the term: a live leader must not be disturbed
    else:
        if m.term > ctx.term:
            ctx.become_follower(m.term, now, reason=f"vote request from {m.sender}")
        if reason is None and ctx.voted_for not in (None, m.sender):
            reason = f"already voted for {ctx.voted_for} in term {ctx.term}"
        if reason is None:
            ctx.voted_for = m.sender
            ctx.persist()
            ctx.election_deadline = now + ctx.random_timeout()
            ctx.emit(
                ev.VoteGranted, candidate=m.sender, transfer_from=m.transfer_from, waive_wal_check=m.waive_wal_check
            )
            follow_successor_early(ctx, m, leader_before)
    if reason is not None:
        ctx.emit(ev.VoteRefused, candidate=m.sender, candidate_term=m.term, reason=reason)
    ctx.send(
        m.sender,
        VoteResponse(
            **ctx.envelope(),
            granted=reason is None,
            vouches_wal=reason is None and candidacy.vouches(ctx, m.position, m.waive_wal_check),
            reason=reason or "",
        ),
    )
    if handover and ctx.term == m.term:  # a refusal that left our term alone releases nothing
        ctx.released_by = m.transfer_from
        take_over_handover(ctx, m, now)


def take_over_handover(ctx: Context, m: VoteRequest, now: float) -> None:
    """The leader handed over to a candidate with less WAL than ours (it
    chose by positions reported up to a heartbeat ago). That candidate
    cannot win the data quorum, so campaign for the same handover at once
    instead of after an election timeout."""
    if (
        ctx.role is not Role.FOLLOWER
        or ctx.voted_for is not None
        or m.waive_wal_check
        or m.transfer_from == ctx.name  # we stepped down so that another member can try
        or not holds_more_wal_than(ctx, m.position)
        or not candidacy.may_campaign(ctx, now, transfer=True)
    ):
        return
    ctx.emit(ev.HandoverTakenOver, candidate=m.sender, transfer_from=m.transfer_from, position=ctx.my_position())
    candidacy.start_election(ctx, now, transfer_from=m.transfer_from)


def follow_successor_early(ctx: Context, m: VoteRequest, leader_before: str | None) -> None:
    """Stream from the target of a planned switchover while it campaigns,
    before it is promoted (cascading replication; PostgreSQL follows its
    promotion onto the new timeline by itself). Its first commits wait for
    k standbys; re-pointing them only after the promotion would add a
    whole Follow to the write pause.

    Only when nothing can be lost or rewound: the candidate is the target
    of the switchover in our state, was handed leadership by the leader we
    followed, and that leader told us its PostgreSQL had stopped with its
    WAL ending at F (so ours can grow no further), with our WAL on F's
    timeline, no further than F, and the candidate's at F or beyond: ours
    is a prefix of the candidate's. This changes only where WAL comes
    from: a follower still Follows whichever leader turns out primary."""
    handover = ctx.handover
    pg = ctx.pg
    if not ctx.me.is_data or pg is None or pg.position is None or m.position is None or handover is None:
        return
    final = handover[1]
    if (
        m.transfer_from is None
        or m.transfer_from not in (leader_before, ctx.name)
        or handover[0] != m.term - 1
        or ctx.state.switchover_to != m.sender
        or ctx.state.switchover_at is not None
        or pg.role not in (PgRole.STANDBY, PgRole.STOPPED)
    ):
        return
    if not (pg.position.timeline == final.timeline == m.position.timeline and pg.position <= final <= m.position):
        return
    # Not through request_once: it remembers one request, and this one
    # must not make a StartStandby asked for just before look new again.
    if ctx.cascade_requested == (m.sender, ctx.term):
        return
    ctx.cascade_requested = (m.sender, ctx.term)
    ctx.out.append(act.Follow(m.sender, ctx.term))
    ctx.emit(ev.FollowRequested, leader=m.sender, pg_role=pg.role.value, before_promotion=True)
