"""The PostgreSQL adapter: probes the local server and carries out the core's
PostgreSQL actions (docs/design.md §2, §9) on a real PostgreSQL (15+).

Thin on purpose: it decides nothing about *whether* to promote or follow, only
*how*. Every method is bounded in time: programs by `command_timeout_s`
(failoverd.adapters.programs kills them when it passes), probes by `probe_timeout_s`.

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

The adapter is split by responsibility: `PostgresAdapter` (here) holds the
configuration, the lifecycle (bootstrap, start, stop, promote) and the
settings; the probe and the reads of positions and roles are the mixin
`failoverd.adapters.postgres.probe.PostgresProbe`; following, cloning, rewinding and what is
said to the upstream server are the mixin
`failoverd.adapters.postgres.replication.PostgresReplication`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from failoverd.adapters import processes, programs
from failoverd.adapters.postgres import setup
from failoverd.adapters.postgres.probe import POSTMASTER_CHECK_S, PostgresProbe
from failoverd.adapters.postgres.replication import (
    UPSTREAM_CONNECT_TIMEOUT_S,
    PostgresError,
    PostgresReplication,
    _create_slot,
)
from failoverd.config.load import Config, NodeConfig, PostgresNodeConfig, PostgresSettings
from failoverd.core.state import PgRole, Position

__all__ = [
    "IMMEDIATE_STOP_S",
    "KILL_WAIT_S",
    "POSTMASTER_CHECK_S",
    "START_GRACE_S",
    "SYNC_APPLY_WAIT_S",
    "UPSTREAM_CONNECT_TIMEOUT_S",
    "PostgresAdapter",
    "PostgresError",
    "socket_dir_for",
]

IMMEDIATE_STOP_S = 3  # our wait for an immediate stop before we SIGKILL
KILL_WAIT_S = 2.0
SYNC_APPLY_WAIT_S = 5.0
# How often we look whether a stop, a promotion or a reload has taken effect.
# pg_ctl stop -w and pg_promote(wait => true) look every 100 ms; on the path
# of a switchover each such step is writes waiting, so we look ourselves.
_FAST_POLL_S = 0.01
RELOAD_WAIT_S = 5.0  # how long a reload of the server may take to be read
# What pg_file_settings says of a changed setting that waits for a restart
# (guc-file.l, PostgreSQL 9.5 and later).
_NOT_APPLIED_UNTIL_RESTART = "setting could not be applied"
# What `pg_ctl stop -m <mode>` sends to the postmaster.
_STOP_SIGNALS = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}
START_GRACE_S = 5.0  # a postmaster not running this long after pg_ctl start failed to start

_REWIND_FUNCTIONS = (
    "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    "pg_catalog.pg_stat_file(text, boolean)",
    "pg_catalog.pg_read_binary_file(text)",
    "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
    "pg_catalog.pg_control_checkpoint()",
)


def socket_dir_for(config: Config, pg: PostgresNodeConfig) -> Path:
    """The private directory holding the member's socket, password file and log."""
    return config.postgres_defaults.socket_dir or Path(f"{pg.data_dir}.run")


class PostgresAdapter(PostgresProbe, PostgresReplication):
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
        self.log = (log or structlog.get_logger("failoverd.adapters.postgres.adapter")).bind(node=node.name)
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
        # supervisor's CPU. Any error or timeout drops it. Every
        # POSTMASTER_CHECK_S a probe also opens a bare new connection, because
        # only that shows that the postmaster still accepts clients (the kept
        # one is served by its own backend even when the postmaster hangs); a
        # stopped postmaster (SIGSTOP) is seen at once from /proc.
        self._probe_conn: asyncpg.Connection | None = None
        self._probe_conn_at = 0.0
        self._postmaster = processes.PostmasterWatch(self.data_dir)
        # True while follow() only asks its upstream, before it changes
        # anything here: the supervisor may cancel it then (waiting_on_upstream).
        self._asking_upstream = False
        self._keep_probe_conn = keep_probe_connection
        self.settings = config.pg_settings  # [postgres.parameters] and [postgres] hba in force
        # What failoverd.conf was last written with (conninfo, slot, standby), so
        # that a reload rewrites the parameters around the same upstream.
        self._member_files: tuple[str, str, bool] | None = None
        self.pending_restart: tuple[str, ...] = ()  # settings the running server applies only at a restart

    @property
    def passfile(self) -> Path:
        return self.socket_dir / "pgpass"

    @property
    def logfile(self) -> Path:
        return self.socket_dir / "postgresql.log"

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

    async def stop(self, mode: str) -> None:
        """Stop the server; already stopped is fine. `mode` is "fast" or
        "immediate" (anything else: ValueError). An immediate stop that
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
        if mode == "immediate" and processes.is_stopped(pid):
            # Stopped by a signal, it cannot act on SIGQUIT before it is
            # continued (and must not be continued): SIGKILL, as the escalation would.
            self.log.warning("pg_stop_escalated", error="the postmaster is stopped (SIGSTOP): SIGKILL at once")
            await self._kill_postmaster()
            self.log.info("pg_stopped", mode=mode)
            return
        wait_s = IMMEDIATE_STOP_S if mode == "immediate" else max(1, math.ceil(self.command_timeout_s))
        try:
            os.kill(pid, _STOP_SIGNALS[mode])
        except ProcessLookupError:
            return
        except PermissionError:  # not root and not the server's user: pg_ctl runs as that user
            argv = [str(await self._bin("pg_ctl")), "stop", "-D", str(self.data_dir), "-m", mode, "-W"]
            await programs.run(argv, user=self.pg.os_user, timeout_s=10, check=False)
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
            pid, status = _pm_status(self.data_dir)
            alive = self.postmaster_pid() is not None
            # A postmaster killed with SIGKILL leaves its postmaster.pid saying
            # "ready" until the new one rewrites it: only a live one's counts.
            if status in ("ready", "standby") and pid is not None and pid == self.postmaster_pid():
                return True
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
                    setup.update_auto_conf,
                    self.data_dir,
                    set_values={"synchronous_standby_names": value},
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

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, if that process is alive
        and serves this data directory (then held by a pidfd: see
        `processes.PostmasterWatch`)."""
        return self._postmaster.pid()

    def watch_postmaster(self, wake: Callable[[], None]) -> None:
        """Call `wake()` from the running loop as soon as a postmaster we have
        seen exits, rather than leaving the crash to the next probe."""
        self._postmaster.on_exit = wake

    # ------------------------------------------------------- building blocks

    async def _bootstrap(self) -> None:
        if self._has_data():
            raise PostgresError(f"{self.data_dir} already holds a cluster; it is adopted, never initialised")
        await asyncio.to_thread(setup.check_replaceable, self.data_dir)
        tmp = await asyncio.to_thread(setup.fresh_sibling_dir, self.data_dir, self._owner())
        argv = [
            str(await self._bin("initdb")),
            "-D",
            str(tmp),
            "--data-checksums",
            "-U",
            self.pg.superuser,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-instructions",
        ]
        started = time.monotonic()
        await programs.run(argv, user=self.pg.os_user, timeout_s=self.command_timeout_s)
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
        await self._launch(standby=standby, upstream=None if upstream is None else upstream.name)

    async def _start_written(self) -> None:
        """Start again with the member files last written (a restart)."""
        if self._member_files is None:
            raise PostgresError("cannot restart: this daemon never wrote the server's settings")
        conninfo, slot, standby = self._member_files
        await self._prepare_run_dir()
        await self._write_member_files(conninfo, slot, standby=standby)
        await self._launch(standby=standby, upstream=None)

    async def _launch(self, *, standby: bool, upstream: str | None) -> None:
        wait_s = max(1, math.ceil(self.command_timeout_s))
        # pg_ctl -W, then we watch postmaster.pid ourselves every 10 ms (pg_ctl -w
        # looks every 100 ms): the old primary of a switchover restarts here.
        argv = [str(await self._bin("pg_ctl")), "start", "-D", str(self.data_dir), "-l", str(self.logfile), "-W"]
        try:
            await programs.run(argv, user=self.pg.os_user, timeout_s=wait_s + 5)
        except programs.CommandFailed as error:
            raise PostgresError(f"could not start PostgreSQL (see {self.logfile}): {error}") from error
        if not await self._started(wait_s):
            # A standby that must stream WAL before it is consistent keeps
            # starting after we stop waiting; that is progress, not failure.
            if not (standby and self.postmaster_pid() is not None):
                raise PostgresError(f"PostgreSQL did not start within {wait_s} s (see {self.logfile})")
            self.log.warning("pg_start_slow", error=f"not accepting connections after {wait_s} s")
        self.log.info("pg_started", standby=standby, upstream=upstream)
        if standby:
            await self._drop_stale_slots()

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

    async def _await_setting(
        self, name: str, value: str, timeout_s: float, conn: asyncpg.Connection | None = None
    ) -> None:
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
        except (PostgresError, programs.CommandFailed) as error:
            self.log.warning("pg_fast_stop_failed", error=str(error)[:300])
            await self.stop("immediate")

    async def _kill_postmaster(self) -> None:
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = processes.children_of(pid)
        # The postmaster first: it would restart children killed before it.
        for target in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while self.postmaster_pid() is not None:
            if time.monotonic() >= deadline:
                raise PostgresError(f"postmaster {pid} survived SIGKILL")
            await asyncio.sleep(0.05)
        # Killed, it left its lock files behind (postmaster.pid, the socket's
        # .lock), and until its parent reaps it (init, or a container's first
        # process, which may take its time) it is a zombie, which PostgreSQL's
        # own check of those files (kill(pid, 0)) takes for a live postmaster:
        # the next start would fail. A zombie holds nothing: its files go now.
        if processes.is_zombie(pid):
            for lock in (self.data_dir / "postmaster.pid", self.socket_dir / f".s.PGSQL.{self.pg.port}.lock"):
                if processes.read_lock_pid(lock) == pid:
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
        self.log.warning("pg_killed", pid=pid, children=len(children))

    # ------------------------------------------------------------- local side

    def close(self) -> None:
        """Drop the probe connection (the daemon calls this at shutdown)."""
        self._drop_probe_conn()

    @contextlib.asynccontextmanager
    async def _local(self, timeout_s: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        async with asyncio.timeout(timeout_s or self.probe_timeout_s):
            conn = await asyncpg.connect(
                host=str(self.socket_dir),
                port=self.pg.port,
                user=self.pg.superuser,
                database=self.pg.database,
                server_settings={"application_name": "failoverd"},
                statement_cache_size=0,
            )
            try:
                yield conn
            finally:
                conn.terminate()

    async def _bin(self, program: str) -> Path:
        if self._bin_dir is None:
            done = await programs.run(["pg_config", "--bindir"], user=None, timeout_s=10)
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
        who = programs.OsUser.lookup(self.pg.os_user)
        return (who.uid, who.gid)

    # --------------------------------------------------------- files (threads)

    async def _prepare_run_dir(self) -> None:
        text = setup.passfile_text(self.pg.replication_user, self._password)
        await asyncio.to_thread(setup.prepare_run_dir, self.socket_dir, self.passfile, text, self._owner())

    async def _write_member_files(self, conninfo: str, slot: str, *, standby: bool) -> None:
        text = setup.node_conf_text(
            member=self.node.name,
            host=self.pg.host,
            port=self.pg.port,
            socket_dir=self.socket_dir,
            primary_conninfo=conninfo,
            primary_slot_name=slot,
            parameters=self.settings.parameters,
        )
        stopped = self.postmaster_pid() is None
        await asyncio.to_thread(
            setup.write_member_files,
            self.data_dir,
            text,
            standby=standby,
            stopped=stopped,
            owner=self._owner(),
            hba_lines=self.settings.hba,
        )
        self._member_files = (conninfo, slot, standby)
        if stopped:
            self.pending_restart = ()  # the next start reads everything

    async def apply_settings(self, settings: PostgresSettings) -> tuple[str, ...]:
        """Take reloaded [postgres.parameters] and [postgres] hba: rewrite the
        files and, if the server runs, reload it. Returns the settings the
        running server applies only at a restart (pending_restart); a stopped
        server reads everything at its next start."""
        async with self._lock:
            self.settings = settings
            if not self._has_data():
                return ()
            if self.postmaster_pid() is None:
                if self._member_files is not None:
                    await self._write_member_files(*self._member_files[:2], standby=self._member_files[2])
                return ()
            async with self._local(self.command_timeout_s) as conn:
                if self._member_files is None:
                    # Written by an earlier daemon: ask the server what it runs with.
                    conninfo = await conn.fetchval("SELECT current_setting('primary_conninfo')")
                    slot = await conn.fetchval("SELECT current_setting('primary_slot_name')")
                    self._member_files = (conninfo, slot, bool(await conn.fetchval("SELECT pg_is_in_recovery()")))
                await self._write_member_files(*self._member_files[:2], standby=self._member_files[2])
                before = await conn.fetchval("SELECT pg_conf_load_time()")
                await conn.execute("SELECT pg_reload_conf()")
                deadline = time.monotonic() + RELOAD_WAIT_S
                while await conn.fetchval("SELECT pg_conf_load_time()") == before and time.monotonic() < deadline:
                    await asyncio.sleep(_FAST_POLL_S)
                errors = await conn.fetch(
                    "SELECT name, error FROM pg_file_settings WHERE error IS NOT NULL ORDER BY seqno"
                )
                pending = await conn.fetch("SELECT name FROM pg_settings WHERE pending_restart ORDER BY name")
            # A changed setting the server takes only at a restart is marked
            # "could not be applied" too; it is pending, not refused.
            names = {r["name"] for r in pending}
            errors = [r for r in errors if not (r["error"] == _NOT_APPLIED_UNTIL_RESTART and r["name"] in names)]
            if errors:
                shown = "; ".join(f"{r['name'] or '?'}: {r['error']}" for r in errors)[:500]
                raise PostgresError(f"PostgreSQL refused the settings (it keeps running with the old ones): {shown}")
            self.pending_restart = tuple(r["name"] for r in pending)
            self.log.info(
                "pg_settings_applied",
                parameters=len(settings.parameters),
                hba_lines=len(settings.hba),
                pending_restart=list(self.pending_restart),
            )
            return self.pending_restart

    async def restart(self) -> None:
        """Restart a standby (fast stop, start as it was), so that settings
        pending a restart take effect. A primary is restarted only through a
        switchover: its restart would be an outage."""
        async with self._lock:
            role = await self._role()
            if role is PgRole.PRIMARY:
                raise PostgresError("refusing to restart a primary: switch over first")
            if role is not PgRole.STANDBY:
                raise PostgresError(f"cannot restart: the server is {role.value}")
            if self._member_files is None:
                async with self._local(self.command_timeout_s) as conn:
                    conninfo = await conn.fetchval("SELECT current_setting('primary_conninfo')")
                    slot = await conn.fetchval("SELECT current_setting('primary_slot_name')")
                self._member_files = (conninfo, slot, True)
            await self.stop("fast")
            await self._start_written()
            self.log.info("pg_restarted")


def _pm_status(data_dir: Path) -> tuple[int | None, str | None]:
    """The pid (first line) and the status line (the 8th: starting, stopping,
    ready or standby) of one read of postmaster.pid; None for what it lacks."""
    try:
        lines = (data_dir / "postmaster.pid").read_text(errors="replace").split("\n")
    except OSError:
        return None, None
    try:
        pid: int | None = abs(int(lines[0].strip()))
    except ValueError:
        pid = None
    return pid, (lines[7].strip() if len(lines) > 7 else None)
