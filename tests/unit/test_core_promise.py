"""Adaptive promises (docs/design.md §6): the timing arithmetic, the
leader's choice, the follower's running maximum, and leases computed from
the promise each follower says it made."""

from __future__ import annotations

import math

import pytest
from core_helpers import T, Wire, env, events, make_spec, messages, voter

from failoverd.core.messages import Heartbeat, HeartbeatAck, ProtocolError, decode_message, encode_message
from failoverd.core.promise import PromiseChooser
from failoverd.core.spec import SpecError, Timing
from failoverd.core.state import StateStamp

# ------------------------------------------------------------------ timing


def test_default_floor_is_0_4_and_its_lease_is_safe():
    assert T.promise_floor_s == pytest.approx(0.4)
    assert T.lease_for(0.4) == pytest.approx(0.32)
    assert T.lease_for(1.0) == pytest.approx(T.lease_s)
    for p in (0.4, 0.5, 0.7, 1.0):  # the timing rule holds all the way
        assert T.lease_for(p) < T.lease_limit_for(p)


def test_lease_for_a_promise_below_the_floor_stays_under_its_own_bound():
    # a member configured with a shorter promise than ours: no unsafe lease
    for p in (0.3, 0.1, 0.05, 0.0):
        assert T.lease_for(p) >= 0 and (T.lease_for(p) < T.lease_limit_for(p) or T.lease_for(p) == 0)


def test_promise_follows_the_round_trip_within_floor_and_minimum():
    assert T.promise_for(0.001) == pytest.approx(0.4)  # a LAN: the floor
    assert T.promise_for(0.3) == pytest.approx((0.1 + 0.6) / 0.8)
    assert T.promise_for(5.0) == pytest.approx(1.0)  # never beyond election_timeout_min_s


def test_election_timeout_scales_with_the_promise():
    assert T.election_timeout_for(1.0, 0.0) == pytest.approx(1.0)
    assert T.election_timeout_for(0.4, 0.0) == pytest.approx(0.4)
    assert T.election_timeout_for(0.4, 1.0) == pytest.approx(0.56)


def test_a_floor_equal_to_the_minimum_turns_adaptation_off():
    t = Timing(election_timeout_floor_s=1.0)
    assert t.promise_for(0.0) == pytest.approx(1.0)


def test_auto_floor_falls_back_to_no_adaptation_when_unsafe():
    # lease_s close to its bound: the scaled lease at 0.4 would not be safe
    t = Timing(lease_s=0.93)
    assert t.promise_floor_s == pytest.approx(t.election_timeout_min_s)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        (dict(election_timeout_floor_s=0.2), "3 heartbeat intervals"),
        (dict(election_timeout_floor_s=1.2), "election_timeout_min_s"),
        (dict(lease_s=0.93, election_timeout_floor_s=0.4), "longest safe one"),
        (dict(heartbeat_interval_s=0.1, lease_s=0.3, election_timeout_floor_s=0.3), "not longer than heartbeat"),
        (dict(promise_window_s=0.0), "promise_window_s"),
    ],
)
def test_unsafe_or_impossible_floors_are_refused(kw, words):
    with pytest.raises(SpecError) as exc:
        Timing(**kw)
    assert words in str(exc.value)


# ------------------------------------------------------------ the chooser


def test_chooser_starts_long_lengthens_at_once_and_shortens_after_a_window():
    c = PromiseChooser.new(T, 0.0)
    assert c.promise_s == 1.0
    now = 0.0
    while now < T.promise_window_s - 0.05:  # quick acks, but not yet a whole window
        assert not c.note_delay(0.001, now, T)
        now += 0.1
    assert c.promise_s == 1.0
    while now < T.promise_window_s + 1.5:
        c.note_delay(0.001, now, T)
        now += 0.1
    assert c.promise_s == pytest.approx(0.4)
    assert c.note_delay(0.3, now, T)  # one slow ack: longer at once
    assert c.promise_s == pytest.approx(0.875)
    end = now + T.promise_window_s - 1.5
    while now < end:  # that ack is still in the window
        c.note_delay(0.001, now, T)
        now += 0.1
    assert c.promise_s == pytest.approx(0.875)
    while now < end + 3:
        c.note_delay(0.001, now, T)
        now += 0.1
    assert c.promise_s == pytest.approx(0.4)


def test_chooser_restarts_at_the_longest_promise_on_new_timing():
    c = PromiseChooser.new(T, 0.0)
    for i in range(200):
        c.note_delay(0.001, i * 0.1, T)
    assert c.promise_s == pytest.approx(0.4)
    t2 = Timing(election_timeout_min_s=2.0, election_timeout_max_s=2.5, lease_s=1.5)
    c.restart(t2)
    assert c.promise_s == 2.0
    c.note_delay(0.001, 20.05, t2)
    assert c.promise_s == 2.0


# --------------------------------------------------------------- follower


def hb(seq: int, promise_s: float, term: int = 1) -> Heartbeat:
    return Heartbeat(**env("a", term), seq=seq, promise_s=promise_s)


def test_follower_promise_is_a_running_maximum():
    b = voter("b", now=0.0)
    b.receive(hb(1, 1.0), 5.0)
    assert b.ctx.promise_until == pytest.approx(6.0)
    out = b.receive(hb(2, 0.4), 5.1)  # a shorter promise cannot cut the one made at 5.0
    assert b.ctx.promise_until == pytest.approx(6.0)
    assert messages(out, HeartbeatAck)[0].promised_s == pytest.approx(0.4)
    b.receive(hb(3, 0.4), 5.9)
    assert b.ctx.promise_until == pytest.approx(6.3)


def test_follower_keeps_asked_promises_within_its_own_range():
    b = voter("b", now=0.0)
    out = b.receive(hb(1, 0.05), 5.0)  # below our floor: we promise the floor
    assert messages(out, HeartbeatAck)[0].promised_s == pytest.approx(0.4)
    out = b.receive(hb(2, 30.0), 5.1)  # beyond what a restart of ours would cover
    assert messages(out, HeartbeatAck)[0].promised_s == pytest.approx(1.0)
    assert b.ctx.promise_until == pytest.approx(6.1)


def test_a_heartbeat_without_a_promise_is_one_of_election_timeout_min():
    b = voter("b", now=0.0)
    out = b.receive(hb(1, 0.0), 5.0)
    assert b.ctx.promise_until == pytest.approx(6.0)
    assert messages(out, HeartbeatAck)[0].promised_s == pytest.approx(1.0)


def test_follower_election_timeout_scales_with_the_last_promise():
    b = voter("b", now=0.0)
    b.receive(hb(1, 0.4), 5.0)
    assert 5.0 + 0.4 <= b.ctx.election_deadline < 5.0 + 0.56 + 1e-9


def test_with_promise_max_disabled_a_shorter_promise_cuts_the_older_one():
    b = voter("b", now=0.0, disabled=["promise-max"])
    b.receive(hb(1, 1.0), 5.0)
    b.receive(hb(2, 0.4), 5.1)
    assert b.ctx.promise_until == pytest.approx(5.5)


# ----------------------------------------------------------------- leader


def test_leader_asks_followers_that_never_reported_a_promise_for_none():
    w = Wire(make_spec())
    out = w.elect("a", now=2.0, obs_at=1.9)
    first = [m for m in messages(out["a"], Heartbeat)]
    assert first and all(m.promise_s == 0.0 for m in first)
    out = w.tick("a", 2.1)
    assert all(m.promise_s == pytest.approx(1.0) for m in messages(out["a"], Heartbeat))


def ack(sender: str, seq: int, promised_s: float) -> HeartbeatAck:
    return HeartbeatAck(**env(sender, 1), seq=seq, success=True, accepted=StateStamp(1, 1), promised_s=promised_s)


def silent_leader() -> Wire:
    """a wins term 1 at 2.0 with c's acknowledgement alone (promise 1.0:
    c backs 2.8), then hears nobody; its heartbeats at 2.1..2.5 go unanswered."""
    w = Wire(make_spec())
    w.drop("a", "b")
    w.elect("a", now=2.0, obs_at=1.9)
    w.drop("a", "c")
    for i in range(1, 6):
        w.tick("a", 2.0 + i / 10)
    return w


def test_lease_rests_on_the_promise_each_follower_made():
    w = silent_leader()
    a = w["a"]
    seq = a.lead.seq
    assert a.lead.sent_at[seq] == pytest.approx(2.5) and a.lead.lease_until == pytest.approx(2.8)
    a.receive(ack("b", seq, 0.4), 2.51)
    # b promised 0.4: its acknowledgement backs 2.5 + 0.32; a itself backs 3.3
    assert a.lead.lease_end_at["b"] == pytest.approx(2.82)
    assert a.lead.lease_until == pytest.approx(2.82)


def test_an_older_follower_that_reports_no_promise_counts_as_election_timeout_min():
    w = silent_leader()
    a = w["a"]
    a.receive(ack("b", a.lead.seq, 0.0), 2.51)
    assert a.lead.lease_until == pytest.approx(2.5 + T.lease_s)


def test_quick_acknowledgements_shorten_the_promise_after_a_window_and_an_event_says_so():
    t = Timing(promise_window_s=2.0)
    w = Wire(make_spec(timing=t))
    w.elect("a", now=2.0, obs_at=1.9)
    now = 2.0
    seen: list[str] = []
    while now < 2.0 + t.promise_window_s + 1:
        now += t.heartbeat_interval_s
        out = w.tick("a", now)
        seen += events(out["a"])
    a = w["a"]
    assert a.lead.promise.promise_s == pytest.approx(0.4)
    assert "promise_changed" in seen
    assert w["b"].ctx.promise_s == pytest.approx(0.4)
    assert a.lead.lease_until == pytest.approx(a.lead.sent_at[a.lead.seq] + 0.32)


# ---------------------------------------------------------------- the wire


def test_promise_fields_round_trip_and_bad_values_are_refused():
    m = hb(3, 0.4)
    assert decode_message(encode_message(m)) == m
    assert "promise_s" not in encode_message(hb(3, 0.0))  # an older member still understands it
    for bad in (-1, math.nan, math.inf, True, "0.4", 1e9):
        data = encode_message(m) | {"promise_s": bad}
        with pytest.raises(ProtocolError):
            decode_message(data)
        data = encode_message(ack("b", 1, 0.4)) | {"promised_s": bad}
        with pytest.raises(ProtocolError):
            decode_message(data)


def test_a_repeated_acknowledgement_is_not_taken_for_a_slow_round_trip():
    t = Timing(promise_window_s=2.0)
    w = Wire(make_spec(timing=t))
    w.elect("a", now=2.0, obs_at=1.9)
    now = 2.0
    while now < 2.0 + t.promise_window_s + 1:
        now += t.heartbeat_interval_s
        w.tick("a", now)
    a = w["a"]
    assert a.lead.promise.promise_s == pytest.approx(0.4)
    seq = a.lead.seq
    # b acknowledges the last heartbeat again, 0.3 s after it went out (a
    # repeated ack after a probe): its lease counts, its lateness does not.
    out = a.receive(ack("b", seq, 0.4), a.lead.sent_at[seq] + 0.3)
    assert "promise_changed" not in events(out) and a.lead.promise.promise_s == pytest.approx(0.4)
    # a first ack that slow lengthens the promise at once
    w.isolate("a")
    out = w.tick("a", now + 0.1)["a"]
    seq = a.lead.seq
    out = a.receive(ack("b", seq, 0.4), a.lead.sent_at[seq] + 0.3)
    assert "promise_changed" in events(out) and a.lead.promise.promise_s > 0.4
