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
5. `Fence`, `Demote`, `Promote`, `Follow`, `StartStandby`, `ConfigureSync`,
   `Checkpoint` and `Rebuild` may take long; the caller starts them and keeps
   feeding ticks and messages. The core learns their outcome from later
   `observe()` calls, and from the outcome inputs where it waits for one
   (`promotion_failed`, `checkpoint_done`, `rebuild_done`, `vip_result`).
6. A `Fence` first drops every PostgreSQL action still queued and stops the
   one running: nothing decided before the fence may restart or promote the
   server behind it.
"""

from __future__ import annotations

import dataclasses
import enum

from failoverd.core.events import Event
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
class Checkpoint:
    """CHECKPOINT the local PostgreSQL (before a switchover, so that the
    shutdown checkpoint, during which writes wait, has little left to do).
    The caller reports the outcome with `checkpoint_done`."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Rebuild:
    """An operator's reinit: stop the local standby, keep its data directory
    aside, clone it afresh from `leader`. The caller reports the outcome
    with `rebuild_done`, also when a fence dropped it."""

    leader: str


@dataclasses.dataclass(frozen=True, slots=True)
class RestartServer:
    """An operator's restart of the local standby (fast stop, start as it
    was). The caller reports the outcome with `restart_done`, also when a
    fence dropped it."""


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
    """One structured event (role change, vote, lease loss, ...)."""

    event: Event


class ReplyCode(enum.Enum):
    OK = "ok"  # done, or started
    REDIRECT = "redirect"  # another member must answer: `Reply.redirect` names it
    UNAVAILABLE = "unavailable"  # nothing was done: nobody can answer now (no live leader); retry later
    CONFLICT = "conflict"  # refused in the cluster's present state (paused, a switchover runs, ...)
    INVALID = "invalid"  # refused whatever the state (not a member, may not lead, ...)


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """The answer to an admin request. It may come in a later action list
    than the request's (a switchover answers once its checkpoint is done)."""

    request_id: int
    code: ReplyCode
    message: str
    redirect: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.code, ReplyCode):
            raise TypeError(f"code: {self.code!r} is not a ReplyCode")
        if (self.code is ReplyCode.REDIRECT) != (self.redirect is not None):
            raise ValueError("a redirect, and only a redirect, names the member to ask")

    @property
    def ok(self) -> bool:
        return self.code is ReplyCode.OK


Action = (
    Persist
    | Send
    | ArmWatchdog
    | Fence
    | Demote
    | ConfigureSync
    | Promote
    | Follow
    | StartStandby
    | Checkpoint
    | Rebuild
    | RestartServer
    | PrepareVip
    | AcquireVip
    | ReleaseVip
    | ProbeNow
    | Emit
    | Reply
)
# The slow PostgreSQL work the caller queues and runs one at a time.
PG_WORK = (Promote, Follow, StartStandby, Demote, ConfigureSync, Checkpoint, Rebuild, RestartServer)
