"""The steps of a Follow (failoverd.core.follow): WAL is discarded only toward a
server that is a primary when asked after our own server stopped.

Regression for simulator seeds 5817 and 14371 (issue #11): a standby's Follow
of an old leader finished after a new primary had committed through that
standby, and rewound it toward the old leader, by then a standby itself; the
commits it had acknowledged were gone."""

from __future__ import annotations

import itertools

import pytest

from failoverd.core.follow import SAFEGUARD, FollowFacts, FollowStep, may_discard_wal, plan_follow
from failoverd.core.state import PgRole

DISCARDING = {FollowStep.REWIND}


def step(local: PgRole, in_recovery: bool, prefix: bool | None, disabled=()) -> FollowStep:
    return plan_follow(FollowFacts(local, in_recovery, prefix), disabled)[0]


def test_seed_5817_a_diverged_standby_never_rewinds_toward_a_standby():
    # db2 held the new primary's acknowledged commits on timeline 7; the old
    # leader db1, restarted as a standby on timeline 6, answered the stale Follow.
    assert step(PgRole.STANDBY, True, False) is FollowStep.CASCADE
    assert step(PgRole.STOPPED, True, False) is FollowStep.CASCADE


def test_seed_5817_with_the_safeguard_off_the_standby_is_stopped_and_rewound():
    assert step(PgRole.STANDBY, True, False, {SAFEGUARD}) is FollowStep.STOP
    assert step(PgRole.STOPPED, True, False, {SAFEGUARD}) is FollowStep.REWIND


@pytest.mark.parametrize(("local", "prefix"), list(itertools.product(list(PgRole), [True, False, None])))
def test_nothing_is_ever_discarded_toward_a_standby(local, prefix):
    assert step(local, True, prefix) not in DISCARDING | {FollowStep.STOP}


@pytest.mark.parametrize("local", [PgRole.STANDBY, PgRole.PRIMARY, PgRole.UNRESPONSIVE])
@pytest.mark.parametrize("prefix", [True, False, None])
def test_a_running_server_is_never_rewound_before_it_stopped(local, prefix):
    # A rewind is only planned for a stopped server, so the upstream's answer
    # that allows it always comes from after the stop.
    assert step(local, False, prefix) is not FollowStep.REWIND


def test_a_stopped_diverged_server_is_rewound_toward_a_primary():
    assert step(PgRole.STOPPED, False, False) is FollowStep.REWIND
    assert step(PgRole.STOPPED, False, None) is FollowStep.REWIND  # unknown end of WAL: rewind decides


def test_compatible_servers_keep_their_wal():
    assert step(PgRole.STANDBY, False, True) is FollowStep.RETARGET
    assert step(PgRole.STOPPED, False, True) is FollowStep.START
    assert step(PgRole.ABSENT, False, None) is FollowStep.CLONE
    assert step(PgRole.ABSENT, True, None) is FollowStep.CLONE


def test_a_diverged_or_unknown_running_server_is_stopped_first():
    assert step(PgRole.STANDBY, False, False) is FollowStep.STOP
    assert step(PgRole.STANDBY, False, None) is FollowStep.STOP
    assert step(PgRole.PRIMARY, False, False) is FollowStep.STOP
    assert step(PgRole.UNRESPONSIVE, False, None) is FollowStep.STOP


def test_a_primary_or_unresponsive_server_does_not_cascade():
    assert step(PgRole.PRIMARY, True, None) is FollowStep.REFUSE
    assert step(PgRole.UNRESPONSIVE, True, None) is FollowStep.REFUSE


def test_every_plan_says_why():
    for local, rec, prefix in itertools.product(list(PgRole), [True, False], [True, False, None]):
        _, why = plan_follow(FollowFacts(local, rec, prefix))
        assert why


def test_rebuilding_discards_only_toward_a_primary():
    assert may_discard_wal(False)
    assert not may_discard_wal(True)
    assert may_discard_wal(True, {SAFEGUARD})


def test_facts_check_their_types():
    with pytest.raises(TypeError):
        FollowFacts("standby", False, True)  # type: ignore[arg-type]
