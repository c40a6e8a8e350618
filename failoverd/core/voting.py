"""Voting behaviour of `failoverd.core.node.Node`: the refusal rules a voter
applies (lease promise, eligibility, cluster state, WAL check), pre-votes and
votes, taking over a hand-over to a candidate with less WAL, following a
switchover's target early, and starting a pre-vote or an election.

Kept apart from node.py so each file reads on its own; the mixin relies on the
attributes `Node.__init__` sets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from failoverd.core import actions as act
from failoverd.core.messages import PreVoteRequest, PreVoteResponse, VoteRequest, VoteResponse
from failoverd.core.quorum import Tally, vote_tally
from failoverd.core.spec import ReplicationMode
from failoverd.core.state import PgRole, Position, Role


def standing(position: Position | None, priority: int, name: str) -> tuple:
    """How strongly a member may stand, the same for choosing a hand-over's
    successor and for settling simultaneous pre-votes: more WAL, then higher
    priority, then the later name (a total order: of two, exactly one is
    stronger)."""
    return (position is not None, position or Position(1, 0), priority, name)


if TYPE_CHECKING:
    from failoverd.core.node import Node

LEASE_REFUSAL = "a leader's lease may still be valid here"
MAY_NOT_LEAD_REFUSAL = "candidate may not lead (witness or nofailover)"


class VotingMixin:
    # ----------------------------------------------------------------- voting

    def _vote_refusal(
        self: Node, candidate: str, position: Position | None, stamp, now: float, transfer_from: str | None,
        waive_wal_check: bool = False,
    ) -> str | None:
        waived = self._is_handover_from(transfer_from)
        if now < self.promise_until and not waived and "lease" not in self.disabled:
            return LEASE_REFUSAL
        if not self.spec.member(candidate).can_lead:
            return MAY_NOT_LEAD_REFUSAL
        if stamp < self.state.stamp:
            return "candidate's cluster state is older than mine"
        if waive_wal_check:
            return None
        if self._holds_more_wal_than(position):
            return f"candidate's WAL {position} is behind mine {self.pg.position}"
        if self.spec.replication.mode is ReplicationMode.ASYNC and "lsn-check" not in self.disabled:
            if self._lags_beyond_limit(position):
                return "candidate lags the last primary by more than max_lag_bytes"
        return None

    def _is_handover_from(self: Node, transfer_from: str | None) -> bool:
        return transfer_from is not None and transfer_from in (self.leader, self.name, self.released_by)

    def _holds_more_wal_than(self: Node, position: Position | None) -> bool:
        if not self.me.is_data or "lsn-check" in self.disabled:
            return False
        mine = None if self.pg is None else self.pg.position
        return mine is not None and (position is None or position < mine)

    def _vouches(self: Node, position: Position | None, waived: bool = False) -> bool:
        """Whether our WAL check of a candidate counts towards the data quorum.

        An unknown position (PostgreSQL unresponsive) vouches for nothing; an
        empty data directory vouches only for another empty one (bootstrap),
        since a wiped member no longer holds the commits it acknowledged.
        """
        if not self.me.is_data:
            return False
        if "lsn-check" in self.disabled or waived:
            return True
        if self.pg is None:
            return False
        mine = self.pg.position
        if mine is None:
            return self.pg.role is PgRole.ABSENT and position is None
        return position is not None and position >= mine

    def _on_pre_vote_request(self: Node, m: PreVoteRequest, now: float) -> None:
        reason = "stale term" if m.term <= self.term else self._vote_refusal(m.sender, m.position, m.stamp, now, None)
        self._send(
            m.sender,
            PreVoteResponse(
                **self._env(), granted=reason is None, vouches_wal=reason is None and self._vouches(m.position),
                reason=reason or "",
            ),
        )
        if (reason is None and self.role is Role.PRE_CANDIDATE and m.term == self.term + 1
                and self._claim(m.sender, m.position) > self._claim(self.name, self._my_position())):
            # Two members that timed out together would both pass the pre-vote
            # and split the vote, costing another election timeout: the weaker
            # claim steps back (liveness only; votes decide safety).
            self.role = Role.FOLLOWER
            self.election_deadline = now + self._random_timeout()
            self._emit("pre_vote_yielded", to=m.sender, position=str(self._my_position()),
                       other_position=str(m.position))

    def _claim(self: Node, name: str, position: Position | None) -> tuple:
        return standing(position, self.spec.member(name).priority, name)

    def _on_vote_request(self: Node, m: VoteRequest, now: float) -> None:
        leader_before = self.leader
        handover = m.term > self.term and self._is_handover_from(m.transfer_from)
        reason = self._vote_refusal(m.sender, m.position, m.stamp, now, m.transfer_from, m.waive_wal_check)
        if m.term < self.term:
            reason = "stale term"
        elif reason in (LEASE_REFUSAL, MAY_NOT_LEAD_REFUSAL):
            pass  # do not even adopt the term: a live leader must not be disturbed
        else:
            if m.term > self.term:
                self._become_follower(m.term, now, reason=f"vote request from {m.sender}")
            if reason is None and self.voted_for not in (None, m.sender):
                reason = f"already voted for {self.voted_for} in term {self.term}"
            if reason is None:
                self.voted_for = m.sender
                self._persist(vote=True)
                self.election_deadline = now + self._random_timeout()
                self._emit("vote_granted", candidate=m.sender, transfer_from=m.transfer_from,
                           waive_wal_check=m.waive_wal_check)
                self._follow_successor_early(m, leader_before, now)
        if reason is not None:
            self._emit("vote_refused", candidate=m.sender, candidate_term=m.term, reason=reason)
        self._send(
            m.sender,
            VoteResponse(
                **self._env(), granted=reason is None,
                vouches_wal=reason is None and self._vouches(m.position, m.waive_wal_check),
                reason=reason or "",
            ),
        )
        if handover and self.term == m.term:  # a refusal that left our term alone releases nothing
            self.released_by = m.transfer_from
            self._take_over_handover(m, now)

    def _take_over_handover(self: Node, m: VoteRequest, now: float) -> None:
        """The leader handed over to a candidate with less WAL than ours (it
        chose by positions reported up to a heartbeat ago). That candidate
        cannot win the data quorum, so campaign for the same handover at once
        instead of after an election timeout."""
        if (self.role is not Role.FOLLOWER or self.voted_for is not None or m.waive_wal_check
                or m.transfer_from == self.name  # we stepped down so that another member can try
                or not self._holds_more_wal_than(m.position) or not self._may_campaign(now, transfer=True)):
            return
        self._emit("handover_taken_over", candidate=m.sender, transfer_from=m.transfer_from,
                   position=str(self._my_position()))
        self._start_election(now, transfer_from=m.transfer_from)

    def _follow_successor_early(self: Node, m: VoteRequest, leader_before: str | None, now: float) -> None:
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
        handover = self.handover
        pg = self.pg
        if not self.me.is_data or pg is None or pg.position is None or m.position is None or handover is None:
            return
        final = handover[1]
        if (m.transfer_from is None or m.transfer_from not in (leader_before, self.name)
                or handover[0] != m.term - 1 or self.state.switchover_to != m.sender
                or self.state.switchover_at is not None or pg.role not in (PgRole.STANDBY, PgRole.STOPPED)):
            return
        if not (pg.position.timeline == final.timeline == m.position.timeline and pg.position <= final <= m.position):
            return
        # Not through _request_once: it remembers one request, and this one
        # must not make a StartStandby asked for just before look new again.
        if self.cascade_requested == (m.sender, self.term):
            return
        self.cascade_requested = (m.sender, self.term)
        self.out.append(act.Follow(m.sender, self.term))
        self._emit("follow", leader=m.sender, pg_role=pg.role.value, before_promotion=True)

    def _on_vote_response(self: Node, m: PreVoteResponse | VoteResponse, now: float) -> None:
        if m.term > self.term and not m.granted:
            self._become_follower(m.term, now, reason=f"{m.sender} is in a later term")
            return
        pre = isinstance(m, PreVoteResponse)
        if (pre and self.role is not Role.PRE_CANDIDATE) or (not pre and self.role is not Role.CANDIDATE):
            return
        if not pre and m.term != self.term:
            return
        self.grants[m.sender] = m.granted
        if m.granted and m.vouches_wal:
            self.vouchers.add(m.sender)
        tally = vote_tally(self.voters, self.data_voters, self.grants, self.vouchers, self._data_votes_needed())
        if tally is Tally.WON:
            if pre:
                self._start_election(now, transfer_from=None)
            else:
                self._become_leader(now)
        elif tally is Tally.LOST:
            self._emit("election_lost", pre_vote=pre, grants=sorted(v for v, g in self.grants.items() if g))
            self.role = Role.FOLLOWER
            self.operator_failover = None
            self.election_deadline = now + self._random_timeout()

    def _may_campaign(self: Node, now: float, transfer: bool = False) -> bool:
        if not self.me.can_lead or self.pg is None:
            return False
        if self.state.paused and not transfer:
            return False
        if now < self.promise_until and not transfer and "lease" not in self.disabled:
            return False
        if now - self.pg.observed_at > self.timing.election_timeout_max_s:
            return False  # we know too little of our own PostgreSQL
        if self.pg.role is PgRole.STANDBY:
            return True
        # An uninitialised cluster: the first leader bootstraps with initdb.
        return self.pg.role is PgRole.ABSENT and self.state.primary is None

    def _start_pre_vote(self: Node, now: float) -> None:
        self.role = Role.PRE_CANDIDATE
        self.grants = {self.name: True}
        self.vouchers = {self.name} if self._vouches(self._my_position()) else set()
        self.election_deadline = now + self._random_timeout()
        self._emit("pre_vote_started", position=str(self._my_position()))
        request = PreVoteRequest(
            cluster=self.spec.name, sender=self.name, term=self.term + 1, position=self._my_position(), stamp=self.state.stamp
        )
        for peer in self.others:
            self._send(peer, request)

    def _start_election(self: Node, now: float, transfer_from: str | None) -> None:
        self.term += 1
        self.voted_for = self.name
        self.role = Role.CANDIDATE
        self.leader = None
        self.leader_primary_ready = False
        self.transfer_from = transfer_from
        self.grants = {self.name: True}
        waive = self.operator_failover is not None and self.operator_failover.allow_data_loss
        self.vouchers = {self.name} if self._vouches(self._my_position(), waive) else set()
        self.election_deadline = now + self._random_timeout()
        self._persist(vote=True)
        self._emit("election_started", transfer_from=transfer_from, position=str(self._my_position()),
                   waive_wal_check=waive)
        request = VoteRequest(
            **self._env(), position=self._my_position(), stamp=self.state.stamp, transfer_from=transfer_from,
            waive_wal_check=waive,
        )
        for peer in self.others:
            self._send(peer, request)
