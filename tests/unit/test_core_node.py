"""Follower, voter and candidate transitions of the protocol core (failoverd.core.node)."""

from __future__ import annotations

import copy
import statistics

import pytest
from core_helpers import (
    CLUSTER,
    LEASE_REFUSAL,
    T,
    Wire,
    env,
    events,
    first_index,
    kinds,
    make_node,
    make_spec,
    messages,
    obs,
    of_type,
    pos,
    sends,
    voter,
)

from failoverd.core import actions as act
from failoverd.core.messages import (
    Heartbeat,
    HeartbeatAck,
    PreVoteRequest,
    PreVoteResponse,
    ProtocolError,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from failoverd.core.node import Role
from failoverd.core.state import ClusterState, PersistentState, PgRole, StateStamp


def vote_req(sender="a", term=1, lsn=1000, **kw) -> VoteRequest:
    return VoteRequest(**env(sender, term), position=None if lsn is None else pos(lsn), **kw)


def pre_candidate(name="a", spec=None, now=2.0):
    node = make_node(spec or make_spec(), name)
    node.observe(obs(at=now), now)
    out = node.tick(now)
    assert node.role is Role.PRE_CANDIDATE, kinds(out)
    return node, out


def snapshot(node) -> dict:
    state = {k: copy.deepcopy(v) for k, v in vars(node.ctx).items() if k not in ("rng", "spec", "timing", "me")}
    state["rng"] = node.ctx.rng.getstate()
    return state


# ------------------------------------------------------------- construction


def test_unknown_safeguard_name_raises_value_error():
    with pytest.raises(ValueError, match="safeguard"):
        make_node(make_spec(), "a", disabled=["lease", "no-such-safeguard"])


def test_known_safeguards_are_accepted():
    node = make_node(make_spec(), "a", disabled=["lease", "lsn-check", "persist-vote"])
    assert node.ctx.disabled == {"lease", "lsn-check", "persist-vote"}


def test_non_member_name_raises_value_error():
    with pytest.raises(ValueError, match="not a member"):
        make_node(make_spec(), "zz")


def test_witness_cannot_observe_postgres():
    w = make_node(make_spec(data=2, witnesses=1), "w1")
    with pytest.raises(ValueError):
        w.observe(obs(), 0.0)


# ------------------------------------------------------- envelope rejection


def _all_message_kinds(cluster: str, sender: str, term: int) -> list:
    e = env(sender, term, cluster)
    return [
        PreVoteRequest(**e),
        PreVoteResponse(**e, granted=True),
        VoteRequest(**e),
        VoteResponse(**e, granted=True),
        Heartbeat(**e, seq=1, primary_ready=True),
        HeartbeatAck(**e, seq=1, success=True),
        TimeoutNow(**e),
    ]


def _nodes_in_various_roles():
    follower = voter("b", now=0.0)
    follower.receive(Heartbeat(**env("a", 1), seq=1, primary_ready=True), 1.5)
    w = Wire(make_spec())
    w.elect("a", now=2.0)
    return [("fresh", make_node(make_spec(), "b")), ("follower", follower), ("leader", w["a"])]


@pytest.mark.parametrize("case", ["wrong-cluster", "unknown-sender", "self-sender"])
def test_bad_envelope_raises_protocol_error_and_changes_nothing(case):
    for label, node in _nodes_in_various_roles():
        cluster, sender = {
            "wrong-cluster": ("other", "c"),
            "unknown-sender": (CLUSTER, "zz"),
            "self-sender": (CLUSTER, node.name),
        }[case]
        for msg in _all_message_kinds(cluster, sender, node.term + 5):
            before, persisted, role = snapshot(node), node.persistent_state(), node.role
            with pytest.raises(ProtocolError):
                node.receive(msg, 2.05)
            assert node.persistent_state() == persisted, (label, msg)
            assert node.role is role, (label, msg)
            assert snapshot(node) == before, (label, msg)
            assert node.tick(2.05) is not None  # still usable afterwards


# ----------------------------------------------------------------- pre-vote


def test_pre_vote_is_sent_at_term_plus_one_without_changing_term_or_vote():
    node, out = pre_candidate("a")
    assert node.term == 0 and node.voted_for is None
    assert of_type(out, act.Persist) == []
    reqs = messages(out, PreVoteRequest)
    assert sorted(s.to for s in of_type(out, act.Send)) == ["b", "c"]
    assert all(r.term == 1 and r.position == pos(1000) for r in reqs)


def test_voter_answers_pre_vote_without_changing_term_or_vote():
    b = voter("b")
    before = b.persistent_state()
    out = b.receive(PreVoteRequest(**env("a", 1), position=pos(1000)), 2.0)
    assert b.persistent_state() == before and b.role is Role.FOLLOWER
    assert of_type(out, act.Persist) == []
    (resp,) = messages(out, PreVoteResponse, to="a")
    assert resp.granted and resp.vouches_wal and resp.term == 0


def test_pre_vote_for_a_term_not_above_mine_is_refused_as_stale():
    b = voter("b", persisted=PersistentState(term=4))
    (resp,) = messages(b.receive(PreVoteRequest(**env("a", 4), position=pos(1000)), 2.0), PreVoteResponse)
    assert not resp.granted and resp.reason == "stale term" and resp.term == 4


def test_won_pre_vote_starts_election_persisting_before_vote_requests():
    a, _ = pre_candidate("a")
    out = a.receive(PreVoteResponse(**env("b", 0), granted=True, vouches_wal=True), 2.0)
    assert a.role is Role.CANDIDATE and a.term == 1 and a.voted_for == "a"
    (persist,) = of_type(out, act.Persist)
    assert persist.state.term == 1 and persist.state.voted_for == "a"
    assert first_index(out, act.Persist) < first_index(out, act.Send)
    reqs = messages(out, VoteRequest)
    assert len(reqs) == 2 and all(r.term == 1 and r.transfer_from is None for r in reqs)


def test_of_two_simultaneous_pre_candidates_the_weaker_claim_steps_back():
    """Both time out together after the leader died; both would pass the
    pre-vote and then split the vote, costing another election timeout. The
    one with less WAL (then lower priority, then the smaller name) steps back
    on hearing the other's pre-vote, and grants it."""
    a, _ = pre_candidate("a")  # at 1000
    out = a.receive(PreVoteRequest(**env("b", 1), position=pos(1200)), 2.0)
    (resp,) = messages(out, PreVoteResponse, to="b")
    assert resp.granted and a.role is Role.FOLLOWER and "pre_vote_yielded" in events(out)
    assert a.ctx.election_deadline > 2.0 + T.election_timeout_min_s - 1e-9
    # Grants that arrive for its own pre-vote start nothing now.
    out = a.receive(PreVoteResponse(**env("c", 0), granted=True, vouches_wal=True), 2.01)
    assert a.role is Role.FOLLOWER and messages(out, VoteRequest) == [] and a.term == 0


def test_equal_claims_are_settled_by_priority_then_name():
    spec = make_spec(priorities={"a": 100, "b": 50, "c": 100})
    a, _ = pre_candidate("a", spec=spec)
    a.receive(PreVoteRequest(**env("b", 1), position=pos(1000)), 2.0)  # lower priority: a stays
    assert a.role is Role.PRE_CANDIDATE
    a.receive(PreVoteRequest(**env("c", 1), position=pos(1000)), 2.0)  # same priority, "c" > "a"
    assert a.role is Role.FOLLOWER


def test_the_stronger_pre_candidate_goes_on():
    a, _ = pre_candidate("a")  # at 1000
    out = a.receive(PreVoteRequest(**env("b", 1), position=pos(900)), 2.0)
    (resp,) = messages(out, PreVoteResponse, to="b")
    assert not resp.granted and a.role is Role.PRE_CANDIDATE
    out = a.receive(PreVoteResponse(**env("c", 0), granted=True, vouches_wal=True), 2.01)
    assert a.role is Role.CANDIDATE and len(messages(out, VoteRequest)) == 2


def test_refused_pre_vote_from_later_term_makes_pre_candidate_adopt_it():
    a, _ = pre_candidate("a")
    out = a.receive(PreVoteResponse(**env("b", 7), granted=False, reason="stale term"), 2.0)
    assert a.role is Role.FOLLOWER and a.term == 7 and a.voted_for is None
    assert of_type(out, act.Persist)[0].state.term == 7


# ------------------------------------------------------------------ voting


def test_vote_is_persisted_before_the_vote_response_is_sent():
    b = voter("b")
    out = b.receive(vote_req("a", 1), 2.0)
    assert b.term == 1 and b.voted_for == "a"
    persists = of_type(out, act.Persist)
    assert persists and persists[-1].state.term == 1 and persists[-1].state.voted_for == "a"
    resp_index = next(i for i, x in enumerate(out) if isinstance(x, act.Send) and isinstance(x.message, VoteResponse))
    assert all(out.index(p) < resp_index for p in persists)
    resp = out[resp_index].message
    assert resp.granted and resp.vouches_wal and resp.term == 1 and out[resp_index].to == "a"


def test_one_vote_per_term_second_candidate_refused():
    b = voter("b")
    b.receive(vote_req("a", 1), 2.0)
    out = b.receive(vote_req("c", 1), 2.1)
    (resp,) = messages(out, VoteResponse, to="c")
    assert not resp.granted and "already voted for a" in resp.reason
    assert b.voted_for == "a" and of_type(out, act.Persist) == []


def test_repeated_request_from_the_same_candidate_is_granted_again():
    b = voter("b")
    b.receive(vote_req("a", 1), 2.0)
    (resp,) = messages(b.receive(vote_req("a", 1), 2.1), VoteResponse)
    assert resp.granted


def test_vote_remembered_across_restart_refuses_other_candidate_in_same_term():
    b = voter("b", now=10.0, persisted=PersistentState(term=3, voted_for="a"))
    (resp,) = messages(b.receive(vote_req("c", 3), 11.5), VoteResponse)
    assert not resp.granted and "already voted" in resp.reason
    (resp,) = messages(b.receive(vote_req("c", 4), 11.6), VoteResponse)
    assert resp.granted and b.voted_for == "c" and b.term == 4


def test_candidate_refuses_rival_in_its_own_term():
    a, _ = pre_candidate("a")
    a.receive(PreVoteResponse(**env("b", 0), granted=True, vouches_wal=True), 2.0)
    (resp,) = messages(a.receive(vote_req("c", 1), 2.01), VoteResponse)
    assert not resp.granted and "already voted for a" in resp.reason


def test_voter_refuses_during_leader_promise_and_does_not_adopt_the_term():
    b = voter("b")
    b.receive(Heartbeat(**env("a", 1), seq=1), 2.0)  # promise until 3.0
    assert b.ctx.promise_until == pytest.approx(2.0 + T.election_timeout_min_s)
    before = b.persistent_state()
    out = b.receive(vote_req("c", 2), 2.9)
    (resp,) = messages(out, VoteResponse)
    assert not resp.granted and resp.reason == LEASE_REFUSAL
    assert b.persistent_state() == before and b.term == 1 and b.leader == "a"
    assert of_type(out, act.Persist) == []
    # The pre-vote is refused for the same reason.
    (pre,) = messages(b.receive(PreVoteRequest(**env("c", 2), position=pos(1000)), 2.9), PreVoteResponse)
    assert not pre.granted and pre.reason == LEASE_REFUSAL
    # Once the promise has run out the vote is granted.
    (resp,) = messages(b.receive(vote_req("c", 2), 3.0), VoteResponse)
    assert resp.granted and b.term == 2


def test_restarted_node_refuses_votes_for_election_timeout_min():
    b = voter("b", now=50.0, persisted=PersistentState(term=2))
    (resp,) = messages(b.receive(vote_req("a", 3), 50.0 + T.election_timeout_min_s - 0.01), VoteResponse)
    assert not resp.granted and resp.reason == LEASE_REFUSAL and b.term == 2
    (resp,) = messages(b.receive(vote_req("a", 3), 50.0 + T.election_timeout_min_s), VoteResponse)
    assert resp.granted and b.term == 3


def test_stale_vote_request_is_refused_without_state_change():
    b = voter("b", persisted=PersistentState(term=5))
    before = b.persistent_state()
    out = b.receive(vote_req("a", 4), 2.0)
    (resp,) = messages(out, VoteResponse)
    assert not resp.granted and resp.reason == "stale term" and resp.term == 5
    assert b.persistent_state() == before and of_type(out, act.Persist) == []


def test_stale_heartbeat_is_rejected_and_does_not_renew_promise_or_leader():
    b = voter("b", persisted=PersistentState(term=5))
    promise = b.ctx.promise_until
    out = b.receive(Heartbeat(**env("a", 4), seq=9, primary_ready=True), 2.0)
    (ack,) = messages(out, HeartbeatAck, to="a")
    assert not ack.success and ack.reason == "stale term" and ack.term == 5 and ack.seq == 9
    assert b.leader is None and b.ctx.promise_until == promise and b.term == 5
    assert of_type(out, act.Follow) == []


def test_stale_vote_response_is_ignored_by_candidate():
    a, _ = pre_candidate("a", now=2.0)
    a.receive(PreVoteResponse(**env("b", 0), granted=True, vouches_wal=True), 2.0)
    a.receive(VoteResponse(**env("b", 0), granted=True, vouches_wal=True), 2.0)
    a.receive(VoteResponse(**env("c", 0), granted=True, vouches_wal=True), 2.0)
    assert a.role is Role.CANDIDATE and a.ctx.candidacy.grants == {"a": True}


def test_data_voter_with_more_wal_refuses():
    b = voter("b", lsn=2000)
    (resp,) = messages(b.receive(vote_req("a", 1, lsn=1999), 2.0), VoteResponse)
    assert not resp.granted and not resp.vouches_wal and "behind mine" in resp.reason
    assert b.voted_for is None and b.term == 1  # the term is adopted, the vote is not given


def test_higher_timeline_beats_higher_lsn():
    b = voter("b", lsn=5000)  # timeline 1
    req = VoteRequest(**env("a", 1), position=pos(10, timeline=2))
    (resp,) = messages(b.receive(req, 2.0), VoteResponse)
    assert resp.granted and resp.vouches_wal


def test_candidate_without_position_is_refused_by_voter_with_one():
    b = voter("b", lsn=10)
    (resp,) = messages(b.receive(vote_req("a", 1, lsn=None), 2.0), VoteResponse)
    assert not resp.granted


def test_data_voter_with_less_or_equal_wal_grants_and_vouches():
    for mine in (999, 1000):
        b = voter("b", lsn=mine)
        (resp,) = messages(b.receive(vote_req("a", 1, lsn=1000), 2.0), VoteResponse)
        assert resp.granted and resp.vouches_wal


def test_data_voter_without_probe_grants_without_vouching():
    b = voter("b", lsn=None)
    (resp,) = messages(b.receive(vote_req("a", 1), 2.0), VoteResponse)
    assert resp.granted and not resp.vouches_wal


def test_witness_grants_without_vouching():
    w = voter("w1", spec=make_spec(data=2, witnesses=1))
    (resp,) = messages(w.receive(vote_req("a", 1, lsn=1), 2.0), VoteResponse)
    assert resp.granted and not resp.vouches_wal


def test_unresponsive_data_voter_with_unknown_position_does_not_vouch():
    b = voter("b", lsn=None)
    b.observe(obs(PgRole.UNRESPONSIVE, at=1.5, lsn=None), 1.5)
    (resp,) = messages(b.receive(vote_req("a", 1, lsn=10), 2.0), VoteResponse)
    assert not resp.vouches_wal


def test_witness_and_nofailover_candidates_are_refused():
    spec = make_spec(data=3, witnesses=1, nofailover=["c"])
    b = voter("b", spec=spec)
    for cand in ("w1", "c"):
        (resp,) = messages(b.receive(vote_req(cand, 1), 2.0), VoteResponse)
        assert not resp.granted and "may not lead" in resp.reason
    assert b.voted_for is None


def test_candidate_with_older_cluster_state_is_refused():
    state = ClusterState(stamp=StateStamp(3, 7), primary="a")
    b = voter("b", persisted=PersistentState(term=3, state=state))
    (resp,) = messages(b.receive(vote_req("c", 4, stamp=StateStamp(3, 6)), 2.0), VoteResponse)
    assert not resp.granted and "older" in resp.reason
    (resp,) = messages(b.receive(vote_req("c", 4, stamp=StateStamp(3, 7)), 2.0), VoteResponse)
    assert resp.granted


# ---------------------------------------------------------------- D-k rule


def test_three_data_k1_needs_two_vouching_data_members():
    a, _ = pre_candidate("a")
    a.receive(PreVoteResponse(**env("b", 0), granted=True, vouches_wal=False), 2.0)
    assert a.role is Role.PRE_CANDIDATE  # majority, but only a itself vouched
    a.receive(PreVoteResponse(**env("c", 0), granted=True, vouches_wal=True), 2.0)
    assert a.role is Role.CANDIDATE and a.term == 1
    a.receive(VoteResponse(**env("b", 1), granted=True, vouches_wal=False), 2.0)
    assert a.role is Role.CANDIDATE
    a.receive(VoteResponse(**env("c", 1), granted=True, vouches_wal=True), 2.0)
    assert a.role is Role.LEADER


def test_three_data_k1_without_second_voucher_loses():
    a, _ = pre_candidate("a")
    a.receive(PreVoteResponse(**env("b", 0), granted=True, vouches_wal=False), 2.0)
    out = a.receive(PreVoteResponse(**env("c", 0), granted=False, reason="behind"), 2.0)
    assert a.role is Role.FOLLOWER and a.term == 0 and "election_lost" in events(out)
    assert a.ctx.election_deadline > 2.0


def test_two_data_plus_witness_needs_only_the_candidate_to_vouch():
    spec = make_spec(data=2, witnesses=1)
    w = Wire(spec)
    w.drop("a", "b")
    w.elect("a", now=2.0)
    assert w["a"].role is Role.LEADER and w["a"].term == 1
    assert w["w1"].voted_for == "a" and w["b"].term == 0


def test_three_data_election_through_the_wire_with_one_peer_cut():
    w = Wire(make_spec())
    w.drop("a", "c")
    w.elect("a", now=2.0)
    assert w["a"].role is Role.LEADER and w["b"].leader == "a" and w["c"].term == 0


def test_election_lost_when_every_peer_has_more_wal():
    w = Wire(make_spec())
    w.elect("a", now=2.0, lsn={"a": 1000, "b": 1500, "c": 1500})
    assert w["a"].role is Role.FOLLOWER and w["a"].term == 0
    assert all(n.term == 0 and n.voted_for is None for n in w.nodes.values())


# ------------------------------------------------------------- campaigning


@pytest.mark.parametrize("name", ["c", "w1"])
def test_nofailover_and_witness_never_campaign(name):
    spec = make_spec(data=3, witnesses=1, nofailover=["c"])
    node = make_node(spec, name)
    for step in range(1, 60):
        now = step * 0.5
        if node.me.is_data:
            node.observe(obs(at=now), now)
        out = node.tick(now)
        assert sends(out) == [] and node.role is Role.FOLLOWER and node.term == 0


@pytest.mark.parametrize(
    ("label", "setup"),
    [
        ("no probe", lambda n: None),
        ("stale probe", lambda n: n.observe(obs(at=0.0), 0.0)),
        ("cluster initialised, pg absent", None),
    ],
)
def test_no_campaign_without_recent_standby_probe(label, setup):
    if setup is None:
        state = ClusterState(stamp=StateStamp(1, 2), primary="b", initialized=True)
        node = make_node(make_spec(), "a", persisted=PersistentState(term=1, state=state))
        node.observe(obs(PgRole.ABSENT, at=2.0, lsn=None), 2.0)
    else:
        node = make_node(make_spec(), "a")
        setup(node)
    assert sends(node.tick(2.0)) == [] and node.role is Role.FOLLOWER


def test_absent_postgres_campaigns_to_bootstrap_an_uninitialised_cluster():
    node = make_node(make_spec(), "a")
    node.observe(obs(PgRole.ABSENT, at=2.0, lsn=None), 2.0)
    node.tick(2.0)
    assert node.role is Role.PRE_CANDIDATE


def test_a_first_leader_that_died_before_its_initdb_finished_leaves_the_cluster_to_bootstrap():
    # Found by the simulator (a slow initdb, then the leader killed): with the
    # old rule (no campaign once a primary was named) every member stayed
    # empty and waited for ever.
    state = ClusterState(stamp=StateStamp(1, 1), primary="b")  # b was elected, never saw its server writable
    node = make_node(make_spec(), "a", persisted=PersistentState(term=1, state=state))
    node.observe(obs(PgRole.ABSENT, at=2.0, lsn=None), 2.0)
    node.tick(2.0)
    assert node.role is Role.PRE_CANDIDATE


def test_the_first_primary_records_that_the_cluster_is_initialised():
    w = Wire(make_spec())
    w.observe_data(2.0, role=PgRole.ABSENT, lsn=None)
    w.tick("a", 2.0)
    w.tick("a", 2.1)
    assert not w["a"].state.initialized
    w.observe("a", obs(PgRole.PRIMARY, at=2.2, lsn=10), 2.2)
    assert all(w[n].state.initialized for n in "abc")


def test_a_state_file_from_before_the_initialized_flag_loads_as_initialised_if_it_named_a_primary():
    old = ClusterState(stamp=StateStamp(3, 9), primary="b").to_wire()
    del old["initialized"]
    assert ClusterState.from_wire(old).initialized
    fresh = ClusterState().to_wire()
    del fresh["initialized"]
    assert not ClusterState.from_wire(fresh).initialized


def test_paused_cluster_does_not_campaign():
    state = ClusterState(stamp=StateStamp(1, 2), primary="b", paused=True)
    node = make_node(make_spec(), "a", persisted=PersistentState(term=1, state=state))
    node.observe(obs(at=2.0), 2.0)
    assert sends(node.tick(2.0)) == [] and node.role is Role.FOLLOWER


def test_restarted_node_does_not_campaign_before_its_promise_ends():
    node = make_node(make_spec(), "a", now=100.0)
    node.observe(obs(at=100.9), 100.9)
    node.ctx.election_deadline = 100.0  # even an expired deadline waits for the promise
    assert sends(node.tick(100.9)) == [] and node.role is Role.FOLLOWER
    node.ctx.election_deadline = 100.0
    assert sends(node.tick(101.0)) and node.role is Role.PRE_CANDIDATE


def test_election_timeouts_stay_within_configured_bounds():
    for seed in range(100):
        node = make_node(make_spec(), "b", seed=seed)
        assert T.election_timeout_min_s <= node.ctx.election_deadline <= T.election_timeout_max_s


def test_priority_biases_election_timeouts():
    spec = make_spec(priorities={"a": 300, "b": 200, "c": 100})
    means = {
        name: statistics.mean(make_node(spec, name, seed=seed).ctx.election_deadline for seed in range(300))
        for name in "abc"
    }
    assert means["a"] < means["b"] < means["c"]


def test_candidate_election_timeout_returns_to_pre_vote():
    a, _ = pre_candidate("a")
    a.receive(PreVoteResponse(**env("b", 0), granted=True, vouches_wal=True), 2.0)
    assert a.role is Role.CANDIDATE
    a.observe(obs(at=a.ctx.election_deadline), a.ctx.election_deadline)
    out = a.tick(a.ctx.election_deadline)
    assert "election_timed_out" in events(out) and a.role is Role.PRE_CANDIDATE and a.term == 1
    assert all(r.term == 2 for r in messages(out, PreVoteRequest))


def test_candidate_steps_back_on_heartbeat_of_its_term():
    a, _ = pre_candidate("a")
    a.receive(PreVoteResponse(**env("b", 0), granted=True, vouches_wal=True), 2.0)
    a.receive(Heartbeat(**env("c", 1), seq=1), 2.01)
    assert a.role is Role.FOLLOWER and a.leader == "c" and a.term == 1


# -------------------------------------------------- local PostgreSQL in line


def test_follower_with_primary_postgres_is_fenced_and_fence_is_retried_later():
    b = voter("b")
    out = b.observe(obs(PgRole.PRIMARY, at=2.0), 2.0)
    assert of_type(out, act.Fence) and of_type(out, act.ReleaseVip) == []
    assert of_type(b.observe(obs(PgRole.PRIMARY, at=2.5), 2.5), act.Fence) == []
    assert of_type(b.observe(obs(PgRole.PRIMARY, at=3.0), 3.0), act.Fence)


def test_follower_follows_leader_once_primary_ready():
    b = voter("b")
    out = b.receive(Heartbeat(**env("a", 1), seq=1, primary_ready=False), 2.0)
    assert of_type(out, act.Follow) == [] and of_type(out, act.ProbeNow)
    out = b.receive(Heartbeat(**env("a", 1), seq=2, primary_ready=True), 2.1)
    assert of_type(out, act.Follow) == [act.Follow("a", 1)]
    # Not asked again while the first request is recent...
    assert of_type(b.receive(Heartbeat(**env("a", 1), seq=3, primary_ready=True), 2.2), act.Follow) == []
    # ...and never once the standby streams from the leader.
    b.observe(obs(PgRole.STANDBY, at=2.3, following="a"), 2.3)
    assert of_type(b.receive(Heartbeat(**env("a", 1), seq=4, primary_ready=True), 9.0), act.Follow) == []


def test_follower_with_stopped_postgres_starts_standby_when_no_primary_leader():
    b = make_node(make_spec(), "b")
    out = b.observe(obs(PgRole.STOPPED, at=0.5), 0.5)
    assert of_type(out, act.StartStandby) == [act.StartStandby()] and of_type(out, act.Follow) == []
    assert of_type(b.observe(obs(PgRole.STOPPED, at=1.0), 1.0), act.StartStandby) == []
    out = b.receive(Heartbeat(**env("a", 1), seq=1, primary_ready=False), 6.0)
    assert of_type(out, act.StartStandby) == [act.StartStandby()]
    out = b.receive(Heartbeat(**env("a", 1), seq=2, primary_ready=True), 6.1)
    assert of_type(out, act.Follow) == [act.Follow("a", 1)]


def test_heartbeat_with_newer_state_is_persisted_before_ack():
    b = voter("b")
    state = ClusterState(stamp=StateStamp(1, 1), primary="a")
    out = b.receive(Heartbeat(**env("a", 1), seq=1, state=state, commit_version=1), 2.0)
    assert b.state == state and b.ctx.commit_version == 1
    assert of_type(out, act.Persist)[-1].state.state == state
    ack_i = next(i for i, x in enumerate(out) if isinstance(x, act.Send))
    assert max(i for i, x in enumerate(out) if isinstance(x, act.Persist)) < ack_i
    assert out[ack_i].message.accepted == StateStamp(1, 1)


def test_heartbeat_ack_position_is_fresh_only_for_probes_after_leader_known():
    b = voter("b", now=0.0)  # probed at 0.0
    (ack,) = messages(b.receive(Heartbeat(**env("a", 1), seq=1), 2.0), HeartbeatAck)
    assert ack.success and ack.position == pos(1000) and not ack.position_fresh and ack.pg_healthy
    b.observe(obs(at=2.05, lsn=1100, following="a"), 2.05)
    (ack,) = messages(b.receive(Heartbeat(**env("a", 1), seq=2), 2.1), HeartbeatAck)
    assert ack.position_fresh and ack.position == pos(1100) and ack.following_leader


def test_older_probe_finishing_late_is_ignored():
    b = voter("b")
    b.observe(obs(at=5.0, lsn=2000), 5.0)
    b.observe(obs(PgRole.PRIMARY, at=4.0, lsn=1), 5.1)
    assert b.pg.observed_at == 5.0 and b.pg.position == pos(2000)
