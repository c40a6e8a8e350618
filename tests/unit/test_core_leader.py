"""Leader transitions of the protocol core (failoverd.core.leader): cluster-state
commit, the guarded promotion, VIP, lease loss, self-fencing, leadership
transfer, switchover and pause/resume."""

from __future__ import annotations

import pytest
from core_helpers import (
    LEASE_REFUSAL,
    T,
    Wire,
    env,
    events,
    first_index,
    kinds,
    make_spec,
    messages,
    obs,
    of_type,
    pos,
    sends,
    switchover,
    voter,
)

from failoverd.core import actions as act
from failoverd.core.messages import Heartbeat, HeartbeatAck, TimeoutNow, VoteRequest, VoteResponse
from failoverd.core.node import InvariantViolation, Role
from failoverd.core.requests import Pause, Resume, Switchover
from failoverd.core.state import PgObservation, PgRole, StateStamp

MiB = 1024 * 1024
ELECTION_STAMP = StateStamp(1, 1)  # what a writes on winning term 1 in a fresh cluster


def ack(sender, seq, term=1, accepted=ELECTION_STAMP, lsn=1000, fresh=True, healthy=True, following=False):
    return HeartbeatAck(
        **env(sender, term),
        seq=seq,
        success=True,
        accepted=accepted,
        position=None if lsn is None else pos(lsn),
        position_fresh=fresh,
        pg_healthy=healthy,
        following_leader=following,
    )


def elected(**spec_kw) -> Wire:
    """a wins term 1 at t=2.0 from probes taken at 1.9: no fresh positions yet, no Promote."""
    w = Wire(make_spec(**spec_kw))
    out = w.elect("a", now=2.0, obs_at=1.9)
    assert w["a"].role is Role.LEADER and of_type(out["a"], act.Promote) == []
    return w


def elected_silent() -> Wire:
    """a wins term 1 at t=2.0 but none of its heartbeats is delivered: no ack, no lease, no commit."""
    w = Wire(make_spec())
    w.observe_data(2.0, at=1.9)
    w.tick("a", 2.0, hold=(Heartbeat,))
    assert w["a"].role is Role.LEADER and w["a"].lead.lease_ever is False
    return w


def promoted(lsn=1000, **spec_kw) -> Wire:
    """a is leader of term 1, promoted at 2.05 (as soon as the followers' probes
    report fresh positions), seen PRIMARY at 2.15 (VIP held, lease until 2.9)."""
    w = elected(**spec_kw)
    mark = len(w.log["a"])
    w.observe_data(2.05, lsn=lsn)
    w.tick("a", 2.1)
    assert of_type(w.log["a"][mark:], act.Promote) == [act.Promote(1)]
    out = w.observe("a", obs(PgRole.PRIMARY, at=2.15, lsn=lsn if isinstance(lsn, int) else lsn["a"]), 2.15)
    assert of_type(out["a"], act.AcquireVip) == [act.AcquireVip(1)]
    return w


def run(w: Wire, start: float, end: float, step: float = 0.1) -> float:
    """Tick every node every `step` from start (inclusive) to end (exclusive); returns the next time."""
    now = start
    while now < end - 1e-9:
        w.tick_all(now)
        now = round(now + step, 6)
    return now


# --------------------------------------------------------------- election


def test_winner_writes_and_persists_a_new_cluster_state_version():
    w = elected()
    a = w["a"]
    assert a.state.stamp == StateStamp(1, 1) and a.state.primary == "a"
    assert a.state.history[-1].to_node == "a" and a.state.history[-1].reason == "bootstrap"
    log = w.log["a"]
    persist = [p for p in of_type(log, act.Persist) if p.state.state.stamp == StateStamp(1, 1)]
    assert persist and persist[0].state.state.primary == "a" and persist[0].state.term == 1
    first_hb = next(i for i, x in enumerate(log) if isinstance(x, act.Send) and isinstance(x.message, Heartbeat))
    assert log.index(persist[0]) < first_hb
    # Followers adopt and persist it; a majority accepted it, so it is committed.
    for n in ("b", "c"):
        assert w[n].state == a.state and w[n].leader == "a"
        assert any(p.state.state == a.state for p in of_type(w.log[n], act.Persist))
    assert a.ctx.commit_version == 1


def test_new_leader_gives_up_without_a_first_quorum_of_acks():
    w = elected_silent()
    w.isolate("a")
    w.tick("a", 2.0 + T.election_timeout_min_s - 0.01)
    assert w["a"].role is Role.LEADER
    out = w.tick("a", 2.0 + T.election_timeout_min_s)
    assert w["a"].role is Role.FOLLOWER and "lease_lost" in events(out["a"])
    assert of_type(out["a"], act.Fence) == []  # nothing was ever writable


# ------------------------------------------------------------ promotion gate


def test_no_promote_before_state_committed_even_with_lease():
    w = elected_silent()
    a = w["a"]
    a.observe(obs(at=2.05), 2.05)
    out = a.receive(ack("b", 1, accepted=StateStamp(0, 0)), 2.06)  # lease yes, commit no
    assert a.lead.lease_ever and a.ctx.commit_version == 0
    assert of_type(out, act.Promote) == [] and a.lead.blocked_reason.startswith("cluster state")
    out = a.receive(ack("b", 1), 2.07)
    assert of_type(out, act.Promote) == [act.Promote(1)]


def test_no_promote_without_a_current_lease():
    w = elected_silent()
    a = w["a"]
    a.observe(obs(at=2.05), 2.05)
    out = a.receive(ack("b", 1), 2.0 + T.lease_s + 0.05)  # acknowledges a heartbeat sent at 2.0: lease ended
    assert a.role is Role.LEADER and a.ctx.commit_version == 1 and a.lead.lease_until == pytest.approx(2.0 + T.lease_s)
    assert of_type(out, act.Promote) == [] and a.lead.blocked_reason == "no lease"


def test_no_promote_without_own_probe_after_election():
    w = elected_silent()
    a = w["a"]
    out = a.receive(ack("b", 1), 2.05)
    assert of_type(out, act.Promote) == [] and "no probe" in a.lead.blocked_reason
    out = a.observe(obs(at=2.06), 2.06)
    assert of_type(out, act.Promote) == [act.Promote(1)]


def test_no_promote_until_d_minus_k_fresh_positions():
    w = elected_silent()
    a = w["a"]
    a.observe(obs(at=2.05), 2.05)
    out = a.receive(ack("b", 1, fresh=False), 2.06)
    assert (
        of_type(out, act.Promote) == []
        and a.lead.blocked_reason == "1 of 2 data members have confirmed our WAL is the longest"
    )
    out = a.receive(ack("c", 1, lsn=1001, fresh=True, healthy=False), 2.07)  # ahead of us: no evidence
    assert of_type(out, act.Promote) == [] and a.role is Role.LEADER
    out = a.receive(ack("b", 1, lsn=900, fresh=True), 2.08)
    assert of_type(out, act.Promote) == [act.Promote(1)]


def test_unresponsive_follower_does_not_confirm_leaders_wal():
    w = elected()
    w.drop("a", "c")  # only b can confirm, and b cannot probe its PostgreSQL
    w.observe("b", obs(PgRole.UNRESPONSIVE, at=2.05, lsn=None), 2.05)
    w.observe("a", obs(at=2.05), 2.05)
    out = w.tick("a", 2.1)["a"]
    # b cannot know its own WAL, so its ack must not count as a fresh confirmation.
    assert w["a"].lead.followers["b"].position is None and not w["a"].lead.followers["b"].position_fresh
    assert of_type(out, act.Promote) == []


def test_two_data_plus_witness_promotes_on_own_position_alone():
    w = Wire(make_spec(data=2, witnesses=1))
    w.drop("a", "b")
    w.observe_data(2.0, at=1.9)
    out = w.tick("a", 2.0)
    assert of_type(out["a"], act.Promote) == []  # own probe predates the election
    out = w.observe("a", obs(at=2.05), 2.05)
    assert of_type(out["a"], act.Promote) == [act.Promote(1)]


def test_configure_sync_and_arm_watchdog_precede_promote():
    w = elected()
    # Synchronous replication is configured on election (on a standby it takes
    # effect at promotion), well before the Promote.
    assert of_type(w.log["a"], act.ConfigureSync) == [act.ConfigureSync(1, ("b", "c"))]
    w.observe_data(2.05)
    out = w.log["a"]
    i_sync, i_arm, i_promote = (first_index(out, c) for c in (act.ConfigureSync, act.ArmWatchdog, act.Promote))
    assert i_sync < i_promote and i_arm < i_promote
    assert out[i_sync] == act.ConfigureSync(1, ("b", "c"))
    assert out[i_arm].deadline == pytest.approx(w["a"].lead.lease_until) and out[i_arm].deadline > 2.1


def test_vip_acquired_only_after_postgres_observed_primary():
    w = elected()
    mark = len(w.log["a"])
    w.observe_data(2.05)
    out = w.log["a"][mark:]
    assert of_type(out, act.Promote) and of_type(out, act.AcquireVip) == []
    assert of_type(w.observe("a", obs(PgRole.STANDBY, at=2.12), 2.12)["a"], act.AcquireVip) == []
    out = w.observe("a", obs(PgRole.PRIMARY, at=2.15), 2.15)["a"]
    assert of_type(out, act.AcquireVip) == [act.AcquireVip(1)] and w["a"].vip_held
    assert w["a"].lead.primary_ready
    assert of_type(w.observe("a", obs(PgRole.PRIMARY, at=2.2), 2.2)["a"], act.AcquireVip) == []


def test_followers_follow_once_leader_is_primary():
    w = elected()
    w.observe_data(2.05)
    w.tick_all(2.1)
    for n in ("b", "c"):
        assert of_type(w.log[n], act.Follow) == []
    # The observation that shows a promoted is followed by a heartbeat at
    # once, not at the next interval: b and c follow in the same step.
    out = w.observe("a", obs(PgRole.PRIMARY, at=2.12), 2.12)
    for n in ("b", "c"):
        assert of_type(out[n], act.Follow) == [act.Follow("a", 1)]
    assert messages(out["a"], Heartbeat)[-1].primary_ready


def test_lease_extension_rearms_the_watchdog():
    w = promoted()
    out = w.tick("a", 2.3)["a"]  # the first heartbeat due after the one sent on promotion (2.15)
    arms = of_type(out, act.ArmWatchdog)
    assert arms and arms[-1].deadline == pytest.approx(2.3 + T.lease_s)


def test_promotion_not_seen_in_time_steps_down_and_fences():
    w = elected()
    w.observe_data(2.05)
    w.tick("a", 2.1)
    run(w, 2.2, 2.1 + T.promote_timeout_s - 0.05)  # PostgreSQL never reports PRIMARY
    assert w["a"].role is Role.LEADER
    run(w, 2.1 + T.promote_timeout_s, 2.1 + T.promote_timeout_s + 0.25)
    assert w["a"].role is Role.FOLLOWER
    assert "promotion timed out" in [e.event.fields().get("reason") for e in of_type(w.log["a"], act.Emit)]
    assert of_type(w.log["a"], act.Fence) and of_type(w.log["a"], act.AcquireVip) == []


# ----------------------------------------------------------- losing the lease


def test_lease_loss_releases_vip_before_fence_and_becomes_follower():
    w = promoted()
    lease_until = w["a"].lead.lease_until
    w.isolate("a")
    out = w.tick("a", lease_until - 0.05)["a"]
    assert w["a"].role is Role.LEADER and of_type(out, act.Fence) == []
    out = w.tick("a", lease_until)["a"]
    assert w["a"].role is Role.FOLLOWER and w["a"].lead is None and not w["a"].vip_held
    assert first_index(out, act.ReleaseVip) < first_index(out, act.Fence)
    assert "lease_lost" in events(out)
    arm = of_type(out, act.ArmWatchdog)
    assert arm and arm[0].deadline == lease_until and out.index(arm[0]) > first_index(out, act.Fence)


def test_leader_with_the_lease_refuses_a_higher_term_vote_and_keeps_its_term():
    w = promoted()
    a = w["a"]
    out = a.receive(VoteRequest(**env("b", 5), position=pos(5000)), 2.2)
    (resp,) = messages(out, VoteResponse)
    assert not resp.granted and a.role is Role.LEADER and a.term == 1


def test_leader_steps_down_on_ack_from_a_later_term():
    w = promoted()
    a = w["a"]
    out = a.receive(HeartbeatAck(**env("b", 3), seq=1, success=False, reason="stale term"), 2.2)
    assert a.role is Role.FOLLOWER and a.term == 3
    assert first_index(out, act.ReleaseVip) < first_index(out, act.Fence)


def test_second_leader_in_same_term_is_an_invariant_violation():
    w = promoted()
    with pytest.raises(InvariantViolation):
        w["a"].receive(Heartbeat(**env("b", 1), seq=1), 2.2)


# ------------------------------------------------ failure of the leader's PG


def test_leader_postgres_stopped_fences_then_hands_over_to_most_advanced_follower():
    w = promoted(lsn=1000)
    w.observe("b", obs(at=2.3, lsn=1300, following="a"), 2.3)
    w.observe("c", obs(at=2.3, lsn=1200, following="a"), 2.3)
    w.tick("a", 2.35)
    out = w.observe("a", obs(PgRole.STOPPED, at=2.4, lsn=1300), 2.4)
    a_out = out["a"]
    assert w["a"].role is Role.FOLLOWER and w["a"].leader == "b" and not w["a"].vip_held
    i_fence = first_index(a_out, act.Fence)
    assert first_index(a_out, act.ReleaseVip) < i_fence
    tn = [i for i, x in enumerate(a_out) if isinstance(x, act.Send) and isinstance(x.message, TimeoutNow)]
    assert len(tn) == 1 and tn[0] > i_fence and a_out[tn[0]].to == "b"
    # b campaigned with transfer_from=a; c waived its promise to a and voted; b leads term 2.
    assert w["b"].role is Role.LEADER and w["b"].term == 2
    assert w["c"].voted_for == "b" and w["b"].state.history[-1].reason == "transfer"


def test_unhealthy_follower_is_not_chosen_as_successor():
    w = promoted(lsn=1000)
    w.observe("b", obs(PgRole.UNRESPONSIVE, at=2.3, lsn=1500), 2.3)
    w.observe("c", obs(at=2.3, lsn=1200, following="a"), 2.3)
    w.tick("a", 2.35)
    out = w.deliver("a", w["a"].observe(obs(PgRole.STOPPED, at=2.4, lsn=1300), 2.4), 2.4, hold=(TimeoutNow,))
    assert [s.to for s in w.held] == ["c"]
    assert of_type(out["a"], act.Fence)


def test_paused_leader_does_not_step_down_when_postgres_stops():
    w = promoted()
    w.deliver("a", w["a"].request(Pause(1), 2.2), 2.2)
    w.observe("a", obs(PgRole.STOPPED, at=2.25), 2.25)
    w.tick("a", 2.3)
    assert w["a"].role is Role.LEADER


def test_leader_hands_over_to_a_peer_with_more_wal():
    w = Wire(make_spec())
    w.elect("a", now=2.0, lsn={"a": 1000, "b": 1500, "c": 1000})
    assert any(
        e.event.NAME == "role_changed" and e.event.fields().get("role") == "leader" and e.event.fields()["term"] == 1
        for e in of_type(w.log["a"], act.Emit)
    )
    assert of_type(w.log["a"], act.Promote) == [] and of_type(w.log["a"], act.Fence) == []
    assert [m.term for m in messages(w.log["a"], TimeoutNow, to="b")] == [1]
    assert w["b"].role is Role.LEADER and w["b"].term == 2 and of_type(w.log["b"], act.Promote) == [act.Promote(2)]


# ----------------------------------------------------------- TimeoutNow


def _follower_of(leader="a", name="b", term=1, now=2.0):
    node = voter(name)
    node.receive(Heartbeat(**env(leader, term), seq=1, primary_ready=True), now)
    node.observe(obs(at=now, following=leader), now)
    return node


def test_timeout_now_makes_target_campaign_with_transfer_from():
    b = _follower_of("a")
    out = b.receive(TimeoutNow(**env("a", 1)), 2.1)
    assert b.role is Role.CANDIDATE and b.term == 2 and b.ctx.candidacy.transfer_from == "a"
    reqs = messages(out, VoteRequest)
    assert len(reqs) == 2 and all(r.transfer_from == "a" and r.term == 2 for r in reqs)
    assert first_index(out, act.Persist) < first_index(out, act.Send)


@pytest.mark.parametrize("msg", [TimeoutNow(**env("c", 1)), TimeoutNow(**env("a", 0)), TimeoutNow(**env("a", 2))])
def test_timeout_now_from_non_leader_or_other_term_is_ignored(msg):
    b = _follower_of("a")
    out = b.receive(msg, 2.1)
    assert b.role is Role.FOLLOWER and sends(out) == [] and b.term == 1


def test_voters_waive_promise_for_transfer_from_their_leader():
    c = _follower_of("a", name="c")
    (resp,) = messages(c.receive(VoteRequest(**env("b", 2), position=pos(1000), transfer_from="a"), 2.1), VoteResponse)
    assert resp.granted and c.voted_for == "b" and c.term == 2


def test_voters_keep_promise_when_transfer_from_is_not_their_leader():
    c = _follower_of("a", name="c")
    (resp,) = messages(c.receive(VoteRequest(**env("b", 2), position=pos(1000), transfer_from="b"), 2.1), VoteResponse)
    assert not resp.granted and resp.reason == LEASE_REFUSAL and c.term == 1


# ----------------------------------------------------------------- switchover


def ready_for_switchover(b_lsn=1000, b_following=True, b_role=PgRole.STANDBY, **spec_kw) -> Wire:
    w = promoted(**spec_kw)
    w.observe("b", obs(b_role, at=2.2, lsn=b_lsn, following="a" if b_following else None), 2.2)
    w.observe("c", obs(at=2.2, following="a"), 2.2)
    w.tick("a", 2.25)
    return w


def test_switchover_refused_by_non_leader():
    w = promoted()
    (reply,) = of_type(switchover(w["b"], Switchover(7, "c"), 2.2), act.Reply)
    assert reply.request_id == 7 and not reply.ok and "not the leader" in reply.message


def test_switchover_refused_when_paused():
    w = ready_for_switchover()
    w.deliver("a", w["a"].request(Pause(1), 2.3), 2.3)
    out = switchover(w["a"], Switchover(2, "b"), 2.3)
    assert of_type(out, act.Reply) == [act.Reply(2, act.ReplyCode.CONFLICT, "the cluster is paused")]
    assert of_type(out, act.Demote) == [] and w["a"].lead.transfer is None


def test_switchover_refused_when_target_lags():
    w = promoted(lsn=100 * MiB)
    w.observe("b", obs(at=2.2, lsn=100 * MiB - T.switchover_max_lag_bytes - 1, following="a"), 2.2)
    w.tick("a", 2.25)
    (reply,) = of_type(out := switchover(w["a"], Switchover(3, "b"), 2.3), act.Reply)
    assert not reply.ok and "lags by" in reply.message and of_type(out, act.Demote) == []


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"b_following": False}, "not a healthy standby"),
        ({"b_role": PgRole.UNRESPONSIVE}, "not a healthy standby"),
        ({"b_role": PgRole.STOPPED}, "not a healthy standby"),
    ],
)
def test_switchover_refused_when_target_not_healthy(kw, text):
    w = ready_for_switchover(**kw)
    (reply,) = of_type(out := switchover(w["a"], Switchover(4, "b"), 2.3), act.Reply)
    assert not reply.ok and text in reply.message
    assert of_type(out, act.Demote) == [] and of_type(out, act.ReleaseVip) == []


@pytest.mark.parametrize(("target", "text"), [("zz", "not a member"), ("a", "already the primary")])
def test_switchover_refused_for_bad_target(target, text):
    w = ready_for_switchover()
    (reply,) = of_type(switchover(w["a"], Switchover(5, target), 2.3), act.Reply)
    assert not reply.ok and text in reply.message


def test_switchover_refused_before_leader_is_primary():
    w = elected()
    (reply,) = of_type(switchover(w["a"], Switchover(6, "b"), 2.05), act.Reply)
    assert not reply.ok and "not yet a primary" in reply.message


def test_switchover_releases_vip_demotes_then_hands_over_when_target_caught_up():
    w = ready_for_switchover()
    a = w["a"]
    out = switchover(a, Switchover(8, "b"), 2.3)
    assert kinds(out) == ["Checkpoint", "Persist", "ReleaseVip", "Demote", "ProbeNow", "Reply"]
    assert of_type(out, act.Reply)[0].ok and a.state.switchover_to == "b"
    assert of_type(out, act.Persist)[0].state.state.switchover_to == "b"
    w.deliver("a", out, 2.3)
    # PostgreSQL stopped cleanly at 1200; b has only 1100: wait.
    w.observe("b", obs(at=2.35, lsn=1100, following="a"), 2.35)
    out = w.deliver("a", a.observe(obs(PgRole.STOPPED, at=2.4, lsn=1200), 2.4), 2.4)
    assert a.role is Role.LEADER and sends_timeout_now(out["a"]) == []
    out = w.tick("a", 2.45, hold=(TimeoutNow,))
    assert a.role is Role.LEADER and w.held == []
    # b reaches the final position and reports it right after its probe,
    # without waiting for a heartbeat: TimeoutNow to b.
    out = w.deliver("b", w["b"].observe(obs(at=2.5, lsn=1200, following="a"), 2.5), 2.5, hold=(TimeoutNow,))
    assert a.role is Role.FOLLOWER
    assert [(s.to, s.message.term) for s in w.held] == [("b", 1)]
    assert of_type(out["a"], act.AcquireVip) == []


def sends_timeout_now(out):
    return sends(out, TimeoutNow)


def test_switchover_long_after_promotion_is_not_aborted_as_promotion_timeout():
    w = promoted()
    now = run(w, 2.2, 2.1 + T.promote_timeout_s + 5.0)  # a healthy primary for ~10 s
    for n in ("b", "c"):
        w.observe(n, obs(at=now, following="a"), now)
    w.tick_all(now)
    a = w["a"]
    assert a.role is Role.LEADER
    out = w.deliver("a", switchover(a, Switchover(9, "b"), now + 0.01), now + 0.01)
    assert of_type(out["a"], act.Reply)[0].ok
    out = w.tick("a", now + 0.1, hold=(TimeoutNow,))
    assert a.role is Role.LEADER, [e.event.fields() for e in of_type(out["a"], act.Emit)]  # waits for PG to stop
    # b already acknowledged a position at or past the final one, so seeing the
    # server stopped completes the hand-over at once.
    out = w.deliver("a", a.observe(obs(PgRole.STOPPED, at=now + 0.2), now + 0.2), now + 0.2, hold=(TimeoutNow,))
    assert "switchover_caught_up" in events(out["a"])
    assert [s.to for s in w.held] == ["b"]
    assert a.role is Role.FOLLOWER


def test_switchover_aborted_after_transfer_timeout():
    w = ready_for_switchover()
    w.deliver("a", switchover(w["a"], Switchover(10, "b"), 2.3), 2.3)
    # PostgreSQL never reports stopped; the leader gives up and fences itself.
    run(w, 2.4, 2.3 + T.transfer_timeout_s - 0.05)
    assert w["a"].role is Role.LEADER and w["a"].lead.transfer is not None
    mark = len(w.log["a"])
    run(w, 2.3 + T.transfer_timeout_s, 2.3 + T.transfer_timeout_s + 0.25)
    out = w.log["a"][mark:]
    assert "switchover_aborted" in events(out) and of_type(out, act.Fence)
    assert sends_timeout_now(out) == []
    assert w["a"].role is Role.FOLLOWER or w["a"].term > 1


# -------------------------------------------------------------- pause/resume


def test_pause_and_resume_write_state_versions_and_reply():
    w = promoted()
    a = w["a"]
    v = a.state.stamp.version
    out = a.request(Pause(1), 2.2)
    assert a.state.paused and a.state.stamp == StateStamp(1, v + 1)
    assert act.Reply(1, act.ReplyCode.OK, "paused") in out
    assert first_index(out, act.Persist) < first_index(out, act.Send)
    assert all(m.state.paused for m in messages(out, Heartbeat))
    w.deliver("a", out, 2.2)
    assert w["b"].state.paused and w["c"].state.paused and a.ctx.commit_version == v + 1
    out = a.request(Pause(2), 2.25)  # already paused: no new version
    assert out == [act.Reply(2, act.ReplyCode.OK, "paused")] and a.state.stamp.version == v + 1
    out = a.request(Resume(3), 2.3)
    assert not a.state.paused and a.state.stamp.version == v + 2 and act.Reply(3, act.ReplyCode.OK, "resumed") in out


def test_pause_on_non_leader_is_refused():
    w = promoted()
    (reply,) = of_type(w["c"].request(Pause(4), 2.2), act.Reply)
    assert not reply.ok and not w["c"].state.paused


def test_shutdown_of_leader_fences_then_hands_over_to_best_follower():
    w = promoted()
    now = run(w, 2.2, 3.0)
    a = w["a"]
    out = a.shutdown(now)
    kinds = [type(x) for x in out if not isinstance(x, act.Emit)]
    assert kinds.index(act.ReleaseVip) < kinds.index(act.Fence) < kinds.index(act.Send)
    sends = of_type(out, act.Send)
    assert [type(s.message) for s in sends] == [TimeoutNow] and sends[0].to in ("b", "c")
    assert a.role is Role.FOLLOWER


def test_shutdown_of_follower_does_nothing():
    w = promoted()
    now = run(w, 2.2, 3.0)
    assert w["b"].shutdown(now) == []


# ------------------------------------------------------- a hung server


def _unresponsive_from(w: Wire, start: float, end: float, stalled: bool) -> list[str]:
    """a's PostgreSQL fails every probe from `start` (every 0.1 s, as the
    supervisor probes) until `end` while the cluster keeps ticking; the
    times at which a stepped down."""
    downs = []
    now = start
    while now < end - 1e-9:
        leading = w["a"].role is Role.LEADER
        w.observe("a", PgObservation(PgRole.UNRESPONSIVE, now, stalled=stalled), now)
        for n in ("b", "c"):
            w.observe(n, PgObservation(PgRole.STANDBY, now, pos(1000), "a"), now)
        w.tick_all(now)
        if leading and w["a"].role is not Role.LEADER:
            downs.append(f"{now:.2f}")
        now = round(now + 0.1, 6)
    return downs


def test_a_stalled_server_is_given_up_after_pg_stalled_s():
    w = promoted()
    downs = _unresponsive_from(w, 2.2, 2.2 + T.pg_stalled_s + 0.25, stalled=True)
    assert downs and float(downs[0]) == pytest.approx(2.2 + T.pg_stalled_s, abs=0.01)
    assert w["a"].role is Role.FOLLOWER


def test_a_server_that_only_fails_its_probes_keeps_pg_unresponsive_s():
    w = promoted()
    assert _unresponsive_from(w, 2.2, 2.2 + T.pg_unresponsive_s - 0.05, stalled=False) == []
    assert w["a"].role is Role.LEADER
    downs = _unresponsive_from(w, 2.2 + T.pg_unresponsive_s - 0.05, 2.2 + T.pg_unresponsive_s + 0.2, stalled=False)
    assert downs and w["a"].role is Role.FOLLOWER


def test_stall_evidence_must_hold_probe_after_probe():
    w = promoted()
    now = 2.2
    for i in range(30):  # 3 s of alternating evidence: never 1 s of stalled probes in a row
        stalled = i % 5 != 4
        w.observe("a", PgObservation(PgRole.UNRESPONSIVE, now, stalled=stalled), now)
        w.tick_all(now)
        if i < 29:
            assert w["a"].role is Role.LEADER, i
        now = round(now + 0.1, 6)
