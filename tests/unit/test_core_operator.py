"""Decisions the core took over from the API and the supervisor (issue #12):
which member answers a request (redirects), the reinit policy, the
checkpoint before a switchover, VIP outcomes, and the member status with
its leader liveness and last failover."""

from __future__ import annotations

import pytest
from core_helpers import T, Wire, events, make_spec, obs, of_type
from test_core_leader import promoted, ready_for_switchover, run

from failoverd.core import actions as act
from failoverd.core.actions import ReplyCode
from failoverd.core.requests import Failover, Pause, Reinit, Switchover
from failoverd.core.state import PgRole, Role
from failoverd.core.switchover import CHECKPOINT_AHEAD_S, CHECKPOINT_WAIT_S

WALL = 1_800_000_000.0


def reply_of(out) -> act.Reply:
    (reply,) = of_type(out, act.Reply)
    return reply


# ------------------------------------------------------------------ routing


def test_a_follower_redirects_to_the_live_leader():
    w = promoted()
    reply = reply_of(w["b"].request(Pause(1), 2.2))
    assert reply.code is ReplyCode.REDIRECT and reply.redirect == "a"


def test_with_no_live_leader_a_request_is_unavailable():
    w = promoted()
    later = 2.15 + T.election_timeout_max_s + 0.01  # a's last heartbeat reached b at 2.15
    reply = reply_of(w["b"].request(Pause(1), later))
    assert reply.code is ReplyCode.UNAVAILABLE and reply.redirect is None
    assert not w["b"].status(later).leader_live


def test_with_no_live_leader_a_failover_goes_to_its_target():
    w = promoted()
    later = 2.15 + T.election_timeout_max_s + 0.01
    reply = reply_of(w["c"].request(Failover(1, "b"), later))
    assert reply.code is ReplyCode.REDIRECT and reply.redirect == "b"


def test_the_leader_answers_itself():
    w = promoted()
    assert reply_of(w["a"].request(Pause(1), 2.2)).code is ReplyCode.OK


# ------------------------------------------------------------------- reinit


def test_reinit_is_redirected_to_the_member_it_rebuilds():
    w = promoted()
    reply = reply_of(w["a"].request(Reinit(1, "c"), 2.2))
    assert reply.code is ReplyCode.REDIRECT and reply.redirect == "c"
    assert reply_of(w["a"].request(Reinit(2, "zz"), 2.2)).code is ReplyCode.INVALID


def test_reinit_rebuilds_a_followers_standby_from_the_live_primary_once():
    w = promoted()
    c = w["c"]
    out = c.request(Reinit(1, "c"), 2.2)
    assert reply_of(out).ok and of_type(out, act.Rebuild) == [act.Rebuild("a")]
    assert "reinit_started" in events(out)
    assert c.status(2.2).rebuild.running and c.status(2.2).rebuild.leader == "a"
    again = reply_of(c.request(Reinit(2, "c"), 2.21))
    assert again.code is ReplyCode.CONFLICT and "already running" in again.message
    out = c.rebuild_done("pg_basebackup failed", 2.5)
    assert "reinit_finished" in events(out)
    status = c.status(2.5).rebuild
    assert not status.running and status.error == "pg_basebackup failed"
    assert reply_of(c.request(Reinit(3, "c"), 2.6)).ok  # a finished rebuild may be asked again


def test_reinit_refused_on_the_leader_a_witness_a_primary_and_without_a_live_primary():
    w = promoted(witnesses=1)
    assert reply_of(w["a"].request(Reinit(1, "a"), 2.2)).code is ReplyCode.CONFLICT  # the leader
    assert reply_of(w["w1"].request(Reinit(2, "w1"), 2.2)).code is ReplyCode.INVALID  # no PostgreSQL
    b = w["b"]
    b.observe(obs(PgRole.PRIMARY, at=2.2), 2.2)
    assert reply_of(b.request(Reinit(3, "b"), 2.21)).code is ReplyCode.CONFLICT  # a primary is never discarded
    later = 2.15 + T.election_timeout_max_s + 0.01
    reply = reply_of(w["c"].request(Reinit(4, "c"), later))
    assert reply.code is ReplyCode.CONFLICT and "no live primary" in reply.message


def test_a_rebuild_not_running_ignores_a_late_outcome():
    w = promoted()
    assert w["c"].rebuild_done(None, 2.2) == [] and w["c"].status(2.2).rebuild is None


# --------------------------------------------------------- checkpoint first


def test_a_switchover_checkpoints_first_and_answers_when_it_starts():
    w = ready_for_switchover()
    a = w["a"]
    out = a.request(Switchover(1, "b"), 2.3)
    assert of_type(out, act.Checkpoint) == [act.Checkpoint("switchover")]
    assert of_type(out, act.Reply) == [] and of_type(out, act.Demote) == [] and a.lead.transfer is None
    # Nothing else may start meanwhile.
    refused = reply_of(a.request(Switchover(2, "c"), 2.31))
    assert refused.code is ReplyCode.CONFLICT and "being prepared" in refused.message
    out = a.checkpoint_done(None, 2.4)
    assert of_type(out, act.Demote) == [act.Demote("switchover")]
    reply = reply_of(out)
    assert reply.request_id == 1 and reply.ok and a.lead.transfer.target == "b"


def test_a_failed_checkpoint_does_not_stop_the_switchover():
    w = ready_for_switchover()
    a = w["a"]
    a.request(Switchover(1, "b"), 2.3)
    out = a.checkpoint_done("could not write block", 2.4)
    assert reply_of(out).ok and of_type(out, act.Demote)


def test_a_checkpoint_that_never_ends_starts_the_switchover_after_the_wait():
    w = ready_for_switchover()
    a = w["a"]
    a.request(Switchover(1, "b"), 2.3)
    run(w, 2.4, 2.3 + CHECKPOINT_WAIT_S - 0.1)
    assert a.lead.transfer is None and a.lead.pending is not None
    assert a.next_wakeup() <= 2.3 + CHECKPOINT_WAIT_S
    out = w.tick("a", 2.3 + CHECKPOINT_WAIT_S)
    assert reply_of(out["a"]).ok and of_type(out["a"], act.Demote)


def test_a_target_gone_unhealthy_during_the_checkpoint_refuses_then():
    w = ready_for_switchover()
    a = w["a"]
    a.request(Switchover(1, "b"), 2.3)
    w.observe("b", obs(PgRole.STOPPED, at=2.35, lsn=1000), 2.35)
    w.tick("a", 2.36)  # b's next ack says its PostgreSQL is down
    out = a.checkpoint_done(None, 2.4)
    reply = reply_of(out)
    assert reply.code is ReplyCode.CONFLICT and "not a healthy standby" in reply.message
    assert of_type(out, act.Demote) == [] and "switchover_dropped" in events(out)


def test_losing_the_leadership_during_the_checkpoint_answers_unavailable():
    w = ready_for_switchover()
    a = w["a"]
    a.request(Switchover(1, "b"), 2.3)
    w.isolate("a")
    out = run(w, 2.4, 3.6)
    assert a.role is Role.FOLLOWER and out
    replies = of_type(w.log["a"], act.Reply)
    assert [(r.request_id, r.code) for r in replies] == [(1, ReplyCode.UNAVAILABLE)]


def test_a_scheduled_switchover_checkpoints_once_shortly_before_it_is_due():
    w = ready_for_switchover()
    a = w["a"]
    w.deliver("a", a.tick(2.26, wall_time=WALL), 2.26)
    assert reply_of(a.request(Switchover(1, "b", WALL + 60), 2.27)).ok
    early = a.tick(2.3, wall_time=WALL + 60 - CHECKPOINT_AHEAD_S - 1)
    assert of_type(early, act.Checkpoint) == []
    due = a.tick(2.31, wall_time=WALL + 60 - CHECKPOINT_AHEAD_S + 1)
    assert of_type(due, act.Checkpoint) == [act.Checkpoint("scheduled switchover")]
    assert of_type(a.tick(2.32, wall_time=WALL + 55), act.Checkpoint) == []  # once


# ---------------------------------------------------------------------- VIP


def test_a_failed_vip_acquisition_is_reported_and_tried_again():
    w = promoted()
    a = w["a"]
    out = a.vip_result(1, "another host answers for 198.18.0.10", 2.2)
    assert "vip_acquire_retry" in events(out)
    assert a.status(2.2).vip_error.startswith("another host answers")
    assert a.next_wakeup() <= 2.2 + 2.0
    mark = len(w.log["a"])
    run(w, 2.3, 4.15)  # keeps the lease
    assert of_type(w.log["a"][mark:], act.AcquireVip) == []
    assert of_type(a.tick(4.21), act.AcquireVip) == [act.AcquireVip(1)]
    assert a.vip_result(1, None, 4.3) == [] and a.status(4.3).vip_error is None


def test_a_vip_outcome_of_another_term_or_role_changes_nothing():
    w = promoted()
    assert w["a"].vip_result(0, "old news", 2.2) == []
    assert w["b"].vip_result(1, "not ours", 2.2) == [] and w["b"].status(2.2).vip_error is None


def test_releasing_the_vip_forgets_a_failed_acquisition():
    w = promoted()
    a = w["a"]
    a.vip_result(1, "busy", 2.2)
    w.isolate("a")
    run(w, 2.3, 3.6)
    assert a.role is Role.FOLLOWER and a.status(3.6).vip_error is None and not a.status(3.6).vip_held


# ------------------------------------------------------------------- status


def test_status_of_a_follower_and_its_leader():
    w = promoted()
    b = w["b"].status(2.2)
    assert b.role is Role.FOLLOWER and b.leader == "a" and b.leader_live
    a = w["a"].status(2.2)
    assert a.role is Role.LEADER and a.leader_live and a.primary_ready and a.writable
    assert 0 < a.lease_remaining_s <= T.lease_s


def test_the_bootstrap_is_no_failover():
    w = Wire(make_spec())
    w.observe_data(2.0, role=PgRole.ABSENT, lsn=None)
    w.tick("a", 2.0)
    w.tick("a", 2.1)
    out = w.observe("a", obs(PgRole.PRIMARY, at=2.2, lsn=10), 2.2)
    (promoted_event,) = [e.event for e in of_type(out["a"], act.Emit) if e.event.NAME == "promoted"]
    assert promoted_event.reason == "bootstrap" and w["a"].status(2.2).last_failover is None


@pytest.mark.parametrize("heard", [True, False])
def test_a_failover_records_the_outage_this_member_saw(heard):
    w = promoted()
    now = run(w, 2.2, 3.0)
    w.isolate("a")
    if not heard:
        w["b"].ctx.leader_heard_at = None  # as after b's own restart
    if not heard:
        w["c"].ctx.leader_heard_at = None
    for _ in range(25):
        for n in ("b", "c"):
            w.observe(n, obs(at=now, lsn=1000), now)
        now = run(w, now, now + 0.1)
    (name,) = [n for n in ("b", "c") if w[n].role is Role.LEADER]
    b = w[name]
    w.observe(name, obs(PgRole.PRIMARY, at=now, lsn=1000), now)
    record = b.status(now).last_failover
    assert record is not None and record.term == b.term and record.reason == "election"
    if heard:
        assert T.election_timeout_min_s <= record.outage_s <= now - 2.9
    else:
        assert record.outage_s is None


# ------------------------------------------- an empty member that never held data


def test_a_member_records_once_that_it_held_data():
    w = Wire(make_spec())
    b = w["b"]
    out = b.observe(obs(PgRole.ABSENT, at=0.5, lsn=None), 0.5)
    assert of_type(out, act.Persist) == [] and not b.persistent_state().held_data
    out = b.observe(obs(PgRole.STANDBY, at=0.6, lsn=10), 0.6)
    (persist,) = of_type(out, act.Persist)
    assert persist.state.held_data
    assert of_type(b.observe(obs(PgRole.STOPPED, at=0.7, lsn=10), 0.7), act.Persist) == []


@pytest.mark.parametrize(("held", "vouches"), [(False, True), (True, False)])
def test_an_empty_voter_vouches_for_wal_only_if_it_never_held_data(held, vouches):
    from failoverd.core.messages import VoteRequest, VoteResponse
    from failoverd.core.state import PersistentState, Position

    b = Wire(make_spec(), persisted={"b": PersistentState(held_data=held)})["b"]
    b.observe(obs(PgRole.ABSENT, at=1.5, lsn=None), 1.5)
    req = VoteRequest(cluster="pgc", sender="a", term=1, position=Position(1, 500))
    (resp,) = [a.message for a in of_type(b.receive(req, 1.5), act.Send) if isinstance(a.message, VoteResponse)]
    assert resp.granted and resp.vouches_wal is vouches


def test_the_primary_that_crashed_before_its_standbys_cloned_is_elected_again():
    """Found by the simulator: the first primary died while both standbys were
    still cloning; back with its data, it could never gather D - k vouchers,
    because empty members vouched only for empty candidates."""
    w = Wire(make_spec())
    w.observe_data(2.0, role=PgRole.ABSENT, lsn=None)
    w.tick("a", 2.0)
    w.tick("a", 2.1)
    w.observe("a", obs(PgRole.PRIMARY, at=2.2, lsn=10), 2.2)
    assert all(w[n].state.initialized for n in "abc")
    w.isolate("a")  # a crashes; b and c never finished their clone
    now = run(w, 2.3, 4.0)
    w.heal()
    for _ in range(30):
        w.observe("a", obs(PgRole.STANDBY, at=now, lsn=10), now)
        for n in "bc":
            w.observe(n, obs(PgRole.ABSENT, at=now, lsn=None), now)
        now = run(w, now, now + 0.1)
        if w["a"].role is Role.LEADER and w["a"].lead.promote_requested_at is not None:
            break
    assert w["a"].role is Role.LEADER and of_type(w.log["a"][-40:], act.Promote)


# --------------------------------------------------------------- restart


def test_restart_is_redirected_to_the_member_and_runs_once_on_a_followers_standby():
    from failoverd.core.requests import Restart

    w = promoted()
    w.observe("c", obs(PgRole.STANDBY, at=2.2, following="a"), 2.2)
    reply = reply_of(w["a"].request(Restart(1, "c"), 2.2))
    assert reply.code is ReplyCode.REDIRECT and reply.redirect == "c"
    c = w["c"]
    out = c.request(Restart(2, "c"), 2.25)
    assert reply_of(out).ok and of_type(out, act.RestartServer) == [act.RestartServer()]
    assert "restart_started" in events(out) and c.status(2.25).restarting
    assert reply_of(c.request(Restart(3, "c"), 2.26)).code is ReplyCode.CONFLICT
    assert reply_of(c.request(Reinit(4, "c"), 2.26)).ok  # a rebuild is a different request
    out = c.restart_done(None, 2.6)
    assert "restart_finished" in events(out) and not c.status(2.6).restarting


def test_restart_refused_on_the_leader_a_witness_and_a_server_not_running_as_standby():
    from failoverd.core.requests import Restart

    w = promoted(witnesses=1)
    leader = reply_of(w["a"].request(Restart(1, "a"), 2.2))
    assert leader.code is ReplyCode.CONFLICT and "switchover" in leader.message
    assert reply_of(w["w1"].request(Restart(2, "w1"), 2.2)).code is ReplyCode.INVALID
    w.observe("b", obs(PgRole.STOPPED, at=2.2), 2.2)
    assert reply_of(w["b"].request(Restart(3, "b"), 2.21)).code is ReplyCode.CONFLICT
