"""The observing side of `failoverd.adapters.postgres.adapter.PostgresAdapter`: the probe
(role, exact WAL position, whom a standby streams from; see the module
docstring of failoverd.adapters.postgres.adapter for how each position is found), the end of
WAL of a stopped server, and the role and position reads the actions use.

Kept apart from adapter.py so each file reads on its own; the mixin relies on
the attributes and helpers `PostgresAdapter` provides, declared by
`failoverd.adapters.postgres.base.PostgresBase`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import asyncpg

from failoverd.adapters import processes, programs
from failoverd.adapters.postgres import setup
from failoverd.adapters.postgres.base import PostgresBase
from failoverd.core.state import PgObservation, PgRole, Position

_READY_POLL_S = 0.2
POSTMASTER_CHECK_S = 1.0  # see PostgresAdapter.__init__
# SSLRequest: the first message a libpq client may send. The backend the
# postmaster forks for the connection answers it with one byte, N or S.
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)

# What a server that is stopping or starting says to a new connection
# (postmaster.c's CAC_* messages).
_PASSING_STATES = ("the database system is shutting down", "the database system is starting up")

_PROBE_SQL = """
WITH r AS MATERIALIZED (SELECT pg_is_in_recovery() AS rec)
SELECT r.rec,
       CASE WHEN r.rec THEN NULL ELSE pg_current_wal_lsn()::text END AS current_lsn,
       CASE WHEN r.rec THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END AS walfile,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       w.status, w.received_tli, w.flushed_lsn::text AS flushed_lsn, w.sender_host, w.sender_port
FROM r LEFT JOIN pg_stat_wal_receiver w ON true
"""


class PostgresProbe(PostgresBase):
    """Mixin of `failoverd.adapters.postgres.adapter.PostgresAdapter`: it observes, and changes
    nothing on the server. It uses the adapter's attributes config, node, pg,
    data_dir, socket_dir, probe_timeout_s, command_timeout_s, log, _lock, the
    probe connection (_probe_conn, _probe_conn_at, _keep_probe_conn) and the
    WAL scan cache (_scan, _scan_task, _identify_failed_logged), all set by
    `PostgresAdapter.__init__`, and its methods postmaster_pid, _has_data,
    _local and _bin (all declared by `PostgresBase`)."""

    # ------------------------------------------------------------------ probe

    async def probe(self, observed_at: float) -> PgObservation:
        """What the local PostgreSQL is doing now. Never raises (a cancellation
        of the caller still propagates)."""
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                return await self._probe(observed_at)
        except Exception as error:  # noqa: BLE001 - any failure is an observation, not an error
            self._drop_probe_conn()
            self.log.debug("pg_probe_failed", error=f"{type(error).__name__}: {error}"[:300])
        except BaseException:  # cancelled mid-query: the connection's state is unknown
            self._drop_probe_conn()
            raise
        stalled = False
        try:
            if not self._has_data():
                return PgObservation(PgRole.ABSENT, observed_at)
            pid = self.postmaster_pid()
            if pid is None:
                return PgObservation(PgRole.STOPPED, observed_at, self._cached_scan())
            stalled = processes.server_stalled(pid)
        except OSError:
            pass
        return PgObservation(PgRole.UNRESPONSIVE, observed_at, stalled=stalled)

    async def _probe(self, observed_at: float) -> PgObservation:
        if not self._has_data():
            return PgObservation(PgRole.ABSENT, observed_at)
        pid = self.postmaster_pid()
        if pid is None:
            self._drop_probe_conn()
            return PgObservation(PgRole.STOPPED, observed_at, await self._stopped_position())
        if processes.is_stopped(pid):
            self._drop_probe_conn()
            return PgObservation(PgRole.UNRESPONSIVE, observed_at, stalled=True)
        row = await self._probe_query()
        if not row["rec"]:
            position = Position(setup.timeline_of_walfile(row["walfile"]), setup.parse_lsn(row["current_lsn"]))
            return PgObservation(PgRole.PRIMARY, observed_at, position)
        return PgObservation(PgRole.STANDBY, observed_at, await self._standby_position(row), self._following(row))

    async def _standby_position(self, row: asyncpg.Record) -> Position | None:
        receive = None
        if row["received_tli"] and row["flushed_lsn"]:
            receive = Position(row["received_tli"], setup.parse_lsn(row["flushed_lsn"]))
        replay = None if row["replay_lsn"] is None else setup.parse_lsn(row["replay_lsn"])
        # The receiver streams the timeline replay is heading for, never an
        # older one, so while it is ahead of replay its position covers both.
        if receive is not None and replay is not None and replay <= receive.lsn:
            return receive
        identified = await self._identify_system()
        if identified is None:
            return None  # unknown beats understated: see the module docstring
        return identified if receive is None else max(receive, identified)

    async def _identify_system(self) -> Position | None:
        dsn = setup.conninfo(
            host=self.socket_dir, port=self.pg.port, user=self.pg.superuser, replication="true", connect_timeout=2
        )
        argv = [str(await self._bin("psql")), "-X", "-A", "-t", "-q", "-w", "-c", "IDENTIFY_SYSTEM", dsn]
        try:
            out = await programs.run(argv, user=None, timeout_s=self.probe_timeout_s)
            fields = out.stdout.strip().split("|")
            return Position(int(fields[1]), setup.parse_lsn(fields[2]))
        except (programs.CommandFailed, IndexError, ValueError) as error:
            if any(state in str(error) for state in _PASSING_STATES):
                # A server going down or coming up: nothing to fix, and the
                # once-only warning stays for a refusal that lasts.
                self.log.debug("pg_identify_system_failed", error=str(error)[:300])
            elif not self._identify_failed_logged:  # once: it repeats every probe
                self._identify_failed_logged = True
                self.log.warning(
                    "pg_identify_system_failed",
                    error=str(error)[:300],
                    hint="pg_hba.conf needs 'local replication all trust'",
                )
            return None

    def _following(self, row: asyncpg.Record) -> str | None:
        if row["status"] != "streaming" or row["sender_host"] is None:
            return None
        sender = setup.address_key(row["sender_host"], row["sender_port"])
        for member in self.config.nodes:
            pg = member.postgres
            if member.name != self.node.name and pg is not None and setup.address_key(pg.host, pg.port) == sender:
                return member.name
        return None

    # ---------------------------------------------------- stopped: end of WAL

    async def _stopped_position(self) -> Position | None:
        if self._lock.locked():
            # An action may be rewriting the directory: only a scan of exactly
            # the WAL and pg_control still there (e.g. before a restart) holds.
            return self._cached_scan()
        fingerprint = self._fingerprint()
        if self._scan is not None and self._scan[0] == fingerprint:
            return self._scan[1]
        if self._scan_task is None or self._scan_task.done():
            self._scan_task = asyncio.create_task(self._scan_wal(fingerprint), name=f"wal-scan-{self.node.name}")
        # Awaited, not reported as unknown meanwhile: the core takes a stopped
        # server's position as its final one (a switchover hands over once
        # the target has it; unknown means "the scan failed, go on").
        # Shielded: a probe timing out must not abort a scan the next probe can use.
        return await asyncio.shield(self._scan_task)

    def _cached_scan(self) -> Position | None:
        try:
            fingerprint = self._fingerprint()
        except OSError:
            return None
        return self._scan[1] if self._scan is not None and self._scan[0] == fingerprint else None

    def _fingerprint(self) -> tuple:
        def stamp(path: Path) -> tuple[str, int, int]:
            st = path.stat()
            return (path.name, st.st_size, st.st_mtime_ns)

        wal = self.data_dir / "pg_wal"
        return (stamp(self.data_dir / "global" / "pg_control"), tuple(sorted(stamp(p) for p in wal.iterdir())))

    async def _scan_wal(self, fingerprint: tuple) -> Position | None:
        try:
            position = await self._wal_end()
        except (programs.CommandFailed, OSError, ValueError, KeyError) as error:
            self.log.warning("pg_wal_end_unknown", error=str(error)[:300])
            position = None
        self._scan = (fingerprint, position)
        return position

    async def _wal_end(self) -> Position | None:
        control = await self._controldata()
        segment_size = int(control["Bytes per WAL segment"])
        checkpoint = Position(
            int(control["Latest checkpoint's TimeLineID"]), setup.parse_lsn(control["Latest checkpoint location"])
        )
        wal = self.data_dir / "pg_wal"
        timelines = {setup.timeline_of_walfile(p.name) for p in wal.iterdir() if len(p.name) == 24 and p.is_file()}
        newest = max(timelines | {checkpoint.timeline})
        if newest > checkpoint.timeline:
            # WAL of a newer timeline than the checkpoint's (received after the
            # last restartpoint): scan it from where that timeline begins.
            history = wal / f"{newest:08X}.history"
            begins = setup.parse_history(history.read_text())[-1][1] if history.exists() else None
            if begins is not None and begins >= checkpoint.lsn:
                end = await self._waldump_end(newest, begins, segment_size)
                if end is not None:
                    return Position(newest, end)
        end = await self._waldump_end(checkpoint.timeline, checkpoint.lsn, segment_size)
        return None if end is None else Position(checkpoint.timeline, end)

    async def _waldump_end(self, timeline: int, start: int, segment_size: int) -> int | None:
        argv = [
            str(await self._bin("pg_waldump")),
            "-q",
            "-p",
            str(self.data_dir / "pg_wal"),
            "-t",
            str(timeline),
            "-s",
            setup.format_lsn(start),
        ]
        done = await programs.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s, check=False)
        end = setup.waldump_end(done.stderr, segment_size)
        return end if end is not None and end >= start else None

    # ------------------------------------------------------------- local side

    async def _probe_query(self) -> asyncpg.Record:
        if not self._keep_probe_conn:
            async with self._local() as conn:
                return await conn.fetchrow(_PROBE_SQL)
        if time.monotonic() - self._probe_conn_at >= POSTMASTER_CHECK_S:
            await self._postmaster_answers()
            self._probe_conn_at = time.monotonic()
        kept = self._probe_conn
        if kept is not None and not kept.is_closed():
            try:
                return await kept.fetchrow(_PROBE_SQL)
            except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError):
                # The server restarted under the kept connection (a
                # switchover's old primary, a follow): not a sign of trouble.
                self._drop_probe_conn()
        # Its one query is prepared once per connection (asyncpg's statement
        # cache), not parsed again on every probe.
        self._probe_conn = await asyncpg.connect(
            host=str(self.socket_dir),
            port=self.pg.port,
            user=self.pg.superuser,
            database=self.pg.database,
            server_settings={"application_name": "failoverd"},
        )
        self._probe_conn_at = time.monotonic()
        return await self._probe_conn.fetchrow(_PROBE_SQL)

    async def _postmaster_answers(self) -> None:
        """Raise unless the postmaster accepts a new connection and starts a
        backend for it: what the kept probe connection cannot show, since its
        own backend answers even while the postmaster hangs. A connection
        that goes no further than this SSLRequest costs the server a fork
        and logs nothing; a full login would also cost us authentication
        and asyncpg's set-up, the most expensive part of an idle probe."""
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, str(self.socket_dir / f".s.PGSQL.{self.pg.port}"))
            await loop.sock_sendall(sock, _SSL_REQUEST)
            answer = await loop.sock_recv(sock, 1)
        if answer not in (b"N", b"S"):
            # Nothing (the backend exited at once), or the postmaster's own
            # error message when it could not fork one.
            raise ConnectionError(f"the postmaster started no backend for a new connection (answered {answer!r})")

    def _drop_probe_conn(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        if conn is not None:
            conn.terminate()

    async def _role(self) -> PgRole:
        """The server's role, for actions (no position)."""
        if not self._has_data():
            return PgRole.ABSENT
        if self.postmaster_pid() is None:
            return PgRole.STOPPED
        try:
            async with self._local(max(self.probe_timeout_s, 5.0)) as conn:
                in_recovery = await conn.fetchval("SELECT pg_is_in_recovery()")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return PgRole.STOPPED if self.postmaster_pid() is None else PgRole.UNRESPONSIVE
        return PgRole.STANDBY if in_recovery else PgRole.PRIMARY

    async def _wait_ready(self) -> PgRole:
        deadline = time.monotonic() + self.command_timeout_s
        while (role := await self._role()) is PgRole.UNRESPONSIVE and time.monotonic() < deadline:
            await asyncio.sleep(_READY_POLL_S)
        return role

    async def _running_position(self) -> Position | None:
        return await self._standby_position(await self._local_row())

    async def _local_row(self, timeout_s: float | None = None) -> asyncpg.Record:
        async with self._local(timeout_s or self.command_timeout_s) as conn:
            return await conn.fetchrow(_PROBE_SQL)

    async def _wal_end_now(self) -> Position | None:
        try:
            return await self._wal_end()
        except (programs.CommandFailed, OSError, ValueError, KeyError) as error:
            self.log.warning("pg_wal_end_unknown", error=str(error)[:300])
            return None

    async def _controldata(self) -> dict[str, str]:
        argv = [str(await self._bin("pg_controldata")), "-D", str(self.data_dir)]
        done = await programs.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s)
        return setup.parse_controldata(done.stdout)
