"""Probe cadence (failoverd.core.probing): a server where the cluster wants it
is probed every `Timing.healthy_probe_interval_s`, anything else every
heartbeat."""

from __future__ import annotations

import dataclasses

import pytest
from core_helpers import T, Wire, make_spec, obs, switchover
from test_core_leader import promoted, ready_for_switchover

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
