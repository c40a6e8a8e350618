"""How fast the core hands the primary over, without giving up safety:
followers report a probe the leader waits for at once instead of at the next
heartbeat, a switchover's leader heartbeats as soon as its server has stopped
(telling where its WAL ends), the target probes on every heartbeat, the new
leader heartbeats as soon as it is writable, and followers stream from a
switchover target before its promotion when nothing can be lost by it."""

from __future__ import annotations

from core_helpers import T, Wire, events, make_spec, messages, obs, of_type, pos, sends, switchover
from test_core_leader import elected, promoted, ready_for_switchover

from failoverd.core import actions as act
from failoverd.core import candidacy
from failoverd.core.messages import Heartbeat, HeartbeatAck, TimeoutNow, VoteRequest
from failoverd.core.node import Role
from failoverd.core.requests import Switchover
from failoverd.core.state import PgRole

# ------------------------------------------------ reporting fresh positions


def test_follower_reports_its_first_fresh_position_right_after_the_probe():
    w = elected()  # b and c were probed before they heard a: nothing fresh yet
    a = w["a"]
    a.observe(obs(at=2.05), 2.05)
    assert of_type(w.log["a"], act.Promote) == []
    last_seq = a.lead.seq
    lease_before = a.lead.lease_until
    out = w.observe("b", obs(at=2.06, lsn=900), 2.06)
    (report,) = messages(out["b"], HeartbeatAck, to="a")
    assert report.position_fresh and report.position == pos(900) and report.seq == last_seq
    # It repeats an ack of the same heartbeat: the lease is not extended by it.
    assert a.lead.lease_until == lease_before
    assert of_type(out["a"], act.Promote) == [act.Promote(1)]


def test_follower_does_not_report_again_once_fresh():
    w = promoted()
    w.tick_all(2.2)  # b and c acknowledged a heartbeat with fresh positions
    out = w.observe("c", obs(at=2.25, lsn=1100, following="a"), 2.25)
    assert sends(out["c"]) == []


def test_no_report_to_a_leader_of_an_older_term():
    w = promoted()
    c = w["c"]
    c.ctx.term += 1  # c moved on (e.g. voted in a later term) since it acknowledged a's heartbeat
    c.ctx.leader = None
    out = c.observe(obs(at=2.25, lsn=1100), 2.25)
    assert sends(out, HeartbeatAck) == []


# ---------------------------------------------------- a running switchover


def test_stopped_leader_heartbeats_at_once_with_its_final_position():
    w = ready_for_switchover()
    a = w["a"]
    w.deliver("a", switchover(a, Switchover(1, "b"), 2.3), 2.3)
    w.observe("b", obs(at=2.35, lsn=1100, following="a"), 2.35)
    out = w.deliver("a", a.observe(obs(PgRole.STOPPED, at=2.4, lsn=1200), 2.4), 2.4)
    (hb,) = messages(out["a"], Heartbeat, to="c")
    assert not hb.primary_ready and hb.primary_position == pos(1200)
    assert w["c"].ctx.handover == (1, pos(1200)) and a.ctx.handover == (1, pos(1200))
    # The target probes on it; a probe that shows more WAL is reported at once.
    assert of_type(out["b"], act.ProbeNow)
    assert a.role is Role.LEADER
    out = w.deliver("b", w["b"].observe(obs(at=2.42, lsn=1150, following=None), 2.42), 2.42, hold=(TimeoutNow,))
    assert [m.position for m in messages(out["b"], HeartbeatAck)] == [pos(1150)] and a.role is Role.LEADER
    out = w.deliver("b", w["b"].observe(obs(at=2.44, lsn=1200, following=None), 2.44), 2.44, hold=(TimeoutNow,))
    assert "switchover_caught_up" in events(out["a"]) and [s.to for s in w.held] == ["b"]


def test_target_of_a_scheduled_switchover_does_not_probe_on_every_heartbeat():
    w = ready_for_switchover()
    a = w["a"]
    a.ctx.wall_time = 1000.0
    w.deliver("a", switchover(a, Switchover(2, "b", at=5000.0), 2.3), 2.3)
    assert w["b"].state.switchover_to == "b" and w["b"].state.switchover_at == 5000.0
    out = w.tick("a", 2.4)
    assert of_type(out["b"], act.ProbeNow) == []


def test_switchover_handover_only_after_final_position_reached():
    w = ready_for_switchover()
    a = w["a"]
    w.deliver("a", switchover(a, Switchover(3, "b"), 2.3), 2.3)
    # b reports (as a running switchover's target) before a's server stopped:
    # no handover yet, whatever b reports.
    w.deliver("b", w["b"].observe(obs(at=2.32, lsn=5000, following="a"), 2.32), 2.32, hold=(TimeoutNow,))
    assert a.role is Role.LEADER and w.held == []


# ------------------------------------- following the target before promotion


def _switched(c_lsn=1000, final=1200, b_lsn=1200, c_timeline=1):
    """a switches over to b; its server stops at `final`; b reaches `b_lsn`.
    TimeoutNow and everything after it is delivered."""
    w = ready_for_switchover()
    w.observe("c", obs(at=2.29, lsn=c_lsn, following="a", timeline=c_timeline), 2.29)
    a = w["a"]
    w.deliver("a", switchover(a, Switchover(4, "b"), 2.3), 2.3)
    w.deliver("a", a.observe(obs(PgRole.STOPPED, at=2.4, lsn=final), 2.4), 2.4)
    w.deliver("b", w["b"].observe(obs(at=2.45, lsn=b_lsn, following=None), 2.45), 2.45)
    return w


def test_voters_stream_from_the_switchover_target_while_it_campaigns():
    w = _switched()
    b = w["b"]
    assert b.role is Role.LEADER and b.term == 2 and not b.lead.primary_ready
    for n in ("a", "c"):  # the old primary (stopped) and the other standby
        follows = [f for f in of_type(w.log[n], act.Follow) if f.leader == "b"]
        assert follows == [act.Follow("b", 2)], (n, follows)
        evs = [e.event.fields() for e in of_type(w.log[n], act.Emit) if e.event.NAME == "follow"]
        assert evs[-1]["before_promotion"] is True
    # Once b is writable, a follower already streaming from it needs no Follow;
    # one that is not streaming yet gets one (not held back as a repeat).
    w.observe("c", obs(at=2.5, lsn=1200, following="b"), 2.5)
    out = w.observe("b", obs(PgRole.PRIMARY, at=2.55, lsn=1201, timeline=2), 2.55)
    assert of_type(out["c"], act.Follow) == []
    assert of_type(out["a"], act.Follow) == [act.Follow("b", 2)]


def test_no_early_follow_when_the_target_is_behind_the_final_position():
    # b is elected anyway in this test (its WAL check passes against a's
    # stale view), but a voter must not point its server at a shorter WAL.
    w = ready_for_switchover()
    c = w["c"]
    c.ctx.handover = (1, pos(1200))
    out = c.receive(
        VoteRequest(cluster="pgc", sender="b", term=2, position=pos(1100), stamp=c.state.stamp, transfer_from="a"), 2.5
    )
    assert of_type(out, act.Follow) == []


def test_no_early_follow_on_a_handover_that_is_not_a_switchover():
    # A leader whose PostgreSQL failed hands over to its best follower without
    # checking it holds everything: no switchover in the state, no early follow.
    w = promoted(lsn=1000)
    w.observe("b", obs(at=2.3, lsn=1300, following="a"), 2.3)
    w.observe("c", obs(at=2.3, lsn=1200, following="a"), 2.3)
    w.tick("a", 2.35)
    w.observe("a", obs(PgRole.STOPPED, at=2.4, lsn=1300), 2.4)
    assert w["b"].role is Role.LEADER and w["b"].term == 2
    assert [f for f in of_type(w.log["c"], act.Follow) if f.leader == "b"] == []


def test_no_early_follow_from_another_timeline_or_without_a_final_position():
    w = ready_for_switchover()
    c = w["c"]
    req = VoteRequest(cluster="pgc", sender="b", term=2, position=pos(1200), stamp=c.state.stamp, transfer_from="a")
    c.ctx.state = c.state.next_version(1, switchover_to="b")
    assert c.ctx.handover is None
    assert of_type(c.receive(req, 2.5), act.Follow) == []  # no final position heard
    d = ready_for_switchover()["c"]
    d.ctx.state = d.state.next_version(1, switchover_to="b")
    d.ctx.handover = (1, pos(1200))
    d.observe(obs(at=2.45, lsn=900, timeline=2, following="a"), 2.45)  # not on the final position's timeline
    assert of_type(d.receive(req, 2.5), act.Follow) == []


def test_handover_position_of_an_older_term_is_not_used():
    w = ready_for_switchover()
    c = w["c"]
    c.ctx.state = c.state.next_version(1, switchover_to="b")
    c.ctx.handover = (0, pos(1200))  # heard in term 0, not from the leader handing over now
    req = VoteRequest(cluster="pgc", sender="b", term=2, position=pos(1200), stamp=c.state.stamp, transfer_from="a")
    assert of_type(c.receive(req, 2.5), act.Follow) == []


def test_new_leader_promotes_without_waiting_for_a_heartbeat_interval():
    """End to end in the core: from the stopped old primary to b's Promote,
    nothing waits for a heartbeat interval or a probe interval."""
    w = _switched()
    b = w["b"]
    # b's own probe after its election, and its followers' (all at once here):
    mark = len(w.log["b"])
    w.observe("c", obs(at=2.46, lsn=1200, following="b"), 2.46)
    w.observe("a", obs(PgRole.STANDBY, at=2.46, lsn=1200, following="b"), 2.46)
    w.observe("b", obs(at=2.47, lsn=1200), 2.47)
    assert of_type(w.log["b"][mark:], act.Promote) == [act.Promote(2)]
    assert b.lead.lease_until > 2.47 and T.heartbeat_interval_s > 2.47 - 2.45


def test_two_data_members_and_a_witness_switch_over_too():
    w = Wire(make_spec(data=2, witnesses=1))
    w.elect("a", now=2.0, obs_at=1.9)
    w.observe_data(2.05)
    w.observe("a", obs(PgRole.PRIMARY, at=2.1), 2.1)
    w.observe("b", obs(at=2.2, following="a"), 2.2)
    w.tick("a", 2.25)
    a = w["a"]
    w.deliver("a", switchover(a, Switchover(5, "b"), 2.3), 2.3)
    w.deliver("a", a.observe(obs(PgRole.STOPPED, at=2.4, lsn=1000), 2.4), 2.4)
    w.deliver("b", w["b"].observe(obs(at=2.45, lsn=1000), 2.45), 2.45)
    assert w["b"].role is Role.LEADER and w["b"].term == 2
    # the old primary, stopped, streams from b
    assert [f for f in of_type(w.log["a"], act.Follow) if f.leader == "b"] == [act.Follow("b", 2)]


def test_sync_configured_on_election_and_again_before_promoting_a_running_primary():
    w = elected()
    assert of_type(w.log["a"], act.ConfigureSync) == [act.ConfigureSync(1, ("b", "c"))]
    # A leader whose server already runs as a primary (a previous incarnation
    # promoted it) sets it again right before the Promote, where it acts at once.
    v = elected()
    mark = len(v.log["a"])
    v.observe("a", obs(PgRole.PRIMARY, at=2.05), 2.05)
    v.observe("b", obs(at=2.06), 2.06)
    out = v.log["a"][mark:]
    kinds_ = [type(x).__name__ for x in out if isinstance(x, (act.ConfigureSync, act.Promote))]
    assert kinds_ == ["ConfigureSync", "Promote"], kinds_


def test_old_primary_restarts_once_streaming_from_the_successor():
    w = _switched()
    a = w["a"]
    # It handed over at 2.45 with its server stopped: no StartStandby (which
    # would start it with no upstream) before the successor's Follow.
    assert of_type(w.log["a"], act.StartStandby) == []
    assert [f for f in of_type(w.log["a"], act.Follow) if f.leader == "b"] == [act.Follow("b", 2)]
    # Had nobody won, it would start as a standby (to be able to stand) soon after.
    v = ready_for_switchover()
    v.deliver("a", switchover(v["a"], Switchover(6, "b"), 2.3), 2.3)
    v.deliver("a", v["a"].observe(obs(PgRole.STOPPED, at=2.4, lsn=1200), 2.4), 2.4)
    # b's VoteRequests never arrive: no early follow, no new leader.
    v.deliver("b", v["b"].observe(obs(at=2.45, lsn=1200), 2.45), 2.45, hold=(VoteRequest,))
    assert v["a"].role is Role.FOLLOWER and of_type(v.log["a"], act.Follow)[-1:] != [act.Follow("b", 2)]
    out = v.observe("a", obs(PgRole.STOPPED, at=2.5, lsn=1200), 2.5)
    assert of_type(out["a"], act.StartStandby) == []
    out = v.observe(
        "a", obs(PgRole.STOPPED, at=2.45 + T.election_timeout_min_s, lsn=1200), 2.45 + T.election_timeout_min_s
    )
    assert of_type(out["a"], act.StartStandby) == [act.StartStandby()]
    assert v["a"].ctx.start_standby_after == 2.45 + T.election_timeout_min_s
    assert a.ctx.start_standby_after == 2.45 + T.election_timeout_min_s


def test_a_probe_begun_before_the_demote_does_not_make_the_leader_writable_again():
    w = ready_for_switchover()
    a = w["a"]
    w.deliver("a", switchover(a, Switchover(7, "b"), 2.3), 2.3)
    assert not a.lead.primary_ready
    out = w.deliver("a", a.observe(obs(PgRole.PRIMARY, at=2.31, lsn=1200), 2.31), 2.31)
    assert not a.lead.primary_ready and "promoted" not in events(out["a"])
    assert all(not m.primary_ready for m in messages(out["a"], Heartbeat))


# ------------------------------------- a handover chosen on stale positions


def _dead_primary_hands_over_on_stale_positions():
    """a's postmaster is killed (its position is unknown now). a last heard b
    at 1300 and c at 1200, but c has since received more (1400): a hands
    over to b, which cannot win the data quorum without c."""
    w = promoted(lsn=1000)
    w.observe("b", obs(at=2.3, lsn=1300, following="a"), 2.3)
    w.observe("c", obs(at=2.3, lsn=1200, following="a"), 2.3)
    w.tick("a", 2.35)
    w["c"].observe(obs(at=2.38, lsn=1400, following="a"), 2.38)  # not reported to a yet
    out = w.observe("a", obs(PgRole.STOPPED, at=2.4, lsn=None), 2.4)
    return w, out


def test_a_voter_with_more_wal_takes_the_handover_over_at_once():
    w, out = _dead_primary_hands_over_on_stale_positions()
    assert [m.to for m in sends(out["a"], TimeoutNow)] == ["b"]
    assert "handover_taken_over" not in events(out["b"])  # b is behind c
    assert "vote_refused" in events(out["c"]) and "handover_taken_over" in events(out["c"])
    # c campaigned in term 3 for the same handover; a (the old leader) and b voted.
    (req,) = messages(out["c"], VoteRequest, to="b")
    assert req.term == 3 and req.transfer_from == "a" and req.position == pos(1400)
    assert w["c"].role is Role.LEADER and w["c"].term == 3
    assert w["b"].voted_for == "c" and w["a"].voted_for == "c"
    assert w["b"].role is Role.FOLLOWER and w["b"].leader == "c"


def test_no_take_over_outside_a_handover():
    """A voter with more WAL refuses an ordinary candidate and waits for its
    own election timeout: only a leader's handover releases its promise."""
    w = promoted(lsn=1000)
    w.isolate("a")
    b, c = w["b"], w["c"]
    w.observe("c", obs(at=3.9, lsn=1400, following=None), 3.9)
    w.observe("b", obs(at=3.9, lsn=1300, following=None), 3.9)
    b.ctx.promise_until = c.ctx.promise_until = 3.9  # a's lease has run out on both
    candidacy.start_election(b.ctx, 4.0, transfer_from=None)
    out = w.deliver("b", b.ctx.flush(), 4.0)
    assert "vote_refused" in events(out["c"]) and "handover_taken_over" not in events(out["c"])
    assert c.role is Role.FOLLOWER and c.term == 2 and c.voted_for is None


def test_the_next_leader_ends_the_release():
    """Once c leads, a VoteRequest claiming a's old handover no longer waives
    b's promise to c."""
    w, _ = _dead_primary_hands_over_on_stale_positions()
    b = w["b"]
    assert b.leader == "c" and b.ctx.released_by is None and b.ctx.promise_until > 2.4
    out = b.receive(
        VoteRequest(
            cluster=b.spec.name, sender="a", term=4, position=pos(2000), stamp=b.state.stamp, transfer_from="a"
        ),
        2.41,
    )
    (resp,) = messages(out, type(out[-1].message))
    assert not resp.granted and b.leader == "c" and b.term == 3


def test_a_leader_that_stepped_down_does_not_take_its_own_hand_over_back():
    """A leader whose promotion failed steps down so that another member can
    try. It holds more WAL than its successor and refuses it its vote, but it
    must not campaign again itself (it would fail the same way, term after
    term)."""
    w = elected()
    w.observe_data(2.05, lsn={"a": 1200, "b": 1000, "c": 1000})
    w.tick("a", 2.1)
    assert of_type(w.log["a"], act.Promote) == [act.Promote(1)]
    out = w.deliver("a", w["a"].promotion_failed(1, "pre_promote hook vetoed", 2.12), 2.12)
    assert "vote_refused" in events(out["a"]) and "handover_taken_over" not in events(out["a"])
    assert w["a"].role is Role.FOLLOWER and w["a"].term == 2
    assert [n for n in "bc" if w[n].role is Role.LEADER] != []


def test_the_elected_leader_asks_to_prepare_the_vip_at_once():
    w = elected()
    assert of_type(w.log["a"], act.PrepareVip) == [act.PrepareVip(1)]
    assert of_type(w.log["a"], act.AcquireVip) == []  # added only once promoted
    assert of_type(w.log["b"], act.PrepareVip) == of_type(w.log["c"], act.PrepareVip) == []
