"""Standing for election: whether we may, the pre-vote, the election itself,
and counting the answers (docs/design.md §5)."""

from __future__ import annotations

from failoverd.core import actions as act
from failoverd.core import events as ev
from failoverd.core import leader
from failoverd.core.context import Context
from failoverd.core.messages import PreVoteRequest, PreVoteResponse, VoteRequest, VoteResponse
from failoverd.core.quorum import Tally, vote_tally
from failoverd.core.requests import Failover
from failoverd.core.roles import Candidacy
from failoverd.core.state import PgRole, Position, Role

# A position probed more than this many heartbeat intervals ago is probed
# again before we stand on it (`stand`, `probe_ahead_at`): at most what a
# watchful member's probes every heartbeat leave between them.
STALE_HEARTBEATS = 2


def vouches(ctx: Context, position: Position | None, waived: bool = False) -> bool:
    """Whether our WAL check of a candidate counts towards the data quorum.

    An unknown position (PostgreSQL unresponsive) vouches for nothing. An
    empty data directory that never held data vouches for anyone (it
    acknowledged nothing); one that did (wiped) only for another empty one
    (the bootstrap), since it no longer holds the commits it acknowledged.
    """
    if not ctx.me.is_data:
        return False
    if "lsn-check" in ctx.disabled or waived:
        return True
    if ctx.pg is None:
        return False
    mine = ctx.pg.position
    if mine is None:
        return ctx.pg.role is PgRole.ABSENT and (position is None or not ctx.held_data)
    return position is not None and position >= mine


def may_campaign(ctx: Context, now: float, transfer: bool = False) -> bool:
    if not ctx.me.can_lead or ctx.pg is None:
        return False
    if ctx.state.paused and not transfer:
        return False
    if now < ctx.promise_until and not transfer and "lease" not in ctx.disabled:
        return False
    if now - ctx.pg.observed_at > ctx.timing.election_timeout_max_s:
        return False  # we know too little of our own PostgreSQL
    if ctx.pg.role is PgRole.STANDBY:
        return True
    # An uninitialised cluster: the first leader bootstraps with initdb. A first
    # leader that died before its initdb finished leaves it uninitialised.
    return ctx.pg.role is PgRole.ABSENT and not ctx.state.initialized


def start_pre_vote(ctx: Context, now: float) -> None:
    ctx.role = Role.PRE_CANDIDATE
    mine = ctx.my_position()
    ctx.candidacy = Candidacy(pre=True, grants={ctx.name: True}, vouchers={ctx.name} if vouches(ctx, mine) else set())
    ctx.election_deadline = now + ctx.random_timeout()
    ctx.emit(ev.PreVoteStarted, position=mine)
    request = PreVoteRequest(
        cluster=ctx.spec.name, sender=ctx.name, term=ctx.term + 1, position=mine, stamp=ctx.state.stamp
    )
    for peer in ctx.others:
        ctx.send(peer, request)


def start_election(ctx: Context, now: float, transfer_from: str | None, operator: Failover | None = None) -> None:
    ctx.term += 1
    ctx.voted_for = ctx.name
    ctx.role = Role.CANDIDATE
    ctx.leader = None
    ctx.leader_primary_ready = False
    waive = operator is not None and operator.allow_data_loss
    mine = ctx.my_position()
    ctx.candidacy = Candidacy(
        pre=False,
        grants={ctx.name: True},
        vouchers={ctx.name} if vouches(ctx, mine, waive) else set(),
        transfer_from=transfer_from,
        operator_failover=operator,
    )
    ctx.election_deadline = now + ctx.random_timeout()
    ctx.persist()
    ctx.emit(ev.ElectionStarted, transfer_from=transfer_from, position=mine, waive_wal_check=waive)
    request = VoteRequest(
        **ctx.envelope(), position=mine, stamp=ctx.state.stamp, transfer_from=transfer_from, waive_wal_check=waive
    )
    for peer in ctx.others:
        ctx.send(peer, request)


def on_vote_response(ctx: Context, m: PreVoteResponse | VoteResponse, now: float) -> None:
    if m.term > ctx.term and not m.granted:
        ctx.become_follower(m.term, now, reason=f"{m.sender} is in a later term")
        return
    pre = isinstance(m, PreVoteResponse)
    if (pre and ctx.role is not Role.PRE_CANDIDATE) or (not pre and ctx.role is not Role.CANDIDATE):
        return
    if not pre and m.term != ctx.term:
        return
    candidacy = ctx.candidacy
    if candidacy is None:
        return
    candidacy.grants[m.sender] = m.granted
    if m.granted and m.vouches_wal:
        candidacy.vouchers.add(m.sender)
    tally = vote_tally(ctx.voters, ctx.data_voters, candidacy.grants, candidacy.vouchers, ctx.data_votes_needed())
    if tally is Tally.WON:
        if pre:
            start_election(ctx, now, transfer_from=None)
        else:
            leader.become_leader(ctx, now)
    elif tally is Tally.LOST:
        ctx.emit(ev.ElectionLost, pre_vote=pre, grants=candidacy.granted())
        ctx.role = Role.FOLLOWER
        ctx.candidacy = None
        ctx.election_deadline = now + ctx.random_timeout()


def stand(ctx: Context, now: float, transfer_from: str | None = None) -> None:
    """Stand for election (a pre-vote first, or at once for a transfer) on a
    fresh position: a settled standby is probed only every probe_interval_s
    (core/probing.py), and a position that old understates a WAL that went on
    arriving until the leader went away; voters who probed later would refuse
    it. So a position older than two heartbeat intervals is probed again first,
    and we stand when that probe is in (`on_probe`), or a heartbeat interval
    later on what we know if it is slow (`timed_out`)."""
    pg = ctx.pg
    if pg is not None and now - pg.observed_at > STALE_HEARTBEATS * ctx.timing.heartbeat_interval_s:
        ctx.stand_after_probe = (now, ctx.term, transfer_from)
        ctx.election_deadline = now + ctx.timing.heartbeat_interval_s
        ctx.out.append(act.ProbeNow())
        return
    _stand_now(ctx, now, transfer_from)


def probe_ahead_at(ctx: Context) -> float | None:
    """When to ask for a probe so that, should the election deadline pass,
    we stand at once on a fresh position rather than wait for one, and weigh
    other candidates against our WAL as it is: two heartbeat intervals
    before the deadline, once per deadline (every data member, since each
    votes; the others' deadlines are within the same spread). Each heartbeat
    moves the deadline on, so a member whose leader is heard never gets
    here; it costs the ticker a wake-up that finds nothing due. (Asking when
    a pre-vote arrives instead made that probe hold up the one a new
    leader's WAL confirmation waits for.)"""
    if ctx.role is not Role.FOLLOWER or not ctx.me.is_data or ctx.pg is None or ctx.stand_after_probe is not None:
        return None
    if ctx.probed_ahead_for == ctx.election_deadline:
        return None
    at = ctx.election_deadline - STALE_HEARTBEATS * ctx.timing.heartbeat_interval_s
    return None if ctx.pg.observed_at >= at else at


def probe_ahead(ctx: Context, now: float) -> None:
    at = probe_ahead_at(ctx)
    if at is not None and now >= at:
        ctx.probed_ahead_for = ctx.election_deadline
        ctx.out.append(act.ProbeNow())


def _stand_now(ctx: Context, now: float, transfer_from: str | None) -> None:
    ctx.stand_after_probe = None
    if transfer_from is not None:
        start_election(ctx, now, transfer_from=transfer_from)
    else:
        start_pre_vote(ctx, now)


def on_probe(ctx: Context, now: float) -> None:
    """A probe is in: stand if we were waiting for it and still may."""
    pending = ctx.stand_after_probe
    if pending is None or ctx.pg is None or ctx.pg.observed_at < pending[0]:
        return
    ctx.stand_after_probe = None
    if _may_still_stand(ctx, now, pending):
        _stand_now(ctx, now, pending[2])


def _may_still_stand(ctx: Context, now: float, pending: tuple[float, int, str | None]) -> bool:
    """Nothing since we decided to stand has made it wrong: the same term, no
    leader heard (its heartbeat renews our promise, which may_campaign
    checks), and for a transfer, the leader that asked for it released us."""
    _, term, transfer_from = pending
    if ctx.role is not Role.FOLLOWER or ctx.term != term:
        return False
    if transfer_from is not None and ctx.released_by != transfer_from:
        return False
    return may_campaign(ctx, now, transfer=transfer_from is not None)


def timed_out(ctx: Context, now: float) -> None:
    """The election deadline passed: give up a running candidacy, and stand
    (pre-vote first) if we may."""
    if ctx.role in (Role.PRE_CANDIDATE, Role.CANDIDATE):
        ctx.emit(ev.ElectionTimedOut, role=ctx.role.value)
        ctx.role = Role.FOLLOWER
        ctx.candidacy = None
    pending = ctx.stand_after_probe
    if pending is not None:
        # The probe we waited for is slow: stand on what we know.
        ctx.stand_after_probe = None
        if _may_still_stand(ctx, now, pending):
            _stand_now(ctx, now, pending[2])
            return
    if may_campaign(ctx, now):
        stand(ctx, now)
    else:
        ctx.election_deadline = now + ctx.random_timeout()


def operator_failover(ctx: Context, req: Failover, now: float) -> None:
    """The operator names us to take over and no leader is alive: campaign
    now, skipping the pre-vote and, while paused, the pause. The lease
    promise still holds here and on every voter, so a leader that is in
    fact alive keeps its term and its lease."""

    def refuse(code: act.ReplyCode, why: str) -> None:
        ctx.out.append(act.Reply(req.request_id, code, why))

    if not ctx.me.can_lead:
        return refuse(act.ReplyCode.INVALID, f"{ctx.name} may not become primary (witness or nofailover)")
    if now < ctx.promise_until and "lease" not in ctx.disabled:
        # Heartbeats renew this promise, so a leader heard within
        # election_timeout_min is alive as far as we know.
        wait = ctx.promise_until - now
        if ctx.leader is not None:
            return refuse(
                act.ReplyCode.CONFLICT,
                f"{ctx.leader} was heard {ctx.timing.election_timeout_min_s - wait:.1f} s ago "
                f"and may hold a lease: send the failover to the leader, or retry in {wait:.1f} s",
            )
        return refuse(act.ReplyCode.CONFLICT, f"a leader's lease may still be valid; retry in {wait:.1f} s")
    pg = ctx.pg
    if pg is None or now - pg.observed_at > ctx.timing.election_timeout_max_s:
        return refuse(act.ReplyCode.CONFLICT, f"{ctx.name} has no recent probe of its PostgreSQL")
    if pg.role is not PgRole.STANDBY:
        return refuse(act.ReplyCode.CONFLICT, f"{ctx.name}'s PostgreSQL is {pg.role.value}, not a standby")
    ctx.emit(ev.OperatorFailover, allow_data_loss=req.allow_data_loss)
    start_election(ctx, now, transfer_from=None, operator=req)
    ctx.out.append(act.Reply(req.request_id, act.ReplyCode.OK, f"{ctx.name} is campaigning for term {ctx.term}"))
