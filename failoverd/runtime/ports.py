"""What the supervisor (runtime/supervisor.py) needs of each adapter around it.

The daemon wires in the real ones (adapters/postgres, peers, watchdog,
statefile, vip; runtime/hooks); the simulator and the supervisor's unit
tests wire in their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from failoverd.core.messages import Message
from failoverd.core.state import PersistentState, PgObservation


class PostgresPort(Protocol):
    async def probe(self, observed_at: float) -> PgObservation: ...
    async def promote(self) -> None: ...
    async def start_standby(self, upstream: Any) -> None: ...
    async def follow(self, leader: Any) -> None: ...
    async def stop(self, mode: Literal["fast", "immediate"]) -> None: ...
    async def configure_sync(self, sync_count: int, standbys: tuple[str, ...]) -> None: ...
    async def ensure_slots(self, standbys: tuple[str, ...]) -> None: ...
    async def checkpoint(self, timeout_s: float) -> None: ...
    async def reinit(self, leader: Any) -> None: ...
    async def restart(self) -> None: ...
    @property
    def pending_restart(self) -> tuple[str, ...]: ...  # settings that wait for a restart
    @property
    def waiting_on_upstream(self) -> bool: ...  # a running follow() may be cancelled harmlessly
    def watch_postmaster(self, wake: Callable[[], None]) -> None: ...  # wake() when the postmaster exits


class PeersPort(Protocol):
    def send(self, to: str, msg: Message) -> None: ...


class WatchdogPort(Protocol):
    async def arm(self, deadline: float) -> None: ...
    async def disarm(self) -> None: ...


class HooksPort(Protocol):
    def role_changed(self, *, term: int, role: str, previous: str, reason: str) -> None: ...
    def vip_changed(self, *, term: int, action: str, reason: str) -> None: ...
    async def pre_promote(self, term: int) -> str | None: ...


class StatePort(Protocol):
    def save(self, state: PersistentState) -> None: ...


class VipPort(Protocol):
    def precheck(self) -> None: ...  # start duplicate address detection early; adds nothing
    async def acquire(self) -> None: ...  # start adding the address in the background
    async def acquisition_result(self) -> str | None: ...  # how the last acquire() ended: None, or why it failed
    async def release(self) -> None: ...


class ProgramResult(Protocol):
    @property
    def returncode(self) -> int: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...


class ProgramRunner(Protocol):
    """Runs a program without a shell (hooks). Raises an exception whose
    `timed_out` attribute, if any, says that it ran out of time; any other
    exception means it could not start."""

    async def __call__(self, argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str]) -> ProgramResult: ...
