"""What the core asks its caller to do.

Ordering contract (the caller MUST honour it; docs/design.md, "Actions"):

1. Actions are carried out in the order of the returned list.
2. `Persist` is durable (fsync'd) before any later action in the same list
   runs, in particular before any `Send`: a vote or a term is never announced
   before it would survive a crash.
3. `ReleaseVip` comes before or with `Fence`/`Demote`; `AcquireVip` is only
   returned after the core has *observed* its PostgreSQL out of recovery and
   while it holds a lease.
4. `ArmWatchdog` is handed to the fencing watchdog before `Promote` and before
   every later moment at which the PostgreSQL could accept writes; the
   watchdog stops PostgreSQL by itself once that local monotonic deadline has
   passed, or when the supervisor's pipe to it closes while armed.
5. `Fence`, `Demote`, `Promote`, `Follow` and `ConfigureSync` may take long;
   the caller starts them and keeps feeding ticks and messages. The core
   learns their outcome only from later `observe()` calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

from failoverd.core.messages import Message
from failoverd.core.state import PersistentState


@dataclasses.dataclass(frozen=True, slots=True)
class Persist:
    """Write term, vote and cluster state durably before continuing."""

    state: PersistentState


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    to: str
    message: Message


@dataclasses.dataclass(frozen=True, slots=True)
class ArmWatchdog:
    """Fence PostgreSQL at local monotonic time `deadline` unless re-armed; None disarms."""

    deadline: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class Fence:
    """Stop PostgreSQL at once (immediate shutdown): it must not accept another write."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Demote:
    """Stop PostgreSQL cleanly (fast shutdown, which checkpoints) for a planned switchover."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigureSync:
    """Set synchronous_standby_names = 'ANY k (standbys)'; k = 0 clears it."""

    sync_count: int
    standbys: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Promote:
    """Make the local PostgreSQL a writable primary (promote a standby)."""

    term: int


@dataclasses.dataclass(frozen=True, slots=True)
class Follow:
    """Run the local PostgreSQL as a standby of `leader` (rewind or re-clone if diverged)."""

    leader: str
    term: int


@dataclasses.dataclass(frozen=True, slots=True)
class StartStandby:
    """Start the stopped local PostgreSQL in recovery with no upstream yet, so that
    its WAL position is known and it can stand for election."""


@dataclasses.dataclass(frozen=True, slots=True)
class PrepareVip:
    """This member was just elected: an AcquireVip may follow soon. Checks that
    take time before the address can be added (duplicate address detection)
    may start now, so that they overlap the promotion; nothing is added."""

    term: int


@dataclasses.dataclass(frozen=True, slots=True)
class AcquireVip:
    term: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReleaseVip:
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeNow:
    """Probe the local PostgreSQL now instead of at the next interval."""


@dataclasses.dataclass(frozen=True, slots=True)
class Emit:
    """One structured log event (role change, vote, lease loss, ...)."""

    event: str
    fields: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.fields)


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """The answer to an admin request."""

    request_id: int
    ok: bool
    message: str


Action = Union[
    Persist, Send, ArmWatchdog, Fence, Demote, ConfigureSync, Promote, Follow, StartStandby,
    PrepareVip, AcquireVip, ReleaseVip, ProbeNow, Emit, Reply,
]
