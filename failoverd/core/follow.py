"""How a member's PostgreSQL comes to stream from another member, decided
step by step: the one place that decides when a member may discard WAL.

`Follow(leader)` is carried out by an adapter (the real one in
failoverd.adapters.postgres.replication, the simulator's in failoverd.sim). Some ways of
following keep every byte of the local WAL (clone into an empty directory,
cascade from a standby, re-point a standby whose WAL is a prefix of the
upstream's, start a stopped one); one discards WAL (pg_rewind, or a re-clone
after a failed rewind). The adapter gathers facts, asks `plan_follow` for the
next step, carries it out, and asks again until the step is final.

The rule that makes discarding safe (docs/design.md §7, "WAL is kept"): a
member discards WAL only in favour of a server that was *out of recovery
when asked after our own server had stopped*. At that instant our WAL can no
longer grow, and the only server out of recovery holds every commit
acknowledged so far (§6: an older primary is fenced before a newer leader
wins; §7: a primary promotes only holding every earlier acknowledged
commit), so every acknowledged commit we hold is also in the source. A
source asked earlier may have lost its primacy in between, and a standby
never proves anything: without this rule a Follow decided for an old leader
that finished late rewound a standby that had meanwhile acknowledged the new
primary's commits (simulator seeds 5817 and 14371, issue #11).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection

from failoverd.core.state import PgRole

# The safeguard switch of this rule (failoverd simulate --disable-safeguard):
# discard WAL toward whatever the upstream is, asked at any time.
SAFEGUARD = "rewind-source"


class FollowStep(enum.Enum):
    CLONE = "clone"  # no data directory: copy the upstream; nothing of ours exists to lose
    CASCADE = "cascade"  # the upstream is a standby: stream from it as we are (refused if our WAL goes further)
    RETARGET = "retarget"  # a running standby whose WAL is a prefix of the upstream's: re-point it
    STOP = "stop"  # stop our server first: then its WAL is final and the upstream is asked again
    START = "start"  # stopped, WAL a prefix of the upstream's: start it streaming
    REWIND = "rewind"  # stopped, diverged, the upstream a primary since our stop: discard our divergent WAL
    REFUSE = "refuse"  # none of the above is safe now; the core asks again later


FINAL_STEPS = frozenset(
    {FollowStep.CLONE, FollowStep.CASCADE, FollowStep.RETARGET, FollowStep.START, FollowStep.REWIND, FollowStep.REFUSE}
)


@dataclasses.dataclass(frozen=True, slots=True)
class FollowFacts:
    """What the adapter found, in the order it found it.

    `local` is our server's role. `upstream_in_recovery` is the upstream's
    answer, asked *after* `local` was read: a local role of STOPPED therefore
    means the upstream was asked after our server had stopped. `prefix` says
    whether our WAL is a prefix of the upstream's history (None: unknown,
    e.g. no position could be read)."""

    local: PgRole
    upstream_in_recovery: bool
    prefix: bool | None

    def __post_init__(self) -> None:
        if not isinstance(self.local, PgRole):
            raise TypeError(f"local: {self.local!r} is not a PgRole")


def plan_follow(facts: FollowFacts, disabled: Collection[str] = ()) -> tuple[FollowStep, str]:
    """The next step of a Follow, and why. See the module docstring for the rule.

    With the safeguard switched off (simulator only) the upstream's role is
    ignored: a diverged server is rewound toward a standby too, as pg_rewind
    (PostgreSQL 14+) would allow."""
    local = facts.local
    if local is PgRole.ABSENT:
        return FollowStep.CLONE, "no data directory"
    if facts.upstream_in_recovery and SAFEGUARD not in disabled:
        if local is PgRole.STANDBY or local is PgRole.STOPPED:
            return FollowStep.CASCADE, "the upstream is a standby: stream from it, discarding nothing"
        return FollowStep.REFUSE, f"the upstream is a standby and this server is {local.value}"
    if local is PgRole.STANDBY and facts.prefix:
        return FollowStep.RETARGET, "our WAL is a prefix of the upstream's"
    if local is not PgRole.STOPPED:
        return FollowStep.STOP, f"this server is a {'diverged ' if facts.prefix is False else ''}{local.value}"
    if facts.prefix:
        return FollowStep.START, "our WAL is a prefix of the upstream's"
    return FollowStep.REWIND, "diverged from a primary asked after our server stopped"


def may_discard_wal(upstream_in_recovery_after_stop: bool, disabled: Collection[str] = ()) -> bool:
    """Whether our stopped server's WAL may be thrown away (rebuilt from the
    upstream), the upstream having been asked after our server stopped."""
    return not upstream_in_recovery_after_stop or SAFEGUARD in disabled
