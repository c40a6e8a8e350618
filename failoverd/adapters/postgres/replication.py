"""The replication plumbing of `failoverd.adapters.postgres.adapter.PostgresAdapter`: following
a leader (clone, re-point, rewind or re-clone; see the module docstring of
failoverd.adapters.postgres.adapter), cascading from a switchover's target, rebuilding a
standby, and everything said to the server streamed from (slots, timeline
history, the checkpoint pg_rewind needs).

Kept apart from adapter.py so each file reads on its own; the mixin relies on
the attributes and helpers `PostgresAdapter` and `PostgresProbe` provide,
declared by `failoverd.adapters.postgres.base.PostgresBase`. `PostgresError` lives
here because both modules raise it; callers import it from failoverd.adapters.postgres.adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import asyncpg

from failoverd.adapters import programs
from failoverd.adapters.postgres import setup
from failoverd.adapters.postgres.base import PostgresBase
from failoverd.config.load import NodeConfig
from failoverd.core.follow import FollowFacts, FollowStep, may_discard_wal, plan_follow
from failoverd.core.state import PgRole, Position

RETARGET_WAIT_S = 10.0
# A server on the LAN answers a connection in milliseconds; one that does not
# answer in this long is gone or cut off, and a Follow of it must not hold up
# the PostgreSQL worker (a Promote may be queued behind it).
UPSTREAM_CONNECT_TIMEOUT_S = 2.0

_UPSTREAM_SQL = """
WITH r AS MATERIALIZED (SELECT pg_is_in_recovery() AS rec)
SELECT r.rec,
       CASE WHEN r.rec THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END AS walfile,
       CASE WHEN r.rec THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text
            ELSE pg_current_wal_lsn()::text END AS lsn
FROM r
"""


class PostgresError(Exception):
    """A PostgreSQL action cannot be carried out (the message says why)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Upstream:
    """The server to stream from, as `PostgresAdapter._upstream` found it."""

    in_recovery: bool
    timeline: int | None  # a primary's current timeline; None for a standby
    lsn: int  # a primary's current position; a standby's received (or replayed) end
    history: list[tuple[int, int]]  # a primary's timeline history
    slot: str  # our slot on it; '' when it could not be made


class PostgresReplication(PostgresBase):
    """Mixin of `failoverd.adapters.postgres.adapter.PostgresAdapter`: following and rebuilding
    from another member. It uses the adapter's attributes config, node, pg,
    data_dir, probe_timeout_s, command_timeout_s, reclone_on_rewind_failure,
    log, passfile, _lock, _password, _slot and
    _asking_upstream, set by
    `PostgresAdapter.__init__`, its lifecycle methods (postmaster_pid, _start,
    _stop_escalating, _await_setting), its local helpers (_local, _bin,
    _has_data, _owner, _prepare_run_dir, _write_member_files) and the reads of
    `failoverd.adapters.postgres.probe.PostgresProbe` (_role, _local_row, _standby_position,
    _wal_end_now), all declared by `PostgresBase`."""

    # -------------------------------------------------------------- following

    @property
    def waiting_on_upstream(self) -> bool:
        """Whether a running follow() is still only asking its upstream, with
        nothing changed locally yet, so that cancelling it is harmless. An
        upstream that can send but not receive holds that question for the
        connect timeout; a Promote must not wait behind it."""
        return self._asking_upstream

    async def _ask_upstream(self, leader: NodeConfig) -> _Upstream:
        self._asking_upstream = True
        try:
            return await self._upstream(leader)
        finally:
            self._asking_upstream = False

    async def follow(self, leader: NodeConfig) -> None:
        """Stream from `leader`: clone when there is no data directory, cascade
        from a standby, re-point a compatible standby, rewind (or re-clone) a
        diverged server. Each step is the core's (failoverd.core.follow): WAL
        is discarded only toward a server that is a primary when asked after
        our own server stopped."""
        if leader.postgres is None or leader.name == self.node.name:
            raise ValueError(f"{leader.name} cannot be followed")
        async with self._lock:
            # Our position before the leader's: WAL that streams in from it
            # while we ask must not make us look ahead of it (diverged). A
            # running server tells its role on the same connection.
            row = None
            if self._has_data() and self.postmaster_pid() is not None:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                    row = await self._local_row(max(self.probe_timeout_s, 5.0))  # as _role() waits
            role = await self._role() if row is None else PgRole.STANDBY if row["rec"] else PgRole.PRIMARY
            if role is PgRole.ABSENT:
                await self._clone(leader)
                await self._start(upstream=leader)
                return
            if role is not PgRole.STANDBY:
                row = None
            position = None if row is None else _receiver_position(row)
            up = await self._ask_upstream(leader)
            if row is not None and position is None and not up.in_recovery:
                # No WAL receiver covers it: the server tells (a subprocess,
                # kept off the cascade, which must be quick), and then the
                # leader is asked again, after ours.
                position = await self._standby_position(row)
                up = await self._ask_upstream(leader)
            if role is PgRole.STOPPED:
                position = await self._wal_end_now()
            step, why = plan_follow(FollowFacts(role, up.in_recovery, _prefix(position, up)))
            if step is FollowStep.STOP:
                self.log.info(
                    "pg_diverged" if role is PgRole.STANDBY else "pg_stopping_to_follow",
                    position=str(position),
                    leader=leader.name,
                    why=why,
                )
                await self._stop_escalating()
                # Our WAL is final now; the upstream is asked again, so that a
                # rewind never trusts an answer from before the stop.
                role, row = PgRole.STOPPED, None
                position = await self._wal_end_now()
                up = await self._ask_upstream(leader)
                step, why = plan_follow(FollowFacts(role, up.in_recovery, _prefix(position, up)))
            await self._follow_step(step, why, leader, role, up, row, position)

    async def _follow_step(
        self,
        step: FollowStep,
        why: str,
        leader: NodeConfig,
        role: PgRole,
        up: _Upstream,
        row: asyncpg.Record | None,
        position: Position | None,
    ) -> None:
        if step is FollowStep.CASCADE:
            await self._cascade(leader, role, up, row)
        elif step is FollowStep.RETARGET:
            await self._retarget(leader, slot=up.slot)
        elif step is FollowStep.START:
            await self._start(upstream=leader, slot=up.slot)
        elif step is FollowStep.REWIND:
            await self._rewind_or_reclone(leader, position)
            await self._start(upstream=leader, slot=up.slot)
        else:
            raise PostgresError(f"cannot follow {leader.name}: {why}")

    async def _cascade(self, upstream: NodeConfig, role: PgRole, up: _Upstream, row: asyncpg.Record | None) -> None:
        """Stream from `upstream` while it is still a standby: the target of a
        planned switchover, which the core follows before its promotion (it
        has checked that our WAL is a prefix of the target's; docs/design.md,
        "Planned switchover"). PostgreSQL follows the upstream's promotion onto
        the new timeline by itself. Never rewinds, restarts or clones: a
        server whose WAL goes further than the upstream's is left alone."""
        if role is PgRole.STOPPED:
            position = await self._wal_end_now()
            lsn = None if position is None else position.lsn
        elif role is PgRole.STANDBY and row is not None:
            # Only LSNs are compared here (the core compared timelines), so the
            # receiver's and replay's ends do, without a subprocess.
            ends = [setup.parse_lsn(row[k]) for k in ("flushed_lsn", "replay_lsn") if row[k] is not None]
            lsn = max(ends, default=None)
        else:
            raise PostgresError(f"cannot stream from {upstream.name}, a standby: this server is {role.value}")
        if lsn is None or lsn > up.lsn:
            mine = "unknown" if lsn is None else setup.format_lsn(lsn)
            raise PostgresError(
                f"cannot stream from {upstream.name}, a standby at {setup.format_lsn(up.lsn)}: "
                f"this server's WAL ends at {mine}"
            )
        self.log.info("pg_cascading", upstream=upstream.name, position=setup.format_lsn(lsn))
        if role is PgRole.STANDBY:
            await self._retarget(upstream, slot=up.slot)
        else:
            await self._start(upstream=upstream, slot=up.slot)

    async def reinit(self, leader: NodeConfig) -> None:
        """Rebuild this standby from `leader`: stop it, keep the data directory
        aside (never deleted), clone afresh and start streaming. Refused on a
        primary: only a standby (or a stopped server) is ever discarded."""
        if leader.postgres is None or leader.name == self.node.name:
            raise ValueError(f"{leader.name} cannot be cloned from")
        async with self._lock:
            role = await self._role()
            if role is PgRole.PRIMARY:
                raise PostgresError("refusing to rebuild a primary")
            # A standby stuck in recovery (what reinit is for) may refuse
            # connections; standby.signal says it cannot be taking writes.
            if role is PgRole.UNRESPONSIVE and not (self.data_dir / "standby.signal").exists():
                raise PostgresError("the server does not answer and is not in standby mode")
            if role in (PgRole.STANDBY, PgRole.UNRESPONSIVE):
                await self._stop_escalating()
            if role is not PgRole.ABSENT:
                # Asked after our stop: only a primary then holds every
                # acknowledged commit we hold (failoverd.core.follow).
                up = await self._ask_upstream(leader)
                if not may_discard_wal(up.in_recovery):
                    raise PostgresError(f"{leader.name} is not a primary: nothing rebuilt, nothing discarded")
                aside = await asyncio.to_thread(setup.move_aside, self.data_dir)
                self.log.warning("pg_data_dir_moved_aside", path=str(aside), reason="reinit")
            await self._clone(leader)
            await self._start(upstream=leader)
            self.log.info("pg_reinit_done", leader=leader.name)

    # -------------------------------------------------------- building blocks

    async def _clone(self, leader: NodeConfig) -> None:
        if self._has_data():
            raise PostgresError(f"{self.data_dir} already holds a cluster; not cloning over it")
        await asyncio.to_thread(setup.check_replaceable, self.data_dir)
        await self._prepare_run_dir()
        slot = await self._slot_on(leader)
        tmp = await asyncio.to_thread(setup.fresh_sibling_dir, self.data_dir, self._owner())
        argv = [
            str(await self._bin("pg_basebackup")),
            "-D",
            str(tmp),
            "-X",
            "stream",
            "-c",
            "fast",
            "-w",
            "-d",
            self._leader_dsn(leader, application_name=f"{self.node.name}_clone"),
        ]
        if slot:
            argv += ["-S", slot]
        started = time.monotonic()
        await programs.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s, env=self._libpq_env())
        await asyncio.to_thread(setup.move_into_place, tmp, self.data_dir)
        self.log.info("pg_clone_done", leader=leader.name, seconds=round(time.monotonic() - started, 2))

    async def _rewind_or_reclone(self, leader: NodeConfig, position: Position | None) -> None:
        try:
            await self._rewind(leader)
        except (programs.CommandFailed, PostgresError, OSError) as error:
            if not self.reclone_on_rewind_failure:
                raise
            self.log.warning("pg_rewind_failed", error=str(error)[:500], leader=leader.name)
            aside = await asyncio.to_thread(setup.move_aside, self.data_dir)
            self.log.warning("pg_data_dir_moved_aside", path=str(aside), position=str(position))
            await self._clone(leader)

    async def _rewind(self, leader: NodeConfig) -> None:
        await self._leader_checkpointed(leader)
        # pg_rewind completes crash recovery of an unclean target in single-user
        # mode, which refuses to start with a standby.signal present.
        await asyncio.to_thread(setup.set_standby_signal, self.data_dir, False, self._owner())
        await self._prepare_run_dir()
        argv = [
            str(await self._bin("pg_rewind")),
            "-D",
            str(self.data_dir),
            f"--source-server={self._leader_dsn(leader, dbname=self.pg.database)}",
        ]
        started = time.monotonic()
        try:
            done = await programs.run(
                argv, user=self.pg.os_user, timeout_s=self.command_timeout_s, env=self._libpq_env()
            )
        except BaseException:
            # Diverged WAL must never come up writable, even if someone starts it by hand.
            await asyncio.to_thread(setup.set_standby_signal, self.data_dir, True, self._owner())
            raise
        self.log.info(
            "pg_rewind_done",
            leader=leader.name,
            seconds=round(time.monotonic() - started, 2),
            output=(done.stdout + done.stderr).strip()[-300:],
        )

    async def _retarget(self, upstream: NodeConfig | None, slot: str | None = None) -> None:
        conninfo = "" if upstream is None else self._primary_conninfo(upstream)
        # One local connection throughout: on a switchover the standbys'
        # re-pointing is what the new primary's first commits wait for.
        async with self._local(self.command_timeout_s) as conn:
            current = await conn.fetchval("SELECT current_setting('primary_conninfo')")
            current_slot = await conn.fetchval("SELECT current_setting('primary_slot_name')")
            if current == conninfo and current_slot in ("", self._slot if upstream else ""):
                return
            if upstream is None:
                slot = ""
            elif slot is None:
                slot = await self._slot_on(upstream)
            await self._prepare_run_dir()
            await self._write_member_files(conninfo, slot, standby=True)
            overriding = await conn.fetch(
                "SELECT DISTINCT name FROM pg_file_settings WHERE sourcefile LIKE '%/postgresql.auto.conf'"
                " AND name = ANY($1::text[])",
                list(setup.MEMBER_KEYS),
            )
            for record in overriding:
                await conn.execute(f"ALTER SYSTEM RESET {record['name']}")
            await conn.execute("SELECT pg_reload_conf()")
            # The reload is asynchronous; PostgreSQL (13+) restarts the WAL
            # receiver once the startup process has seen the new value.
            await self._await_setting("primary_conninfo", conninfo, RETARGET_WAIT_S, conn)
        self.log.info("pg_retargeted", upstream=None if upstream is None else upstream.name)

    async def _drop_stale_slots(self) -> None:
        """Slots a former primary kept would pin WAL on this standby forever;
        followers re-create theirs on whichever server becomes primary."""
        members = {setup.slot_name(n.name) for n in self.config.nodes}
        try:
            async with self._local(self.command_timeout_s) as conn:
                dropped = await conn.fetch(
                    "SELECT slot_name, pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_type = 'physical' AND NOT active AND slot_name = ANY($1::text[])",
                    sorted(members),
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            self.log.info("pg_stale_slots_kept", error=str(error)[:200])  # not consistent yet, or busy
            return
        if dropped:
            self.log.info("pg_stale_slots_dropped", slots=[r["slot_name"] for r in dropped])

    # ---------------------------------------------------- talking to the leader

    async def _leader_conn(self, leader: NodeConfig) -> asyncpg.Connection:
        pg = leader.postgres
        assert pg is not None  # checked by callers; a witness has no server
        return await asyncpg.connect(
            host=pg.host,
            port=pg.port,
            user=self.pg.replication_user,
            password=self._password,
            database=self.pg.database,
            timeout=min(self.command_timeout_s, UPSTREAM_CONNECT_TIMEOUT_S),
            server_settings={"application_name": f"failoverd {self.node.name}"},
        )

    @contextlib.asynccontextmanager
    async def _leader(self, leader: NodeConfig) -> AsyncIterator[asyncpg.Connection]:
        async with asyncio.timeout(self.command_timeout_s):
            conn = await self._leader_conn(leader)
            try:
                yield conn
            finally:
                conn.terminate()

    async def _upstream(self, leader: NodeConfig) -> _Upstream:
        """What we need from the server we are to stream from, over one
        connection: whether it is a standby, its WAL position and timeline
        history (a primary), and our slot on it (made if missing)."""
        async with self._leader(leader) as conn:
            row = await conn.fetchrow(_UPSTREAM_SQL)
            if row["rec"]:
                return _Upstream(
                    True, None, setup.parse_lsn(row["lsn"] or "0/0"), [], await self._slot_in(conn, leader)
                )
            timeline = setup.timeline_of_walfile(row["walfile"])
            history: list[tuple[int, int]] = []
            if timeline > 1:
                raw = await conn.fetchval("SELECT pg_read_binary_file($1)", f"pg_wal/{timeline:08X}.history")
                history = setup.parse_history(raw.decode())
            return _Upstream(False, timeline, setup.parse_lsn(row["lsn"]), history, await self._slot_in(conn, leader))

    async def _leader_checkpointed(self, leader: NodeConfig) -> None:
        async with self._leader(leader) as conn:
            stale = await conn.fetchval(
                "SELECT c.timeline_id < ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
                " FROM pg_control_checkpoint() c"
            )
            if stale:
                await conn.execute("CHECKPOINT")

    async def _slot_on(self, upstream: NodeConfig) -> str:
        """Our slot on `upstream`, created if missing; '' when that fails (we
        then stream without one rather than not at all)."""
        try:
            async with self._leader(upstream) as conn:
                return await self._slot_in(conn, upstream)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            self.log.warning("pg_slot_unavailable", upstream=upstream.name, error=str(error)[:200])
            return ""

    async def _slot_in(self, conn: asyncpg.Connection, upstream: NodeConfig) -> str:
        try:
            await _create_slot(conn, self._slot)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            self.log.warning("pg_slot_unavailable", upstream=upstream.name, error=str(error)[:200])
            return ""
        return self._slot

    def _primary_conninfo(self, upstream: NodeConfig) -> str:
        return self._leader_dsn(upstream, application_name=self.node.name, passfile=self.passfile)

    def _leader_dsn(self, leader: NodeConfig, **extra: object) -> str:
        pg = leader.postgres
        assert pg is not None
        return setup.conninfo(host=pg.host, port=pg.port, user=self.pg.replication_user, connect_timeout=5, **extra)

    def _libpq_env(self) -> dict[str, str]:
        return {"PGPASSFILE": str(self.passfile), "PGCONNECT_TIMEOUT": "10"}


def _prefix(position: Position | None, up: _Upstream) -> bool | None:
    """Whether WAL ending at `position` is a prefix of a primary upstream's
    history (None: unknown, or the upstream is a standby)."""
    if position is None or up.in_recovery or up.timeline is None:
        return None
    return setup.compatible(position.timeline, position.lsn, up.timeline, up.lsn, up.history)


def _receiver_position(row: asyncpg.Record) -> Position | None:
    """A standby's position from the WAL receiver alone, when it covers replay
    (see PostgresAdapter._standby_position); None when the server must be asked."""
    if not (row["received_tli"] and row["flushed_lsn"]) or row["replay_lsn"] is None:
        return None
    receive = Position(row["received_tli"], setup.parse_lsn(row["flushed_lsn"]))
    return receive if setup.parse_lsn(row["replay_lsn"]) <= receive.lsn else None


async def _create_slot(conn: asyncpg.Connection, name: str) -> None:
    exists = await conn.fetchval("SELECT true FROM pg_replication_slots WHERE slot_name = $1", name)
    if not exists:
        with contextlib.suppress(asyncpg.DuplicateObjectError):  # created meanwhile by someone else
            await conn.execute("SELECT pg_create_physical_replication_slot($1, true)", name)
