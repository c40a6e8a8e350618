"""A simulated PostgreSQL: just enough WAL, replication and role behaviour to
check that the core never loses an acknowledged commit or makes two primaries.

WAL is a list of unique entries. Every entry is appended exactly once, on one
primary, and standbys only ever copy prefixes, so two WALs that hold the same
entry at index i agree on everything before it; that makes the divergence test
O(1). Promotion appends a marker entry on a new timeline, like the
end-of-recovery record of a real promotion, so a demoted old primary that wrote
past the fork is seen as diverged and must be rewound.
"""

from __future__ import annotations

import dataclasses
import enum

from failoverd.core.state import PgObservation, PgRole, Position


class SimRole(enum.Enum):
    ABSENT = "absent"
    STOPPED = "stopped"
    STANDBY = "standby"
    PRIMARY = "primary"
    STOPPING = "stopping"  # fast shutdown in progress: no new writes, still sending WAL


@dataclasses.dataclass(frozen=True, slots=True)
class WalEntry:
    timeline: int
    key: str  # unique: "w<id>" for a client write, a marker otherwise
    write_id: int | None = None


@dataclasses.dataclass
class SimPostgres:
    name: str
    role: SimRole = SimRole.ABSENT
    wal: list[WalEntry] = dataclasses.field(default_factory=list)
    upstream: str | None = None  # primary_conninfo
    sync_count: int = 0
    sync_names: tuple[str, ...] = ()
    flush_acks: dict[str, int] = dataclasses.field(default_factory=dict)  # standby -> flushed LSN (primary side)
    pending: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (lsn, write_id) awaiting sync acks
    write_ids: set[int] = dataclasses.field(default_factory=set)
    replication_stalled_until: float = 0.0
    probe_hung_until: float = 0.0  # probes time out (UNRESPONSIVE, position unknown) but the server works
    # ... and say the server is stalled while it works: evidence that lies
    # must cost a needless failover at worst, never safety.
    probe_says_stalled: bool = False
    # Counts stops: a promotion asked of one run of the server is void once it
    # stops (PostgreSQL removes a leftover promote signal file at start-up).
    stops: int = 0

    @property
    def lsn(self) -> int:
        return len(self.wal)

    @property
    def timeline(self) -> int:
        return self.wal[-1].timeline if self.wal else 1

    @property
    def running(self) -> bool:
        return self.role in (SimRole.STANDBY, SimRole.PRIMARY, SimRole.STOPPING)

    @property
    def writable(self) -> bool:
        return self.role is SimRole.PRIMARY

    def position(self) -> Position | None:
        if self.role is SimRole.ABSENT:
            return None
        return Position(self.timeline, self.lsn)

    def append(self, entry: WalEntry) -> None:
        self.wal.append(entry)
        if entry.write_id is not None:
            self.write_ids.add(entry.write_id)

    def truncate(self, length: int) -> None:
        if length < len(self.wal):
            del self.wal[length:]
            self.write_ids = {e.write_id for e in self.wal if e.write_id is not None}

    def compatible_with(self, upstream: SimPostgres) -> bool:
        """Our WAL is a prefix of the upstream's (we can stream from it)."""
        n = len(self.wal)
        if n == 0:
            return True
        return n <= len(upstream.wal) and upstream.wal[n - 1] is self.wal[n - 1]

    def common_prefix(self, other: SimPostgres) -> int:
        n = min(len(self.wal), len(other.wal))
        while n > 0 and other.wal[n - 1] is not self.wal[n - 1]:
            n -= 1
        return n

    def stop(self) -> list[int]:
        """Immediate stop; returns the write ids that were never acknowledged."""
        lost = [wid for _, wid in self.pending]
        self.stops += 1
        self.pending.clear()
        self.flush_acks.clear()
        if self.role is not SimRole.ABSENT:
            self.role = SimRole.STOPPED
        return lost

    def observation(self, observed_at: float, following: str | None) -> PgObservation:
        if self.role is SimRole.STOPPING:
            return PgObservation(role=PgRole.UNRESPONSIVE, observed_at=observed_at, position=None)
        role = {
            SimRole.ABSENT: PgRole.ABSENT,
            SimRole.STOPPED: PgRole.STOPPED,
            SimRole.STANDBY: PgRole.STANDBY,
            SimRole.PRIMARY: PgRole.PRIMARY,
            SimRole.STOPPING: PgRole.UNRESPONSIVE,
        }[self.role]
        return PgObservation(role=role, observed_at=observed_at, position=self.position(), following=following)

    def acked_by_sync(self, lsn: int) -> bool:
        if self.sync_count == 0:
            return True
        count = sum(1 for n in self.sync_names if self.flush_acks.get(n, 0) >= lsn)
        return count >= self.sync_count
