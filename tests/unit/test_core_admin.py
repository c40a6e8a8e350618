"""Admin requests in the core: scheduled switchover, cancel, operator failover
(with and without a live leader, with and without data loss allowed), and
history notes."""

from __future__ import annotations

import pytest
from core_helpers import T, Wire, env, events, kinds, make_spec, obs, of_type, pos, switchover
from test_core_leader import elected, promoted, ready_for_switchover, run

from failoverd.core import actions as act
from failoverd.core.messages import ProtocolError, TimeoutNow, VoteRequest, decode_message, encode_message
from failoverd.core.requests import CancelSwitchover, Failover, Pause, RecordEvent, Switchover
from failoverd.core.state import ClusterState, PgRole, Role

WALL = 1_800_000_000.0  # a wall-clock time for the scheduling tests


def reply_of(out) -> act.Reply:
    (reply,) = of_type(out, act.Reply)
    return reply


def request(w: Wire, name: str, req, now: float):
    return w.deliver(name, w[name].request(req, now), now)


def wall_tick(w: Wire, name: str, now: float, wall: float):
    return w.deliver(name, w[name].tick(now, wall_time=wall), now)


# ------------------------------------------------------- scheduled switchover


def scheduled(target="b", at=WALL + 60) -> Wire:
    w = ready_for_switchover()
    wall_tick(w, "a", 2.26, WALL)
    out = request(w, "a", Switchover(1, target, at), 2.27)
    assert reply_of(out["a"]).ok, reply_of(out["a"])
    return w


def test_scheduled_switchover_is_stored_replicated_and_waits():
    w = scheduled()
    a = w["a"]
    assert (a.state.switchover_to, a.state.switchover_at) == ("b", WALL + 60)
    assert of_type(w.log["a"], act.Demote) == [] and a.lead.transfer is None
    assert w["b"].state.switchover_at == WALL + 60  # carried by the heartbeat
    out = wall_tick(w, "a", 2.3, WALL + 59)
    assert of_type(out["a"], act.Demote) == []


def test_scheduled_switchover_starts_when_due():
    w = scheduled()
    w.observe("b", obs(at=2.29, following="a"), 2.29)
    out = wall_tick(w, "a", 2.3, WALL + 60)
    assert of_type(out["a"], act.Demote) == [act.Demote("switchover")]
    a = w["a"]
    assert a.lead.transfer.target == "b" and a.lead.transfer.reason == "scheduled switchover"
    assert (a.state.switchover_to, a.state.switchover_at) == ("b", None)


def test_scheduled_switchover_dropped_with_history_when_target_unhealthy_at_due_time():
    w = scheduled()
    w.observe("b", obs(PgRole.STOPPED, at=2.29), 2.29)
    w.tick("a", 2.38)  # a heartbeat round: a learns that b stopped
    out = wall_tick(w, "a", 2.39, WALL + 61)
    assert of_type(out["a"], act.Demote) == [] and "switchover_dropped" in events(out["a"])
    a = w["a"]
    assert a.state.switchover_at is None and a.role is Role.LEADER
    assert a.state.history[-1].reason.startswith("scheduled switchover dropped: b is not a healthy standby")


@pytest.mark.parametrize(
    ("req", "text"),
    [
        (Switchover(2, "zz", WALL + 60), "not a member"),
        (Switchover(2, "a", WALL + 60), "already the primary"),
    ],
)
def test_schedule_refused_for_bad_target(req, text):
    w = ready_for_switchover()
    wall_tick(w, "a", 2.26, WALL)
    reply = reply_of(w["a"].request(req, 2.27))
    assert not reply.ok and text in reply.message and w["a"].state.switchover_at is None


def test_second_schedule_and_immediate_switchover_refused_while_one_is_scheduled():
    w = scheduled()
    for req in (Switchover(2, "c", WALL + 90), Switchover(3, "c")):
        reply = reply_of(w["a"].request(req, 2.3))
        assert not reply.ok and "already scheduled" in reply.message
    assert w["a"].state.switchover_to == "b"


def test_cancel_scheduled_switchover():
    w = scheduled()
    out = request(w, "a", CancelSwitchover(5), 2.3)
    assert reply_of(out["a"]) == act.Reply(5, act.ReplyCode.OK, "scheduled switchover cancelled")
    assert w["a"].state.switchover_at is None and w["b"].state.switchover_at is None
    assert not reply_of(w["a"].request(CancelSwitchover(6), 2.31)).ok


def test_scheduled_switchover_survives_a_change_of_leader():
    w = scheduled(target="c")
    w.isolate("a")
    run(w, 2.3, 5.0)
    leaders = [n for n in ("b", "c") if w[n].role is Role.LEADER]
    assert len(leaders) == 1
    state = w[leaders[0]].state
    assert (state.switchover_to, state.switchover_at) == ("c", WALL + 60)
    assert state.primary == leaders[0]


def test_past_time_means_now():
    w = ready_for_switchover()
    wall_tick(w, "a", 2.26, WALL)
    out = switchover(w["a"], Switchover(1, "b", WALL - 5), 2.27)
    assert reply_of(out).ok and of_type(out, act.Demote) == [act.Demote("switchover")]


# ---------------------------------------------------------- operator failover


def test_failover_on_leader_is_allowed_while_paused_and_ignores_lag_bound():
    w = promoted(lsn=100 * 1024 * 1024)
    request(w, "a", Pause(1), 2.2)
    w.observe("b", obs(at=2.25, lsn=100 * 1024 * 1024 - T.switchover_max_lag_bytes - 1, following="a"), 2.25)
    w.tick("a", 2.31)  # a heartbeat round: a learns b's position
    assert not reply_of(switchover(w["a"], Switchover(2, "b"), 2.32)).ok  # paused
    out = request(w, "a", Failover(3, "b"), 2.33)
    assert reply_of(out["a"]) == act.Reply(3, act.ReplyCode.OK, "failover to b started")
    assert of_type(out["a"], act.Demote) == [act.Demote("switchover")]
    assert w["a"].lead.transfer.reason == "operator failover"


def test_failover_to_leader_itself_refused():
    w = ready_for_switchover()
    reply = reply_of(w["a"].request(Failover(1, "a"), 2.3))
    assert not reply.ok and "already the leader" in reply.message


def test_failover_at_target_goes_to_the_leader_while_it_is_alive():
    w = ready_for_switchover()
    reply = reply_of(w["b"].request(Failover(1, "b"), 2.3))
    assert reply.code is act.ReplyCode.REDIRECT and reply.redirect == "a"
    assert w["b"].role is Role.FOLLOWER and w["b"].term == 1


def test_failover_at_a_member_that_is_neither_leader_nor_target_refused():
    w = ready_for_switchover()
    reply = reply_of(w["c"].request(Failover(1, "b"), 2.3))
    assert not reply.ok and "not the leader" in reply.message


def paused_with_dead_leader(lsn_b=1000, lsn_c=1000) -> tuple[Wire, float]:
    """a led and paused the cluster, then vanished; b and c have waited past their promise."""
    w = promoted()
    request(w, "a", Pause(1), 2.2)
    assert w["b"].state.paused and w["c"].state.paused
    w.isolate("a")
    now = run(w, 2.3, 2.3 + T.election_timeout_max_s * 2)
    assert all(w[n].role is Role.FOLLOWER and w[n].term == 1 for n in ("b", "c"))  # pause: nobody campaigns
    w.observe("b", obs(at=now, lsn=lsn_b, following=None), now)
    w.observe("c", obs(at=now, lsn=lsn_c, following=None), now)
    return w, now


def test_failover_at_target_without_live_leader_campaigns_even_when_paused():
    w, now = paused_with_dead_leader()
    out = request(w, "b", Failover(7, "b"), now)
    assert reply_of(out["b"]) == act.Reply(7, act.ReplyCode.OK, "b is campaigning for term 2")
    b = w["b"]
    assert b.role is Role.LEADER and b.term == 2
    assert b.state.history[-1].reason == "operator failover"
    w.observe("b", obs(at=now + 0.05), now + 0.05)
    w.observe("c", obs(at=now + 0.05), now + 0.05)
    w.tick("b", now + 0.1)
    assert of_type(w.log["b"], act.Promote) == [act.Promote(2)]


def test_failover_without_data_loss_cannot_elect_a_member_behind_a_voter():
    w, now = paused_with_dead_leader(lsn_b=1000, lsn_c=2000)
    out = request(w, "b", Failover(8, "b"), now)
    assert reply_of(out["b"]).ok  # the campaign started ...
    assert w["b"].role is not Role.LEADER  # ... but c refused: its WAL is ahead
    assert any("behind mine" in e.event.fields().get("reason", "") for e in of_type(out["c"], act.Emit))


def test_failover_with_data_loss_allowed_elects_and_promotes_a_member_behind():
    w, now = paused_with_dead_leader(lsn_b=1000, lsn_c=2000)
    request(w, "b", Failover(9, "b", allow_data_loss=True), now)
    b = w["b"]
    assert b.role is Role.LEADER and b.lead.wal_check_waived
    assert b.state.history[-1].reason == "operator failover (data loss allowed)"
    w.observe("b", obs(at=now + 0.05, lsn=1000), now + 0.05)
    w.observe("c", obs(at=now + 0.05, lsn=2000), now + 0.05)
    w.tick("b", now + 0.1)
    assert of_type(w.log["b"], act.Promote) == [act.Promote(2)]


def test_failover_with_data_loss_still_respects_the_lease_promise():
    """A voter that heard a live leader recently refuses even a waived vote."""
    w = ready_for_switchover()
    b = w["b"]
    msg = VoteRequest(**env("c", 2), position=pos(1), stamp=b.state.stamp, waive_wal_check=True)
    out = b.receive(msg, 2.3)
    (sent,) = [s.message for s in of_type(out, act.Send)]
    assert not sent.granted and "lease" in sent.reason and b.term == 1


def test_failover_refused_at_a_witness_or_nofailover_target():
    w = Wire(make_spec(nofailover=("b",)))
    reply = reply_of(w["b"].request(Failover(1, "b"), 5.0))
    assert not reply.ok and "may not become primary" in reply.message


# -------------------------------------------------------------- history notes


def test_record_event_appends_a_history_note_and_replicates_it():
    w = ready_for_switchover()
    out = request(w, "a", RecordEvent(4, "drill: write pause 0.31 s, 0 lost"), 2.3)
    assert reply_of(out["a"]).ok and kinds(out["a"])[0] == "Persist"
    for n in ("a", "b", "c"):
        assert w[n].state.history[-1].reason == "drill: write pause 0.31 s, 0 lost"


@pytest.mark.parametrize("reason", ["", "x" * 201])
def test_record_event_refuses_empty_or_long_notes(reason):
    w = ready_for_switchover()
    before = w["a"].state
    assert not reply_of(w["a"].request(RecordEvent(4, reason), 2.3)).ok
    assert w["a"].state == before


# ------------------------------------------------------------- wire formats


def test_vote_request_waive_flag_round_trips_and_must_be_boolean():
    msg = VoteRequest(**env("b", 3), waive_wal_check=True)
    assert decode_message(encode_message(msg)) == msg
    wire = encode_message(msg) | {"waive_wal_check": 1}
    with pytest.raises(ProtocolError):
        decode_message(wire)


def test_cluster_state_without_switchover_at_still_loads():
    wire = ClusterState(switchover_to="b").to_wire()
    del wire["switchover_at"]
    assert ClusterState.from_wire(wire).switchover_at is None


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 1e12, True, "soon"])
def test_cluster_state_rejects_bad_switchover_at(bad):
    with pytest.raises((TypeError, ValueError)):
        ClusterState.from_wire(ClusterState().to_wire() | {"switchover_at": bad})


# ------------------------------------------------------------ promotion failed


def test_promotion_failed_makes_the_leader_step_down_and_hand_over():
    w = elected()
    w.observe_data(2.05)
    w.tick("a", 2.1)
    assert of_type(w.log["a"], act.Promote) == [act.Promote(1)]
    out = w.deliver("a", w["a"].promotion_failed(1, "pre_promote hook exited 1", 2.12), 2.12, hold=(TimeoutNow,))
    assert w["a"].role is Role.FOLLOWER and "promotion_failed" in events(out["a"])
    assert of_type(out["a"], act.Fence)  # it asked PostgreSQL to promote: fence before handing over
    assert [s.to for s in w.held] in (["b"], ["c"])


def test_promotion_failed_for_another_term_or_after_promotion_changes_nothing():
    w = promoted()
    assert w["a"].promotion_failed(1, "late", 2.2) == []  # already primary
    assert w["a"].promotion_failed(7, "other term", 2.2) == []
    assert w["a"].role is Role.LEADER
