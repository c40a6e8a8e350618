"""The PostgreSQL adapter: probes the local server and carries out the core's
PostgreSQL actions (docs/design.md §2, §9) on a real PostgreSQL (15+).

Thin on purpose: it decides nothing about *whether* to promote or follow, only
*how*. Every method is bounded in time: programs by `command_timeout_s`
(oscmd kills them when it passes), probes by `probe_timeout_s`.

WAL positions (what `probe` reports; the core's safety argument rests on them
being at least every commit the server holds, so they are exact, never a
stale lower bound):

* primary: (current timeline, pg_current_wal_lsn()). The timeline comes from
  pg_walfile_name(), which uses the live insert timeline; pg_control's
  checkpoint timeline lags a promotion until the next checkpoint.
* standby: the WAL it has received and flushed, and replayed. While the WAL
  receiver runs, (received_tli, flushed_lsn) from pg_stat_wal_receiver covers
  replay too. Otherwise (the upstream died: exactly when elections happen)
  the receiver's timeline is no longer visible in SQL, so we ask the server
  with IDENTIFY_SYSTEM over a local replication connection, which answers
  (replay timeline, max(replay, flushed receive on that timeline)).
* stopped: the end of valid WAL on disk, found by `pg_waldump -q` from the
  last checkpoint on the newest timeline present, exactly where crash
  recovery would stop. pg_control alone is not enough: after an immediate
  stop or a crash its checkpoint and minimum recovery point can be far
  behind WAL that was flushed and acknowledged. The scan is cached while
  the directory is unchanged.

`following` names the member whose address pg_stat_wal_receiver shows as the
sender (the connection actually made from primary_conninfo) while its status
is 'streaming'.

Following a leader (`follow`):

* no data directory: pg_basebackup into a sibling directory, renamed into
  place when complete, so a half-done clone never looks like a cluster;
* a running standby whose WAL is a prefix of the leader's history (checked
  against the leader's timeline history file): primary_conninfo is changed
  and the configuration reloaded; PostgreSQL 13+ restarts the WAL receiver
  on reload, so the server keeps running;
* anything else (a primary, a diverged standby, a stopped server) is stopped
  (fast, then immediate), its end of WAL compared with the leader's history,
  and if it is not a prefix, rewound with pg_rewind. A server that did not
  shut down cleanly is left to pg_rewind, which finishes crash recovery in
  single-user mode first (its default since PostgreSQL 13); standby.signal is
  removed for that, since single-user mode refuses standby mode. The leader
  is made to CHECKPOINT first if its pg_control still shows the timeline
  before its promotion, or pg_rewind would see "no rewind required". If the
  rewind fails and reclone_on_rewind_failure is set, the data directory is
  renamed to <data_dir>.failed-<UTC time> (never deleted) and cloned anew.

Each standby streams through a physical slot named after itself, which it
creates on its upstream (a freshly promoted primary has none); a standby
drops member slots it kept from its own time as primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import asyncpg
import structlog

from failoverd import oscmd, procs
from failoverd import pgsetup as setup
from failoverd.config import Config, NodeConfig, PostgresNodeConfig
from failoverd.core.state import PgObservation, PgRole, Position

IMMEDIATE_STOP_S = 3  # our wait for an immediate stop before we SIGKILL
KILL_WAIT_S = 2.0
RETARGET_WAIT_S = 10.0
SYNC_APPLY_WAIT_S = 5.0
_READY_POLL_S = 0.2
# How often we look whether a stop, a promotion or a reload has taken effect.
# pg_ctl stop -w and pg_promote(wait => true) look every 100 ms; on the path
# of a switchover each such step is writes waiting, so we look ourselves.
_FAST_POLL_S = 0.01
# What `pg_ctl stop -m <mode>` sends to the postmaster.
_STOP_SIGNALS = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}
START_GRACE_S = 5.0  # a postmaster not running this long after pg_ctl start failed to start
PROBE_RECONNECT_S = 1.0  # see PostgresAdapter.__init__
# A server on the LAN answers a connection in milliseconds; one that does not
# answer in this long is gone or cut off, and a Follow of it must not hold up
# the PostgreSQL worker (a Promote may be queued behind it).
UPSTREAM_CONNECT_TIMEOUT_S = 2.0

_PROBE_SQL = """
WITH r AS MATERIALIZED (SELECT pg_is_in_recovery() AS rec)
SELECT r.rec,
       CASE WHEN r.rec THEN NULL ELSE pg_current_wal_lsn()::text END AS current_lsn,
       CASE WHEN r.rec THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END AS walfile,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       w.status, w.received_tli, w.flushed_lsn::text AS flushed_lsn, w.sender_host, w.sender_port
FROM r LEFT JOIN pg_stat_wal_receiver w ON true
"""
_REWIND_FUNCTIONS = (
    "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    "pg_catalog.pg_stat_file(text, boolean)",
    "pg_catalog.pg_read_binary_file(text)",
    "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
    "pg_catalog.pg_control_checkpoint()",
)


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


def socket_dir_for(config: Config, pg: PostgresNodeConfig) -> Path:
    """The private directory holding the member's socket, password file and log."""
    return config.postgres_defaults.socket_dir or Path(f"{pg.data_dir}.run")


class PostgresAdapter:
    def __init__(
        self,
        config: Config,
        node: NodeConfig,
        secret: bytes,
        *,
        probe_timeout_s: float | None = None,  # None: [postgres] probe_timeout_s
        keep_probe_connection: bool = False,  # the daemon's choice; call close() then
        log: Any = None,
    ) -> None:
        if node.postgres is None:
            raise ValueError(f"{node.name} is a witness: it has no PostgreSQL")
        self.config = config
        self.node = node
        self.pg = node.postgres
        self.data_dir = self.pg.data_dir
        self.socket_dir = socket_dir_for(config, self.pg)
        problem = setup.socket_path_problem(self.socket_dir, self.pg.port)
        if problem is not None:
            raise ValueError(problem)
        defaults = config.postgres_defaults
        self.probe_timeout_s = defaults.probe_timeout_s if probe_timeout_s is None else probe_timeout_s
        self.command_timeout_s = defaults.command_timeout_s
        self.reclone_on_rewind_failure = defaults.reclone_on_rewind_failure
        self.log = (log or structlog.get_logger("failoverd.postgres")).bind(node=node.name)
        self._password = setup.replication_password(secret)
        self._slot = setup.slot_name(node.name)
        self._bin_dir: Path | None = self.pg.bin_dir
        self._lock = asyncio.Lock()  # one changing action at a time; stop() never waits for it
        # The last synchronous_standby_names asked for: promote() makes sure it is
        # in effect before the server takes writes, whatever became of that request.
        self._sync_wanted: str | None = None
        self._scan: tuple[tuple, Position | None] | None = None
        self._scan_task: asyncio.Task[Position | None] | None = None
        self._identify_failed_logged = False
        # One connection kept for the probes (ten a second by default): a new
        # connection per probe costs a backend fork and most of an idle
        # supervisor's CPU. Any error or timeout drops it. It is renewed every
        # PROBE_RECONNECT_S, because only a new connection shows that the
        # postmaster still accepts clients (a kept one is served by its own
        # backend even when the postmaster hangs); a stopped postmaster
        # (SIGSTOP) is seen at once from /proc.
        self._probe_conn: asyncpg.Connection | None = None
        self._probe_conn_at = 0.0
        self._keep_probe_conn = keep_probe_connection

    @property
    def passfile(self) -> Path:
        return self.socket_dir / "pgpass"

    @property
    def logfile(self) -> Path:
        return self.socket_dir / "postgresql.log"

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
        try:
            if not self._has_data():
                return PgObservation(PgRole.ABSENT, observed_at)
            if self.postmaster_pid() is None:
                return PgObservation(PgRole.STOPPED, observed_at, self._cached_scan())
        except OSError:
            pass
        return PgObservation(PgRole.UNRESPONSIVE, observed_at)

    async def _probe(self, observed_at: float) -> PgObservation:
        if not self._has_data():
            return PgObservation(PgRole.ABSENT, observed_at)
        pid = self.postmaster_pid()
        if pid is None:
            self._drop_probe_conn()
            return PgObservation(PgRole.STOPPED, observed_at, await self._stopped_position())
        if procs.is_stopped(pid):
            self._drop_probe_conn()
            return PgObservation(PgRole.UNRESPONSIVE, observed_at)
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
            out = await oscmd.run(argv, user=None, timeout_s=self.probe_timeout_s)
            fields = out.stdout.strip().split("|")
            return Position(int(fields[1]), setup.parse_lsn(fields[2]))
        except (oscmd.CommandFailed, IndexError, ValueError) as error:
            if not self._identify_failed_logged:  # once: it repeats every probe
                self._identify_failed_logged = True
                self.log.warning("pg_identify_system_failed", error=str(error)[:300],
                                 hint="pg_hba.conf needs 'local replication all trust'")
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
        except (oscmd.CommandFailed, OSError, ValueError, KeyError) as error:
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
        argv = [str(await self._bin("pg_waldump")), "-q", "-p", str(self.data_dir / "pg_wal"),
                "-t", str(timeline), "-s", setup.format_lsn(start)]
        done = await oscmd.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s, check=False)
        end = setup.waldump_end(done.stderr, segment_size)
        return end if end is not None and end >= start else None

    # -------------------------------------------------------------- actions

    async def bootstrap_primary(self) -> None:
        """initdb a new cluster, configure it and start it as the primary.
        An existing data directory is never touched."""
        async with self._lock:
            await self._bootstrap()

    async def promote(self) -> None:
        """Make the local server a writable primary; initialise one if there is
        no data directory (the bootstrap case, docs/design.md §9)."""
        async with self._lock:
            if self._has_data() and self.postmaster_pid() is not None and await self._promote_running():
                return
            role = await self._role()
            if role is PgRole.ABSENT:
                await self._bootstrap()
                return
            if role is PgRole.STOPPED:
                await self._start(upstream=None)
                role = await self._role()
            if role is PgRole.UNRESPONSIVE:
                role = await self._wait_ready()
            if role is PgRole.PRIMARY and self._sync_wanted is not None:
                await self._alter_system("synchronous_standby_names", self._sync_wanted)
            if role is PgRole.STANDBY:
                wait_s = max(1, math.ceil(self.command_timeout_s))
                async with self._local(wait_s + 5) as conn:
                    if self._sync_wanted is not None:
                        await self._alter_system("synchronous_standby_names", self._sync_wanted, conn)
                    await conn.fetchval("SELECT pg_promote(false)")
                    if not await self._left_recovery(conn, wait_s):
                        raise PostgresError(f"promotion did not finish within {wait_s} s")
                self.log.info("pg_promoted")
            elif role is not PgRole.PRIMARY:
                raise PostgresError(f"cannot promote: the server is {role.value}")
            await self._after_promotion(checkpoint=False)

    async def _promote_running(self) -> bool:
        """promote() for a server that answers, on one connection: a new one
        costs a backend fork, and writes wait for this. False when it does not
        answer (promote() then waits for it)."""
        wait_s = max(1, math.ceil(self.command_timeout_s))
        async with contextlib.AsyncExitStack() as stack:
            try:
                conn = await stack.enter_async_context(self._local(wait_s + 5))
                in_recovery = await conn.fetchval("SELECT pg_is_in_recovery()")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                return False
            if self._sync_wanted is not None:
                await self._alter_system("synchronous_standby_names", self._sync_wanted, conn)
            if in_recovery:
                await conn.fetchval("SELECT pg_promote(false)")
                if not await self._left_recovery(conn, wait_s):
                    raise PostgresError(f"promotion did not finish within {wait_s} s")
                self.log.info("pg_promoted")
            await self._after_promotion(checkpoint=False, conn=conn)
        return True

    async def start_standby(self, upstream: NodeConfig | None) -> None:
        """Run as a standby of `upstream` (None: no upstream, replaying local WAL
        only); a no-op when it already does."""
        async with self._lock:
            role = await self._role()
            if role is PgRole.STOPPED:
                await self._start(upstream=upstream)
            elif role is PgRole.STANDBY:
                await self._retarget(upstream)
            else:
                raise PostgresError(f"cannot start as a standby: the server is {role.value}")

    async def follow(self, leader: NodeConfig) -> None:
        """Stream from `leader`: clone when there is no data directory, re-point
        a compatible standby, rewind (or re-clone) a diverged server."""
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
            up = await self._upstream(leader)
            if up.in_recovery:
                await self._cascade(leader, role, up, row)
                return
            if row is not None and position is None:
                # No WAL receiver covers it: the server tells (a subprocess,
                # kept off the cascade above, which must be quick), and then
                # the leader's position is read again, after ours.
                position = await self._standby_position(row)
                up = await self._upstream(leader)
                if up.in_recovery:
                    raise PostgresError(f"{leader.name} is not a primary any more")
            timeline, lsn, history = up.timeline, up.lsn, up.history
            if role is PgRole.STANDBY:
                if position is not None and setup.compatible(position.timeline, position.lsn, timeline, lsn, history):
                    await self._retarget(leader, slot=up.slot)
                    return
                self.log.info("pg_diverged", position=str(position), leader=leader.name)
            if role is not PgRole.STOPPED:
                await self._stop_escalating()
            position = await self._wal_end_now()
            if position is None or not setup.compatible(position.timeline, position.lsn, timeline, lsn, history):
                await self._rewind_or_reclone(leader, position)
            await self._start(upstream=leader, slot=up.slot)

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
            raise PostgresError(f"cannot stream from {upstream.name}, a standby at {setup.format_lsn(up.lsn)}: "
                                f"this server's WAL ends at {mine}")
        position = setup.format_lsn(lsn)
        self.log.info("pg_cascading", upstream=upstream.name, position=str(position))
        if role is PgRole.STANDBY:
            await self._retarget(upstream, slot=up.slot)
        else:
            await self._start(upstream=upstream, slot=up.slot)

    async def stop(self, mode: Literal["fast", "immediate"]) -> None:
        """Stop the server; already stopped is fine. An immediate stop that
        does not finish in time (a frozen postmaster) ends with SIGKILL.

        The postmaster (checked to serve this data directory) gets the signal
        `pg_ctl stop -m <mode>` would send, and we watch it go every 10 ms
        rather than in pg_ctl's 100 ms steps: a planned switchover's write
        pause starts here."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"unknown stop mode {mode!r}")
        pid = self.postmaster_pid()
        if pid is None:
            return
        wait_s = IMMEDIATE_STOP_S if mode == "immediate" else max(1, math.ceil(self.command_timeout_s))
        try:
            os.kill(pid, _STOP_SIGNALS[mode])
        except ProcessLookupError:
            return
        except PermissionError:  # not root and not the server's user: pg_ctl runs as that user
            argv = [str(await self._bin("pg_ctl")), "stop", "-D", str(self.data_dir), "-m", mode, "-W"]
            await oscmd.run(argv, user=self.pg.os_user, timeout_s=10, check=False)
        if not await self._postmaster_gone(wait_s):
            if mode == "fast":
                raise PostgresError(f"fast shutdown did not finish within {wait_s} s")
            self.log.warning("pg_stop_escalated", error=f"immediate shutdown did not finish within {wait_s} s")
            await self._kill_postmaster()
        self.log.info("pg_stopped", mode=mode)

    async def _started(self, timeout_s: float) -> bool:
        """True once the server accepts connections (postmaster.pid says
        "ready" or "standby", as pg_ctl -w waits for); False when `timeout_s`
        passed first; PostgresError when no postmaster runs any more."""
        started = time.monotonic()
        deadline = started + timeout_s
        appeared = False
        while True:
            status = _pm_status(self.data_dir)
            if status in ("ready", "standby"):
                return True
            alive = self.postmaster_pid() is not None
            appeared = appeared or alive
            # postmaster.pid is written within moments of the start; without a
            # live postmaster after that, the start failed (its log says why).
            if not alive and (appeared or time.monotonic() >= started + START_GRACE_S):
                raise PostgresError(f"PostgreSQL stopped while starting (see {self.logfile})")
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_FAST_POLL_S)

    async def _postmaster_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.postmaster_pid() is not None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_FAST_POLL_S)
        return True

    async def _left_recovery(self, conn: asyncpg.Connection, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while await conn.fetchval("SELECT pg_is_in_recovery()"):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_FAST_POLL_S)
        return True

    async def configure_sync(self, sync_count: int, standbys: tuple[str, ...]) -> None:
        """synchronous_standby_names = 'ANY k (...)' ('' for k = 0). On a standby
        it takes effect at promotion; without a data directory, at bootstrap."""
        value = setup.sync_standby_names(sync_count, standbys)
        self._sync_wanted = value
        async with self._lock:
            role = await self._role()
            if role is PgRole.UNRESPONSIVE:
                role = await self._wait_ready()
            if role is PgRole.ABSENT:
                pass  # bootstrap writes it before the first start
            elif role is PgRole.STOPPED:
                await asyncio.to_thread(
                    setup.update_auto_conf, self.data_dir, set_values={"synchronous_standby_names": value},
                    owner=self._owner(),
                )
            elif role in (PgRole.PRIMARY, PgRole.STANDBY):
                await self._alter_system("synchronous_standby_names", value)
            else:
                raise PostgresError(f"cannot configure synchronous replication: the server is {role.value}")
        self.log.info("pg_sync_configured", synchronous_standby_names=value)

    async def ensure_slots(self, standbys: tuple[str, ...]) -> None:
        """Physical replication slots for these members, created if missing."""
        names = [setup.slot_name(s) for s in standbys if s != self.node.name]
        async with self._local(self.command_timeout_s) as conn:
            for name in names:
                await _create_slot(conn, name)

    async def checkpoint(self, timeout_s: float) -> None:
        """CHECKPOINT now, bounded by `timeout_s` (the server keeps going if we
        stop waiting). Before a planned switchover this leaves little for the
        shutdown checkpoint, during which writes already wait."""
        async with asyncio.timeout(timeout_s):
            async with self._local(timeout_s) as conn:
                await conn.execute("CHECKPOINT")

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
                aside = await asyncio.to_thread(setup.move_aside, self.data_dir)
                self.log.warning("pg_data_dir_moved_aside", path=str(aside), reason="reinit")
            await self._clone(leader)
            await self._start(upstream=leader)
            self.log.info("pg_reinit_done", leader=leader.name)

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, if that process is alive
        and serves this data directory."""
        return procs.live_postmaster_pid(self.data_dir)

    # ------------------------------------------------------- building blocks

    async def _bootstrap(self) -> None:
        if self._has_data():
            raise PostgresError(f"{self.data_dir} already holds a cluster; it is adopted, never initialised")
        await asyncio.to_thread(setup.check_replaceable, self.data_dir)
        tmp = await asyncio.to_thread(setup.fresh_sibling_dir, self.data_dir, self._owner())
        argv = [
            str(await self._bin("initdb")), "-D", str(tmp), "--data-checksums", "-U", self.pg.superuser,
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions",
        ]
        started = time.monotonic()
        await oscmd.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s)
        hosts = [n.postgres.host for n in self.config.nodes if n.postgres is not None]
        hba = setup.hba_text(replication_user=self.pg.replication_user, database=self.pg.database, hosts=hosts)
        await asyncio.to_thread(setup.write_file, tmp / "pg_hba.conf", hba, owner=self._owner())
        if self._sync_wanted is not None:
            # Before the first start, so that not one commit is acknowledged unreplicated.
            values = {"synchronous_standby_names": self._sync_wanted}
            await asyncio.to_thread(setup.update_auto_conf, tmp, set_values=values, owner=self._owner())
        await asyncio.to_thread(setup.move_into_place, tmp, self.data_dir)
        self.log.info("pg_initdb_done", seconds=round(time.monotonic() - started, 2))
        await self._start(upstream=None, standby=False)
        await self._after_promotion()

    async def _after_promotion(self, checkpoint: bool = True, conn: asyncpg.Connection | None = None) -> None:
        if conn is None:
            async with self._local(self.command_timeout_s) as own:
                await self._after_promotion(checkpoint, own)
            return
        # Our own setup must not wait for standbys that may not exist yet.
        await conn.execute("SET synchronous_commit = local")
        await self._ensure_replication_role(conn)
        # pg_rewind on the other members reads the timeline from pg_control,
        # which a promotion only updates at its next checkpoint. After a
        # promotion PostgreSQL starts one itself (spread out); an immediate
        # one here would flush everything while the first commits wait on
        # the disk, so it is left to a member about to rewind from us to
        # ask for one (_leader_checkpointed). A new cluster has nothing to flush.
        if checkpoint:
            await conn.execute("CHECKPOINT")

    async def _ensure_replication_role(self, conn: asyncpg.Connection) -> None:
        user = self.pg.replication_user
        if not await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", user):
            verifier = setup.scram_verifier(self._password)
            await conn.execute(
                f"CREATE ROLE {setup.quote_ident(user)} WITH LOGIN REPLICATION PASSWORD {setup.conf_string(verifier)}"
            )
            self.log.info("pg_replication_role_created", role=user)
        for function in _REWIND_FUNCTIONS:
            if not await conn.fetchval("SELECT has_function_privilege($1, $2, 'EXECUTE')", user, function):
                await conn.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {setup.quote_ident(user)}")
        if not await conn.fetchval("SELECT pg_has_role($1, 'pg_checkpoint', 'MEMBER')", user):
            await conn.execute(f"GRANT pg_checkpoint TO {setup.quote_ident(user)}")

    async def _clone(self, leader: NodeConfig) -> None:
        if self._has_data():
            raise PostgresError(f"{self.data_dir} already holds a cluster; not cloning over it")
        await asyncio.to_thread(setup.check_replaceable, self.data_dir)
        await self._prepare_run_dir()
        slot = await self._slot_on(leader)
        tmp = await asyncio.to_thread(setup.fresh_sibling_dir, self.data_dir, self._owner())
        argv = [str(await self._bin("pg_basebackup")), "-D", str(tmp), "-X", "stream", "-c", "fast", "-w",
                "-d", self._leader_dsn(leader, application_name=f"{self.node.name}_clone")]
        if slot:
            argv += ["-S", slot]
        started = time.monotonic()
        await oscmd.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s, env=self._libpq_env())
        await asyncio.to_thread(setup.move_into_place, tmp, self.data_dir)
        self.log.info("pg_clone_done", leader=leader.name, seconds=round(time.monotonic() - started, 2))

    async def _rewind_or_reclone(self, leader: NodeConfig, position: Position | None) -> None:
        try:
            await self._rewind(leader)
        except (oscmd.CommandFailed, PostgresError, OSError) as error:
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
        argv = [str(await self._bin("pg_rewind")), "-D", str(self.data_dir),
                f"--source-server={self._leader_dsn(leader, dbname=self.pg.database)}"]
        started = time.monotonic()
        try:
            done = await oscmd.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s, env=self._libpq_env())
        except BaseException:
            # Diverged WAL must never come up writable, even if someone starts it by hand.
            await asyncio.to_thread(setup.set_standby_signal, self.data_dir, True, self._owner())
            raise
        self.log.info("pg_rewind_done", leader=leader.name, seconds=round(time.monotonic() - started, 2),
                      output=(done.stdout + done.stderr).strip()[-300:])

    async def _start(self, *, upstream: NodeConfig | None, standby: bool = True, slot: str | None = None) -> None:
        """Write this member's settings and start; a standby of `upstream`
        (through `slot` on it when given, else our slot, made if missing)."""
        await self._prepare_run_dir()
        conninfo = ""
        if upstream is not None:
            conninfo, slot = self._primary_conninfo(upstream), await self._slot_on(upstream) if slot is None else slot
        else:
            slot = ""
        await self._write_member_files(conninfo, slot, standby=standby)
        wait_s = max(1, math.ceil(self.command_timeout_s))
        # pg_ctl -W, then we watch postmaster.pid ourselves every 10 ms (pg_ctl -w
        # looks every 100 ms): the old primary of a switchover restarts here.
        argv = [str(await self._bin("pg_ctl")), "start", "-D", str(self.data_dir), "-l", str(self.logfile), "-W"]
        try:
            await oscmd.run(argv, user=self.pg.os_user, timeout_s=wait_s + 5)
        except oscmd.CommandFailed as error:
            raise PostgresError(f"could not start PostgreSQL (see {self.logfile}): {error}") from error
        if not await self._started(wait_s):
            # A standby that must stream WAL before it is consistent keeps
            # starting after we stop waiting; that is progress, not failure.
            if not (standby and self.postmaster_pid() is not None):
                raise PostgresError(f"PostgreSQL did not start within {wait_s} s (see {self.logfile})")
            self.log.warning("pg_start_slow", error=f"not accepting connections after {wait_s} s")
        self.log.info("pg_started", standby=standby, upstream=None if upstream is None else upstream.name)
        if standby:
            await self._drop_stale_slots()

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

    async def _alter_system(self, name: str, value: str, conn: asyncpg.Connection | None = None) -> None:
        if conn is None:
            async with self._local(self.command_timeout_s) as own:
                await self._alter_system(name, value, own)
            return
        if await conn.fetchval("SELECT current_setting($1)", name) == value:
            return
        await conn.execute(f"ALTER SYSTEM SET {name} = {setup.conf_string(value)}")
        await conn.execute("SELECT pg_reload_conf()")
        await self._await_setting(name, value, SYNC_APPLY_WAIT_S, conn)

    async def _await_setting(self, name: str, value: str, timeout_s: float,
                             conn: asyncpg.Connection | None = None) -> None:
        """Until the server runs with `name` = `value` after a reload. A
        session applies a reload before its next command, so `conn` (the one
        that reloaded) sees it as soon as the server has read the files."""
        deadline = time.monotonic() + timeout_s
        while True:
            if conn is not None:
                current = await conn.fetchval("SELECT current_setting($1)", name)
            else:
                async with self._local(self.command_timeout_s) as fresh:
                    current = await fresh.fetchval("SELECT current_setting($1)", name)
            if current == value:
                return
            if time.monotonic() >= deadline:
                raise PostgresError(f"{name} was not applied within {timeout_s:g} s")
            await asyncio.sleep(_FAST_POLL_S)

    async def _stop_escalating(self) -> None:
        try:
            await self.stop("fast")
        except (PostgresError, oscmd.CommandFailed) as error:
            self.log.warning("pg_fast_stop_failed", error=str(error)[:300])
            await self.stop("immediate")

    async def _kill_postmaster(self) -> None:
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = procs.children_of(pid)
        # The postmaster first: it would restart children killed before it.
        for target in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while self.postmaster_pid() is not None:
            if time.monotonic() >= deadline:
                raise PostgresError(f"postmaster {pid} survived SIGKILL")
            await asyncio.sleep(0.05)
        self.log.warning("pg_killed", pid=pid, children=len(children))

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
            host=pg.host, port=pg.port, user=self.pg.replication_user, password=self._password,
            database=self.pg.database, timeout=min(self.command_timeout_s, UPSTREAM_CONNECT_TIMEOUT_S),
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
                return _Upstream(True, None, setup.parse_lsn(row["lsn"] or "0/0"), [], await self._slot_in(conn, leader))
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

    # ------------------------------------------------------------- local side

    async def _probe_query(self) -> asyncpg.Record:
        if not self._keep_probe_conn:
            async with self._local() as conn:
                return await conn.fetchrow(_PROBE_SQL)
        if time.monotonic() - self._probe_conn_at >= PROBE_RECONNECT_S:
            self._drop_probe_conn()
        reused = self._probe_conn is not None and not self._probe_conn.is_closed()
        if reused:
            try:
                return await self._probe_conn.fetchrow(_PROBE_SQL)
            except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                    asyncpg.AdminShutdownError):
                # The server restarted under the kept connection (a
                # switchover's old primary, a follow): not a sign of trouble.
                self._drop_probe_conn()
        self._probe_conn = await asyncpg.connect(
            host=str(self.socket_dir), port=self.pg.port, user=self.pg.superuser, database=self.pg.database,
            server_settings={"application_name": "failoverd"}, statement_cache_size=0,
        )
        self._probe_conn_at = time.monotonic()
        return await self._probe_conn.fetchrow(_PROBE_SQL)

    def _drop_probe_conn(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        if conn is not None:
            conn.terminate()

    def close(self) -> None:
        """Drop the probe connection (the daemon calls this at shutdown)."""
        self._drop_probe_conn()

    @contextlib.asynccontextmanager
    async def _local(self, timeout_s: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        async with asyncio.timeout(timeout_s or self.probe_timeout_s):
            conn = await asyncpg.connect(
                host=str(self.socket_dir), port=self.pg.port, user=self.pg.superuser, database=self.pg.database,
                server_settings={"application_name": "failoverd"}, statement_cache_size=0,
            )
            try:
                yield conn
            finally:
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
        except (oscmd.CommandFailed, OSError, ValueError, KeyError) as error:
            self.log.warning("pg_wal_end_unknown", error=str(error)[:300])
            return None

    async def _controldata(self) -> dict[str, str]:
        argv = [str(await self._bin("pg_controldata")), "-D", str(self.data_dir)]
        done = await oscmd.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s)
        return setup.parse_controldata(done.stdout)

    async def _bin(self, program: str) -> Path:
        if self._bin_dir is None:
            done = await oscmd.run(["pg_config", "--bindir"], user=None, timeout_s=10)
            self._bin_dir = Path(done.stdout.strip())
        path = self._bin_dir / program
        if not path.exists():
            raise PostgresError(f"{path} does not exist; set [postgres] bin_dir")
        return path

    def _has_data(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def _owner(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        who = oscmd.OsUser.lookup(self.pg.os_user)
        return (who.uid, who.gid)

    # --------------------------------------------------------- files (threads)

    async def _prepare_run_dir(self) -> None:
        text = setup.passfile_text(self.pg.replication_user, self._password)
        await asyncio.to_thread(setup.prepare_run_dir, self.socket_dir, self.passfile, text, self._owner())

    async def _write_member_files(self, conninfo: str, slot: str, *, standby: bool) -> None:
        text = setup.node_conf_text(
            member=self.node.name, host=self.pg.host, port=self.pg.port, socket_dir=self.socket_dir,
            primary_conninfo=conninfo, primary_slot_name=slot,
        )
        stopped = self.postmaster_pid() is None
        await asyncio.to_thread(
            setup.write_member_files, self.data_dir, text, standby=standby, stopped=stopped, owner=self._owner()
        )


def _receiver_position(row: asyncpg.Record) -> Position | None:
    """A standby's position from the WAL receiver alone, when it covers replay
    (see PostgresAdapter._standby_position); None when the server must be asked."""
    if not (row["received_tli"] and row["flushed_lsn"]) or row["replay_lsn"] is None:
        return None
    receive = Position(row["received_tli"], setup.parse_lsn(row["flushed_lsn"]))
    return receive if setup.parse_lsn(row["replay_lsn"]) <= receive.lsn else None


def _pm_status(data_dir: Path) -> str | None:
    """The postmaster's status line in postmaster.pid (the 8th): starting,
    stopping, ready or standby; None while there is no such line."""
    try:
        lines = (data_dir / "postmaster.pid").read_text(errors="replace").split("\n")
    except OSError:
        return None
    return lines[7].strip() if len(lines) > 7 else None


async def _create_slot(conn: asyncpg.Connection, name: str) -> None:
    exists = await conn.fetchval("SELECT true FROM pg_replication_slots WHERE slot_name = $1", name)
    if not exists:
        with contextlib.suppress(asyncpg.DuplicateObjectError):  # created meanwhile by someone else
            await conn.execute("SELECT pg_create_physical_replication_slot($1, true)", name)

