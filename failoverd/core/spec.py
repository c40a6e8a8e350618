"""What the protocol core needs to know about the cluster.

These are the only inputs of the core that come from configuration. They are
plain frozen dataclasses that check themselves on construction, so a core can
never be built from an unsafe timing or an impossible membership. The TOML
loader (`failoverd.config.load`) builds them and adds the adapter-side settings
(addresses, paths) that the core never sees.
"""

from __future__ import annotations

import dataclasses
import enum
import math


class SpecError(ValueError):
    """A cluster description that the protocol cannot run safely.

    `path` names the configuration key the problem belongs to, so the TOML
    loader can report it in the user's terms.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class MemberKind(enum.Enum):
    DATA = "data"  # runs PostgreSQL; votes and can become primary
    WITNESS = "witness"  # votes only; has no PostgreSQL


class ReplicationMode(enum.Enum):
    QUORUM = "quorum"  # synchronous_standby_names = 'ANY k (...)'; no acknowledged commit lost
    ASYNC = "async"  # asynchronous; loss bounded by max_lag_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    name: str
    kind: MemberKind = MemberKind.DATA
    priority: int = 100  # higher campaigns first when equally up to date
    nofailover: bool = False  # never campaigns, never the target of a switchover

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _is_member_name(self.name):
            raise SpecError("name", f"{self.name!r} is not a member name (1-63 of a-z, 0-9, '-', '_')")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise SpecError("priority", f"{self.priority!r} is not an integer")
        if not 0 <= self.priority <= 1000:
            raise SpecError("priority", f"{self.priority} is not within 0..1000")

    @property
    def is_data(self) -> bool:
        return self.kind is MemberKind.DATA

    @property
    def can_lead(self) -> bool:
        return self.is_data and not self.nofailover


def _is_member_name(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
    return 1 <= len(name) <= 63 and set(name) <= allowed and name[0] not in "-_"


@dataclasses.dataclass(frozen=True, slots=True)
class Timing:
    """Protocol timing, all in seconds of the local monotonic clock.

    The safety rule tying them together (see docs/design.md, "Lease"):
    a lease taken at send time t must end, in real time, before any voter
    that acknowledged it can vote again, with room for the fence to act:

        lease_s / (1 - drift) + fence_margin_s <= election_timeout_min_s / (1 + drift)

    On a quick network the leader asks for shorter promises, down to
    `promise_floor_s`, and each heartbeat's lease shrinks in proportion
    (`lease_for`); the rule holds for every promise in between
    (docs/design.md §6, "Adaptive promises").
    """

    heartbeat_interval_s: float = 0.1
    election_timeout_min_s: float = 1.0
    election_timeout_max_s: float = 1.4
    lease_s: float = 0.8
    # The shortest promise a leader asks for; None: 0.4 x election_timeout_min_s
    # where that is safe, else no adaptation. Equal to election_timeout_min_s: off.
    election_timeout_floor_s: float | None = None
    # How long acknowledgements must stay quick before a shorter promise is asked for.
    promise_window_s: float = 10.0
    clock_drift_max: float = 0.01  # max clock-rate error of any host, as a fraction
    fence_margin_s: float = 0.05  # time the watchdog needs to stop PostgreSQL
    promote_timeout_s: float = 5.0  # a promotion not seen within this is abandoned
    bootstrap_timeout_s: float = 120.0  # the same for the first leader's initdb and start
    transfer_timeout_s: float = 5.0  # a leadership transfer not done within this is aborted
    pg_unresponsive_s: float = 3.0  # a primary that fails probes this long is given up
    pg_stalled_s: float = 1.0  # ... and one seen stalled (PgObservation.stalled) this long
    # How often a server that is where the cluster wants it is probed; None:
    # 5 heartbeat intervals. Anything else is probed every heartbeat
    # (failoverd.core.probing).
    probe_interval_s: float | None = None
    switchover_max_lag_bytes: int = 16 * 1024 * 1024  # a switchover target further behind is refused

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in ("election_timeout_floor_s", "probe_interval_s"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(field.name, f"{value!r} is not a number")
            if (isinstance(value, int) and abs(value) > 2**53) or not math.isfinite(value):
                raise SpecError(field.name, f"{value!r} is not a finite number of reasonable size")
            if value < 0:
                raise SpecError(field.name, f"{value} is negative")
        if not 0.001 <= self.heartbeat_interval_s <= 10:
            raise SpecError("heartbeat_interval_s", f"{self.heartbeat_interval_s} is not within 0.001..10 s")
        if self.election_timeout_min_s < 3 * self.heartbeat_interval_s:
            raise SpecError(
                "election_timeout_min_s",
                f"{self.election_timeout_min_s} s is less than 3 heartbeat intervals "
                f"({3 * self.heartbeat_interval_s:g} s); one lost heartbeat would start an election",
            )
        if self.election_timeout_max_s <= self.election_timeout_min_s:
            raise SpecError(
                "election_timeout_max_s",
                f"{self.election_timeout_max_s} s must be greater than election_timeout_min_s "
                f"({self.election_timeout_min_s} s) so that candidates spread out",
            )
        if not 0 <= self.clock_drift_max < 0.5:
            raise SpecError("clock_drift_max", f"{self.clock_drift_max} is not within 0..0.5")
        if self.lease_s <= self.heartbeat_interval_s:
            raise SpecError(
                "lease_s",
                f"{self.lease_s} s must be longer than heartbeat_interval_s ({self.heartbeat_interval_s} s) "
                "or the leader loses its lease between heartbeats",
            )
        limit = self.lease_limit_s
        if self.lease_s >= limit:
            raise SpecError(
                "lease_s",
                f"{self.lease_s} s is not shorter than {limit:.4f} s, the longest lease that is safe with "
                f"election_timeout_min_s={self.election_timeout_min_s}, clock_drift_max={self.clock_drift_max} "
                f"and fence_margin_s={self.fence_margin_s}",
            )

        probe = self.probe_interval_s
        if probe is not None and not self.heartbeat_interval_s - 1e-9 <= probe <= 60:
            raise SpecError(
                "probe_interval_s",
                f"{probe} s is not within heartbeat_interval_s ({self.heartbeat_interval_s} s)..60 s",
            )
        if not 0.01 <= self.promise_window_s <= 3600:
            raise SpecError("promise_window_s", f"{self.promise_window_s} is not within 0.01..3600 s")
        floor = self.election_timeout_floor_s
        if floor is not None:
            if not 3 * self.heartbeat_interval_s - 1e-9 <= floor <= self.election_timeout_min_s:
                raise SpecError(
                    "election_timeout_floor_s",
                    f"{floor} s is not within 3 heartbeat intervals ({3 * self.heartbeat_interval_s:g} s) "
                    f"and election_timeout_min_s ({self.election_timeout_min_s} s)",
                )
            problem = self._floor_problem(floor)
            if problem:
                raise SpecError("election_timeout_floor_s", problem)

    def _floor_problem(self, floor: float) -> str:
        """Why promises as short as `floor` cannot be asked for ('' if they can).
        The margin lease_limit_for(p) - lease_for(p) is affine in p, so it is
        positive on [floor, election_timeout_min_s] when it is at both ends."""
        lease = self.lease_s * floor / self.election_timeout_min_s
        if lease <= self.heartbeat_interval_s:
            return (
                f"a promise of {floor} s earns a lease of {lease:.3f} s, not longer than heartbeat_interval_s "
                f"({self.heartbeat_interval_s} s)"
            )
        if lease >= self.lease_limit_for(floor):
            return (
                f"a promise of {floor} s earns a lease of {lease:.4f} s (lease_s scaled), not shorter than "
                f"{self.lease_limit_for(floor):.4f} s, the longest safe one; raise it or shorten lease_s"
            )
        return ""

    @property
    def healthy_probe_interval_s(self) -> float:
        """How often a settled server is probed (failoverd.core.probing)."""
        return self.probe_interval_s if self.probe_interval_s is not None else 5 * self.heartbeat_interval_s

    @property
    def promise_floor_s(self) -> float:
        """The shortest promise a leader asks of its followers."""
        if self.election_timeout_floor_s is not None:
            return self.election_timeout_floor_s
        auto = max(0.4 * self.election_timeout_min_s, 3 * self.heartbeat_interval_s)
        if auto >= self.election_timeout_min_s or self._floor_problem(auto):
            return self.election_timeout_min_s
        return auto

    @property
    def lease_limit_s(self) -> float:
        """The lease must be strictly shorter than this (see class docstring)."""
        return self.lease_limit_for(self.election_timeout_min_s)

    def lease_limit_for(self, promise_s: float) -> float:
        """The safe bound on a lease taken from a heartbeat that carried `promise_s`."""
        drift = self.clock_drift_max
        return (promise_s / (1 + drift) - self.fence_margin_s) * (1 - drift)

    def lease_for(self, promise_s: float) -> float:
        """The lease a heartbeat earns once acknowledged with this promise:
        lease_s scaled to it. Checked on [promise_floor_s, election_timeout_min_s];
        a shorter promise (a member configured otherwise) is held under its
        own bound, and one with no safe lease earns none."""
        scaled = self.lease_s * promise_s / self.election_timeout_min_s
        return max(0.0, min(scaled, self.lease_limit_for(promise_s) * 0.999))

    def promise_for(self, round_trip_s: float) -> float:
        """The promise a leader asks for when acknowledgements take up to
        `round_trip_s`: the lease it earns covers a heartbeat interval plus
        twice that, within [promise_floor_s, election_timeout_min_s]."""
        wanted = (self.heartbeat_interval_s + 2 * round_trip_s) * self.election_timeout_min_s / self.lease_s
        return min(self.election_timeout_min_s, max(self.promise_floor_s, wanted))

    def election_timeout_for(self, promise_s: float, spread: float) -> float:
        """A follower's election timeout after a heartbeat with this promise:
        the configured range scaled to it; `spread` in [0, 1)."""
        scale = promise_s / self.election_timeout_min_s
        return scale * (
            self.election_timeout_min_s + spread * (self.election_timeout_max_s - self.election_timeout_min_s)
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Replication:
    mode: ReplicationMode = ReplicationMode.QUORUM
    sync_count: int = 1  # k in ANY k; quorum mode only
    max_lag_bytes: int = 16 * 1024 * 1024  # async mode: a standby further behind never promotes

    def __post_init__(self) -> None:
        if not isinstance(self.mode, ReplicationMode):
            raise SpecError("mode", f"{self.mode!r} is not 'quorum' or 'async'")
        if isinstance(self.sync_count, bool) or not isinstance(self.sync_count, int) or self.sync_count < 0:
            raise SpecError("sync_count", f"{self.sync_count!r} is not a non-negative integer")
        if isinstance(self.max_lag_bytes, bool) or not isinstance(self.max_lag_bytes, int) or self.max_lag_bytes < 0:
            raise SpecError("max_lag_bytes", f"{self.max_lag_bytes!r} is not a non-negative integer")
        if self.mode is ReplicationMode.QUORUM and self.sync_count < 1:
            raise SpecError("sync_count", "quorum mode needs sync_count >= 1 (use mode = 'async' for none)")


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterSpec:
    name: str
    members: tuple[Member, ...]
    timing: Timing = Timing()
    replication: Replication = Replication()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _is_member_name(self.name):
            raise SpecError("cluster.name", f"{self.name!r} is not a cluster name (1-63 of a-z, 0-9, '-', '_')")
        names = [m.name for m in self.members]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise SpecError(f"nodes[{index}].name", f"{name!r} is used by more than one member")
        if len(self.members) > 9:
            raise SpecError("nodes", f"{len(self.members)} members; at most 9 are supported")
        data = self.data_members
        if not data:
            raise SpecError("nodes", "no data member; at least one member must have kind = 'data'")
        if len(self.members) < 3:
            raise SpecError(
                "nodes",
                f"{len(self.members)} member(s) can never keep a quorum through a failure: a majority of "
                f"{len(self.members)} is {self.majority}, so losing any one member stops the cluster; "
                "add a data member or a witness (kind = 'witness') to make three",
            )
        if not any(m.can_lead for m in data):
            raise SpecError("nodes", "every data member has nofailover = true; nothing could ever become primary")
        if self.replication.mode is ReplicationMode.QUORUM:
            k = self.replication.sync_count
            if k > len(data) - 1:
                raise SpecError(
                    "replication.sync_count",
                    f"{k} synchronous standbys requested but only {len(data) - 1} standby data member(s) exist",
                )

    @property
    def data_members(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.is_data)

    @property
    def majority(self) -> int:
        return len(self.members) // 2 + 1

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def has_member(self, name: str) -> bool:
        return any(m.name == name for m in self.members)

    def data_votes_needed(self, sync_count: int) -> int:
        """Data members (the candidate included) that must vouch for a new primary's WAL.

        Quorum mode: D - k, so that with the k+1 nodes holding every commit the
        two sets share a member. Async mode: only the candidate itself.
        """
        if self.replication.mode is ReplicationMode.ASYNC:
            return 1
        return len(self.data_members) - sync_count
