"""Probe cadence (failoverd.core.probing): a server where the cluster wants it
is probed every `Timing.healthy_probe_interval_s`, anything else every
heartbeat."""

from __future__ import annotations

import dataclasses

import pytest
from core_helpers import T, Wire, env, make_spec, messages, obs, pos, switchover
from test_core_leader import promoted, ready_for_switchover

from failoverd.core import actions as act
from failoverd.core.messages import PreVoteRequest, TimeoutNow, VoteRequest
from failoverd.core.node import Role
from failoverd.core.requests import Switchover
from failoverd.core.spec import SpecError, Timing
from failoverd.core.state import PgObservation, PgRole

HB = T.heartbeat_interval_s
SLOW = T.healthy_probe_interval_s


def settled_cluster() -> Wire:
    """a promoted and seen primary; b and c streaming from it, each with a
    position probed after it heard a."""
    w = promoted()
    w.tick_all(2.2)  # the heartbeat that tells b and c that a is writable
    for n in ("b", "c"):
        w.observe(n, obs(PgRole.STANDBY, at=2.25, lsn=1000, following="a"), 2.25)
    return w


def test_the_default_is_five_heartbeats_and_can_be_set():
    assert Timing().healthy_probe_interval_s == pytest.approx(0.5)
    assert Timing(probe_interval_s=2.0).healthy_probe_interval_s == 2.0
    with pytest.raises(SpecError, match="probe_interval_s"):
        Timing(probe_interval_s=0.05)  # shorter than a heartbeat
    with pytest.raises(SpecError, match="probe_interval_s"):
        Timing(probe_interval_s=61)


def test_a_settled_cluster_probes_at_the_healthy_interval():
    w = settled_cluster()
    assert [w[n].probe_interval() for n in "abc"] == [SLOW, SLOW, SLOW]


def test_a_member_before_its_first_probe_or_a_candidate_probes_every_heartbeat():
    w = Wire(make_spec())
    assert [w[n].probe_interval() for n in "abc"] == [HB, HB, HB]
    w = promoted()  # a elected and promoted, the followers not yet streaming from it
    assert w["a"].probe_interval() == SLOW
    assert w["b"].probe_interval() == HB


@pytest.mark.parametrize(
    "seen",
    [
        PgObservation(PgRole.UNRESPONSIVE, 2.3),
        PgObservation(PgRole.UNRESPONSIVE, 2.3, stalled=True),
        PgObservation(PgRole.STOPPED, 2.3),
        obs(PgRole.STANDBY, at=2.3),
    ],
    ids=["unresponsive", "stalled", "stopped", "in-recovery"],
)
def test_a_leader_whose_primary_is_in_question_probes_every_heartbeat(seen):
    w = settled_cluster()
    w.observe("a", seen, 2.3)
    assert w["a"].probe_interval() == HB


@pytest.mark.parametrize(
    "seen",
    [
        PgObservation(PgRole.UNRESPONSIVE, 2.3),
        PgObservation(PgRole.STOPPED, 2.3),
        obs(PgRole.STANDBY, at=2.3, following=None),  # not streaming
        obs(PgRole.STANDBY, at=2.3, following="c"),  # from someone else than the leader
        obs(PgRole.PRIMARY, at=2.3),
    ],
    ids=["unresponsive", "stopped", "not-streaming", "other-upstream", "primary"],
)
def test_a_follower_whose_standby_is_in_question_probes_every_heartbeat(seen):
    w = settled_cluster()
    w.observe("b", seen, 2.3)
    assert w["b"].probe_interval() == HB
    w.observe("b", obs(PgRole.STANDBY, at=2.4, following="a"), 2.4)
    assert w["b"].probe_interval() == SLOW


def test_a_follower_of_a_new_leader_probes_every_heartbeat_until_its_position_is_fresh():
    w = settled_cluster()
    w["b"].ctx.leader_since = 2.5  # b heard a (again) after its last probe
    assert w["b"].probe_interval() == HB


def test_a_switchover_under_way_makes_every_member_watchful():
    w = settled_cluster()
    w["a"].ctx.state = dataclasses.replace(w["a"].ctx.state, switchover_to="b")
    assert w["a"].probe_interval() == HB


def test_a_switchover_makes_the_leader_watchful():
    w = ready_for_switchover()
    assert w["a"].probe_interval() == SLOW
    switchover(w["a"], Switchover(8, "b"), 2.3)
    assert w["a"].state.switchover_to == "b"
    assert w["a"].role is Role.LEADER and w["a"].probe_interval() == HB


# ------------------------------------------- standing on a fresh position


def _silent_leader(w: Wire, heard_until: float = 2.3) -> float:
    """a stops reaching b and c after they last heard it at `heard_until`;
    returns the time b's election deadline passes (its promise has run out)."""
    w.tick_all(heard_until)
    w.isolate("a")
    return max(w["b"].ctx.election_deadline, w["b"].ctx.promise_until) + 0.001


def test_a_member_whose_position_is_old_probes_before_it_stands():
    w = settled_cluster()  # b last probed at 2.25
    t = _silent_leader(w)
    out = w.tick("b", t)["b"]
    assert any(isinstance(a, act.ProbeNow) for a in out)
    assert messages(out, PreVoteRequest) == [] and w["b"].role is Role.FOLLOWER
    out = w.observe("b", obs(PgRole.STANDBY, at=t + 0.005, lsn=1200, following="a"), t + 0.01)["b"]
    assert w["b"].role is not Role.FOLLOWER
    assert [m.position for m in messages(out, PreVoteRequest)] == [pos(1200), pos(1200)]


def test_a_probe_that_does_not_come_back_in_time_delays_standing_by_one_heartbeat_at_most():
    w = settled_cluster()
    t = _silent_leader(w)
    w.tick("b", t)
    assert w["b"].next_wakeup() == pytest.approx(t + HB)
    out = w.tick("b", t + HB)["b"]
    assert [m.position for m in messages(out, PreVoteRequest)] == [pos(1000), pos(1000)]  # the 2.25 probe's


def test_a_leader_heard_while_the_probe_runs_cancels_the_candidacy():
    w = settled_cluster()
    t = _silent_leader(w)
    w.tick("b", t)
    w.heal()
    w.tick("a", t + 0.002)  # a's heartbeat reaches b: a is alive after all
    out = w.observe("b", obs(PgRole.STANDBY, at=t + 0.005, lsn=1200, following="a"), t + 0.01)["b"]
    assert messages(out, PreVoteRequest) == [] and w["b"].role is Role.FOLLOWER


def test_a_transfer_target_with_an_old_position_probes_then_campaigns_at_once():
    w = settled_cluster()
    b = w["b"]
    out = b.receive(TimeoutNow(**env("a", 1)), 2.6)
    assert any(isinstance(a, act.ProbeNow) for a in out) and b.role is Role.FOLLOWER
    out = b.observe(obs(PgRole.STANDBY, at=2.605, lsn=1200), 2.61)
    requests = messages(out, VoteRequest)
    assert b.role is Role.CANDIDATE and [(r.transfer_from, r.position) for r in requests] == [("a", pos(1200))] * 2


def test_a_transfer_target_whose_probe_is_slow_campaigns_a_heartbeat_later():
    w = settled_cluster()
    b = w["b"]
    b.receive(TimeoutNow(**env("a", 1)), 2.6)
    out = b.tick(2.6 + HB)
    assert b.role is Role.CANDIDATE and {r.transfer_from for r in messages(out, VoteRequest)} == {"a"}


def test_every_data_member_probes_ahead_of_its_deadline_not_when_a_pre_vote_arrives():
    w = settled_cluster()
    t = _silent_leader(w)
    c = w["c"]
    out = c.receive(PreVoteRequest(**env("b", 2), position=pos(1000), stamp=c.state.stamp), t)
    assert not any(isinstance(a, act.ProbeNow) for a in out)
    ahead = c.ctx.election_deadline - 2 * HB
    assert c.next_wakeup() == pytest.approx(ahead)
    assert any(isinstance(a, act.ProbeNow) for a in c.tick(ahead))


def test_a_silent_leader_gets_the_probe_asked_for_ahead_so_the_member_stands_at_its_deadline():
    w = settled_cluster()
    t = _silent_leader(w)
    b = w["b"]
    ahead = b.ctx.election_deadline - 2 * HB
    assert b.next_wakeup() == pytest.approx(ahead)
    assert not any(isinstance(a, act.ProbeNow) for a in w.tick("b", ahead - 0.01)["b"])
    assert any(isinstance(a, act.ProbeNow) for a in w.tick("b", ahead)["b"])
    assert b.next_wakeup() == b.ctx.election_deadline  # asked once per deadline
    w.observe("b", obs(PgRole.STANDBY, at=ahead + 0.005, lsn=1200, following="a"), ahead + 0.01)
    out = w.tick("b", t)["b"]
    assert [m.position for m in messages(out, PreVoteRequest)] == [pos(1200), pos(1200)]


def test_a_leader_heard_moves_the_probe_ahead_on_with_the_deadline():
    w = settled_cluster()
    b = w["b"]
    first = b.next_wakeup()
    w.tick_all(2.3)  # a heartbeat: the deadline, and the probe ahead of it, move on
    assert b.next_wakeup() > first
    assert not any(isinstance(a, act.ProbeNow) for a in w.tick("b", first)["b"])
