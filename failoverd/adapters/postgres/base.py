"""What the parts of `failoverd.adapters.postgres.adapter.PostgresAdapter` share.

The adapter is one class made of three: `PostgresAdapter` (adapter.py: the
configuration, the lifecycle and the settings) and its mixins `PostgresProbe`
(probe.py: observing) and `PostgresReplication` (replication.py: following,
cloning, rewinding). Each part uses attributes and helpers another one
provides; `PostgresBase` declares them, so that each file can be read and
type-checked on its own, and the imports point one way:
base <- probe, replication <- adapter.

Nothing here runs: the attributes are only annotated (`PostgresAdapter.__init__`
sets them), and each method stub raises NotImplementedError and names the
class that provides the real one, which comes first in the adapter's method
resolution order.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import asyncpg

from failoverd.config.load import Config, NodeConfig, PostgresNodeConfig
from failoverd.core.state import PgRole, Position


class PostgresBase:
    """The attributes and methods `PostgresAdapter`, `PostgresProbe` and
    `PostgresReplication` use of one another."""

    # Set by PostgresAdapter.__init__.
    config: Config
    node: NodeConfig
    pg: PostgresNodeConfig
    data_dir: Path
    socket_dir: Path
    probe_timeout_s: float
    command_timeout_s: float
    reclone_on_rewind_failure: bool
    log: Any  # a bound structlog logger
    _password: str  # the replication role's password
    _slot: str  # this member's replication slot name
    _lock: asyncio.Lock  # one changing action at a time
    # The probe connection kept between probes (PostgresProbe._probe_query).
    _probe_conn: asyncpg.Connection | None
    _probe_conn_at: float
    _keep_probe_conn: bool
    # The end-of-WAL scan of a stopped server: (fingerprint, position), and the scan running.
    _scan: tuple[tuple, Position | None] | None
    _scan_task: asyncio.Task[Position | None] | None
    _identify_failed_logged: bool
    # True while follow() only asks its upstream (PostgresReplication.waiting_on_upstream).
    _asking_upstream: bool

    # ------------------------------------------------- provided by PostgresAdapter

    @property
    def passfile(self) -> Path:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    def postmaster_pid(self) -> int | None:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    def _has_data(self) -> bool:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    def _owner(self) -> tuple[int, int] | None:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    def _local(self, timeout_s: float | None = None) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    async def _bin(self, program: str) -> Path:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    async def _start(self, *, upstream: NodeConfig | None, standby: bool = True, slot: str | None = None) -> None:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    async def _stop_escalating(self) -> None:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    async def _await_setting(
        self, name: str, value: str, timeout_s: float, conn: asyncpg.Connection | None = None
    ) -> None:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    async def _prepare_run_dir(self) -> None:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    async def _write_member_files(self, conninfo: str, slot: str, *, standby: bool) -> None:
        """Provided by `PostgresAdapter`."""
        raise NotImplementedError

    # --------------------------------------------------- provided by PostgresProbe

    async def _role(self) -> PgRole:
        """Provided by `PostgresProbe`."""
        raise NotImplementedError

    async def _local_row(self, timeout_s: float | None = None) -> asyncpg.Record:
        """Provided by `PostgresProbe`."""
        raise NotImplementedError

    async def _standby_position(self, row: asyncpg.Record) -> Position | None:
        """Provided by `PostgresProbe`."""
        raise NotImplementedError

    async def _wal_end_now(self) -> Position | None:
        """Provided by `PostgresProbe`."""
        raise NotImplementedError
