"""Quorum arithmetic: pure functions answering won / lost / pending."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping


class Tally(enum.Enum):
    WON = "won"
    LOST = "lost"
    PENDING = "pending"


def vote_tally(
    voters: Collection[str],
    data_voters: Collection[str],
    grants: Mapping[str, bool],
    vouchers: Collection[str],
    data_votes_needed: int,
) -> Tally:
    """Has an election (or pre-vote) been won?

    Won needs grants from a majority of `voters` *and* at least
    `data_votes_needed` data members among the grants that vouched for the
    candidate's WAL. Lost when even the outstanding voters cannot make that.
    """
    majority = len(voters) // 2 + 1
    granted = {v for v, ok in grants.items() if ok and v in voters}
    vouched = {v for v in granted if v in vouchers and v in data_voters}
    if len(granted) >= majority and len(vouched) >= data_votes_needed:
        return Tally.WON
    outstanding = {v for v in voters if v not in grants}
    if len(granted) + len(outstanding) < majority:
        return Tally.LOST
    if len(vouched) + len(outstanding & set(data_voters)) < data_votes_needed:
        return Tally.LOST
    return Tally.PENDING


def quorum_time(voters: Collection[str], times_of: Mapping[str, float]) -> float | None:
    """The latest time t that a majority of `voters` each reach (their time
    in `times_of` is t or later): with lease ends, the lease a majority backs."""
    majority = len(voters) // 2 + 1
    times = sorted((times_of[v] for v in voters if v in times_of), reverse=True)
    if len(times) < majority:
        return None
    return times[majority - 1]


def committed_version(voters: Collection[str], accepted: Mapping[str, int]) -> int:
    """The highest version a majority of `voters` has accepted."""
    majority = len(voters) // 2 + 1
    versions = sorted((accepted.get(v, 0) for v in voters), reverse=True)
    return versions[majority - 1]
