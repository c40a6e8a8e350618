"""Quorum arithmetic of the core: vote_tally, quorum_time, committed_version."""

from __future__ import annotations

import pytest

from failoverd.core.quorum import Tally, committed_version, quorum_time, vote_tally

THREE = ("a", "b", "c")
FIVE = ("a", "b", "c", "d", "e")
TWO_DATA_WITNESS = ("a", "b", "w")


# ------------------------------------------------------------------ vote_tally


def test_majority_with_enough_vouching_data_members_wins():
    grants = {"a": True, "b": True}
    assert vote_tally(THREE, THREE, grants, {"a", "b"}, 2) is Tally.WON


def test_three_data_k1_one_voucher_is_pending_while_a_data_voter_is_outstanding():
    # Majority reached (a, b) but b did not vouch; c could still vouch.
    assert vote_tally(THREE, THREE, {"a": True, "b": True}, {"a"}, 2) is Tally.PENDING


def test_three_data_k1_one_voucher_is_lost_once_every_data_voter_answered():
    grants = {"a": True, "b": True, "c": False}
    assert vote_tally(THREE, THREE, grants, {"a"}, 2) is Tally.LOST


def test_three_data_k1_second_voucher_wins():
    grants = {"a": True, "b": True, "c": True}
    assert vote_tally(THREE, THREE, grants, {"a", "c"}, 2) is Tally.WON


def test_two_data_and_witness_needs_only_the_candidate_to_vouch():
    # D=2, k=1: D-k = 1; the witness grants the majority without vouching.
    assert vote_tally(TWO_DATA_WITNESS, ("a", "b"), {"a": True, "w": True}, {"a"}, 1) is Tally.WON


def test_witness_vouching_does_not_count_as_a_data_voucher():
    # A voucher that is not a data voter is ignored for the data rule.
    assert vote_tally(TWO_DATA_WITNESS, ("a", "b"), {"a": True, "w": True}, {"w"}, 1) is Tally.PENDING
    assert vote_tally(TWO_DATA_WITNESS, ("a", "b"), {"a": True, "w": True, "b": False}, {"w"}, 1) is Tally.LOST


def test_vouching_without_a_grant_does_not_count():
    grants = {"a": True, "b": True, "c": False}
    assert vote_tally(THREE, THREE, grants, {"a", "c"}, 2) is Tally.LOST


def test_grants_from_non_voters_are_ignored():
    grants = {"a": True, "x": True, "y": True}
    assert vote_tally(THREE, THREE, grants, {"a", "x", "y"}, 1) is Tally.PENDING


def test_majority_of_refusals_loses():
    assert vote_tally(THREE, THREE, {"a": True, "b": False, "c": False}, {"a"}, 1) is Tally.LOST
    assert vote_tally(FIVE, FIVE, {"a": True, "b": False, "c": False, "d": False}, {"a"}, 1) is Tally.LOST


def test_only_own_grant_is_pending():
    assert vote_tally(THREE, THREE, {"a": True}, {"a"}, 1) is Tally.PENDING
    assert vote_tally(FIVE, FIVE, {"a": True}, {"a"}, 3) is Tally.PENDING


def test_five_data_k2_needs_three_vouchers():
    grants = {"a": True, "b": True, "c": True}
    assert vote_tally(FIVE, FIVE, grants, {"a", "b"}, 3) is Tally.PENDING
    assert vote_tally(FIVE, FIVE, grants, {"a", "b", "c"}, 3) is Tally.WON
    # Two refusals and two non-vouching grants: at most 1 more voucher possible.
    grants = {"a": True, "b": True, "c": True, "d": False}
    assert vote_tally(FIVE, FIVE, grants, {"a"}, 3) is Tally.LOST


def test_zero_data_votes_needed_is_a_plain_majority():
    assert vote_tally(THREE, THREE, {"a": True, "b": True}, set(), 0) is Tally.WON


def test_even_voter_count_majority_is_more_than_half():
    four = ("a", "b", "c", "d")
    assert vote_tally(four, four, {"a": True, "b": True}, {"a", "b"}, 1) is Tally.PENDING
    assert vote_tally(four, four, {"a": True, "b": True, "c": True}, {"a"}, 1) is Tally.WON
    assert vote_tally(four, four, {"a": True, "b": False, "c": False}, {"a"}, 1) is Tally.LOST


# ------------------------------------------------------------------ quorum_time


def test_quorum_time_is_none_without_a_majority_of_acks():
    assert quorum_time(THREE, {}) is None
    assert quorum_time(THREE, {"a": 5.0}) is None


def test_quorum_time_is_the_majority_th_latest_ack():
    assert quorum_time(THREE, {"a": 5.0, "b": 3.0}) == 3.0
    assert quorum_time(THREE, {"a": 5.0, "b": 3.0, "c": 4.0}) == 4.0
    assert quorum_time(FIVE, {"a": 9.0, "b": 1.0, "c": 7.0, "d": 8.0, "e": 2.0}) == 7.0


def test_quorum_time_ignores_non_voters():
    assert quorum_time(THREE, {"a": 5.0, "x": 9.0}) is None
    assert quorum_time(THREE, {"a": 5.0, "x": 9.0, "b": 1.0}) == 1.0


# ------------------------------------------------------------- committed_version


def test_committed_version_is_the_majority_th_highest():
    assert committed_version(THREE, {"a": 5, "b": 3, "c": 1}) == 3
    assert committed_version(FIVE, {"a": 5, "b": 5, "c": 4, "d": 2, "e": 1}) == 4


def test_committed_version_counts_missing_voters_as_zero():
    assert committed_version(THREE, {"a": 7}) == 0
    assert committed_version(THREE, {"a": 7, "b": 6}) == 6


def test_committed_version_ignores_non_voters():
    assert committed_version(THREE, {"a": 7, "x": 9, "y": 9}) == 0


@pytest.mark.parametrize("n", [3, 4, 5, 7, 9])
def test_committed_version_never_exceeds_what_a_majority_holds(n):
    voters = tuple(f"n{i}" for i in range(n))
    accepted = {v: i for i, v in enumerate(voters)}
    c = committed_version(voters, accepted)
    assert sum(1 for v in accepted.values() if v >= c) >= n // 2 + 1
    assert sum(1 for v in accepted.values() if v >= c + 1) < n // 2 + 1
