"""The failover drill (`failoverctl drill`) and the probe writer it shares
with bench/switchover.py.

A drill is the switchover test operators run regularly: a probe client
inserts numbered rows into a scratch table through the cluster's write
endpoint while a planned switchover runs, then the drill prints what
happened when, the write pause the client saw, and how many acknowledged
rows the new primary lacks (always 0 unless something is badly wrong), and
records a one-line result in the replicated history.

Where each time comes from (docs/api.md, "failoverctl drill"): the client's
own clock for the request and the probe writes; members' wall clocks for
the election (GET /history) and the promotion (GET /health's
last_failover, recorded by the new primary's core); polls of every
member's GET /health every 50 ms for the old primary's stop (the time its
supervisor's probe found it stopped) and the VIP. When the target caught up
is not exposed by the API, and the drill says so instead of guessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from failoverd.api.client import ApiClient, Unreachable
from failoverd.config.load import Config
from failoverd.ctl.context import EXIT_REFUSED, EXIT_USAGE, CtlContext, CtlError

TABLE = "failoverd_drill"
CREATE_TABLE = f"CREATE TABLE IF NOT EXISTS {TABLE} (run bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (run, id))"
_INSERT = f"INSERT INTO {TABLE} (run, id) VALUES ($1, $2)"
# failoverd sets cluster_name to the member's name (adapters/postgres/setup.py node_conf_text),
# which tells the client which server acknowledged a row, also through a VIP.
_WHO = "SELECT current_setting('cluster_name'), pg_is_in_recovery()"

Connect = Callable[[], Awaitable[asyncpg.Connection]]
POLL_S = 0.05  # how often the drill asks every member for GET /health
WARM_UP_ACKS = 5  # probe writes the old primary must acknowledge before the switchover
AFTER_ACKS = 10  # and the new one after it, before the drill stops writing
STEADY_S = 1.0  # and at least this long of writing, before and after
WARM_UP_TIMEOUT_S = 10.0  # probe writes that do not succeed this long: no switchover
NOTE_MAX = 200  # a history note's length limit (core.requests.RecordEvent)


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """One row whose COMMIT the server acknowledged."""

    id: int
    at: float  # time.monotonic() when the COMMIT returned
    wall: float  # time.time() at that moment
    server: str  # cluster_name of the server that acknowledged it


@dataclasses.dataclass(frozen=True, slots=True)
class Pause:
    """The write pause around a change of primary, as the client saw it."""

    last_old: Ack  # last row acknowledged by the old primary
    first_new: Ack  # first row acknowledged by another server

    @property
    def seconds(self) -> float:
        return self.first_new.at - self.last_old.at


class ProbeWriter:
    """Inserts rows (run, 1), (run, 2), ... one at a time, sleeping `interval_s`
    after each acknowledgement, and records every acknowledged one.

    On any error the connection is dropped and a new one is made after
    `retry_s` (again and again): `connect` must find the writable server
    (a libpq multi-host DSN with target_session_attrs=read-write, or a VIP).
    A row whose COMMIT raised is not acknowledged and may or may not exist.
    Each attempt through a multi-host DSN starts a backend on every standby
    it tries; retrying every 10 ms (some 200 a second) measurably slowed the
    switchover itself on a 2-core machine, hence 50 ms by default.
    """

    def __init__(
        self,
        connect: Connect,
        run: int,
        interval_s: float = 0.015,
        retry_s: float = 0.05,
        command_timeout_s: float = 5.0,
    ) -> None:
        if interval_s < 0 or retry_s <= 0:
            raise ValueError("interval_s must be >= 0 and retry_s > 0")
        self.connect, self.run_id = connect, run
        self.interval_s, self.retry_s, self.command_timeout_s = interval_s, retry_s, command_timeout_s
        self.acks: list[Ack] = []
        self.errors = 0
        self.last_error = ""
        self._next_id = 1
        self._task: asyncio.Task | None = None
        self._conn: asyncpg.Connection | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="probe-writer")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def acked_by(self, server: str) -> list[Ack]:
        return [a for a in self.acks if a.server == server]

    def pause_after(self, old: str, since: float) -> Pause | None:
        """The pause between the old primary's last acknowledged row and the
        first row another server acknowledged after monotonic time `since`."""
        first_new = next((a for a in self.acks if a.at >= since and a.server != old), None)
        if first_new is None:
            return None
        last_old = next((a for a in reversed(self.acks) if a.at < first_new.at and a.server == old), None)
        return None if last_old is None else Pause(last_old, first_new)

    async def _run(self) -> None:
        try:
            while True:
                try:
                    await self._write_until_error()
                except Exception as error:  # noqa: BLE001 - any failure means: reconnect and go on
                    self.errors += 1
                    self.last_error = f"{type(error).__name__}: {error}"[:200]
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                await asyncio.sleep(self.retry_s)
        finally:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None

    async def _write_until_error(self) -> None:
        conn = self._conn = await self.connect()
        server, in_recovery = await conn.fetchrow(_WHO, timeout=self.command_timeout_s)
        if in_recovery:
            raise asyncpg.InterfaceError(f"{server} is in recovery")
        while True:
            wid = self._next_id
            self._next_id += 1
            await conn.execute(_INSERT, self.run_id, wid, timeout=self.command_timeout_s)
            self.acks.append(Ack(wid, time.monotonic(), time.time(), server or "?"))
            await asyncio.sleep(self.interval_s)


async def missing_acks(conn: asyncpg.Connection, run: int, acks: list[Ack]) -> list[int]:
    """Acknowledged ids of `run` that the server behind `conn` does not have.
    Only rows acknowledged before the query starts count (`acks` may grow meanwhile)."""
    acked = list(acks)
    present = {r["id"] for r in await conn.fetch(f"SELECT id FROM {TABLE} WHERE run = $1", run)}
    return [a.id for a in acked if a.id not in present]


# ------------------------------------------------------------ the endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class WriteEndpoint:
    """Where the probe writes go, and how to connect there."""

    description: str
    kwargs: dict[str, Any]

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(**self.kwargs, target_session_attrs="read-write", timeout=2, command_timeout=5)


def write_endpoint(config: Config, dsn: str | None, user: str | None, dbname: str | None) -> WriteEndpoint:
    """--dsn as given; else the VIP when [vip] is configured; else every data
    member (libpq multi-host, read-write). The user is --user, else libpq's
    $PGUSER, else [postgres] superuser; passwords come from $PGPASSWORD or
    the passfile, as with any libpq client. ValueError when it cannot be told."""
    if dsn is not None:
        extra = {k: v for k, v in (("user", user), ("database", dbname)) if v is not None}
        return WriteEndpoint("the given DSN", {"dsn": dsn, **extra})
    who = {
        "user": user or os.environ.get("PGUSER") or config.postgres_defaults.superuser,
        "database": dbname or config.postgres_defaults.database,
    }
    data = [n.postgres for n in config.nodes if n.postgres is not None]
    if config.vip is not None:
        distinct_ports = {pg.port for pg in data}
        if len(distinct_ports) != 1:
            raise ValueError("the members' PostgreSQL ports differ, so the VIP's port is not known: pass --dsn")
        host, port = str(config.vip.address.ip), distinct_ports.pop()
        return WriteEndpoint(f"the VIP {host}:{port}", {"host": host, "port": port, **who})
    hosts, ports = [pg.host for pg in data], [pg.port for pg in data]
    shown = ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
    return WriteEndpoint(f"the members {shown} (read-write)", {"host": hosts, "port": ports, **who})


# ------------------------------------------------------------- the watcher


class Watcher:
    """Asks every member for GET /health every POLL_S during the drill and
    keeps, per member, the first wall time (client clock) at which it was
    seen stopped (minus the age of the probe that saw it), writable, and
    holding the VIP."""

    def __init__(self, ctl: CtlContext, client: ApiClient, since_wall: float) -> None:
        self.ctl, self.client, self.since_wall = ctl, client, since_wall
        self.stopped: dict[str, float] = {}
        self.writable: dict[str, float] = {}
        self.vip: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="drill-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        members = self.ctl.members()
        while True:
            started = time.monotonic()
            await asyncio.gather(*(self._poll(name, address) for name, address in members))
            await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - started)))

    async def _poll(self, name: str, address: Any) -> None:

        try:
            answer = await self.client.call(address, "GET", "/health", timeout_s=1.0)
        except Unreachable:
            return
        now = time.time()
        body = answer.body
        if not isinstance(body, dict) or now < self.since_wall:
            return
        pg = body.get("postgres") or {}
        if pg.get("state") == "stopped":
            seen = now - float(pg.get("observed_s_ago") or 0.0)
            if seen >= self.since_wall:
                self.stopped.setdefault(name, seen)
        if body.get("writable"):
            self.writable.setdefault(name, now)
        if body.get("vip_held"):
            self.vip.setdefault(name, now)


# --------------------------------------------------------------- the drill


@dataclasses.dataclass(frozen=True, slots=True)
class Phase:
    what: str
    at_s: float | None  # seconds after the switchover request; None: not known
    source: str  # where the time comes from, or why it is not known


@dataclasses.dataclass
class DrillResult:
    ok: bool
    old_primary: str
    new_primary: str | None
    endpoint: str
    error: str | None = None
    write_pause_s: float | None = None
    acked: int = 0
    lost: int | None = None
    lost_ids: list[int] = dataclasses.field(default_factory=list)
    client_errors: int = 0
    phases: list[Phase] = dataclasses.field(default_factory=list)
    note: str = ""
    recorded: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lost_ids"] = self.lost_ids[:20]
        return out

    def note_text(self) -> str:
        if self.ok:
            text = (
                f"drill {self.old_primary}->{self.new_primary}: ok, write pause {self.write_pause_s:.2f} s, "
                f"{self.lost} of {self.acked} acknowledged probe writes lost"
            )
        else:
            text = f"drill from {self.old_primary}: FAILED: {self.error}"
        return text[:NOTE_MAX]


async def run_drill(
    ctl: CtlContext,
    *,
    target: str | None,
    writes_per_s: float,
    endpoint: WriteEndpoint,
    timeout_s: float,
    confirm: Callable[[str], None],
) -> DrillResult:
    """The whole drill: probe writes, the switchover, the checks, the note.
    Raises CtlError (nothing was switched over) when it cannot start."""

    async with ctl.client(admin=True) as client:
        view = await ctl.cluster(client)
        old = view.get("primary")
        if old is None:
            raise CtlError("no writable primary: a drill needs a healthy cluster", EXIT_REFUSED)
        if target == old:
            raise CtlError(f"{target} is already the primary", EXIT_USAGE)
        confirm(f"run a failover drill: switch over from {old} to {target or 'the best standby'} now?")
        result = DrillResult(ok=False, old_primary=old, new_primary=None, endpoint=endpoint.description)
        try:
            await _drill(ctl, client, result, view, target, writes_per_s, endpoint, timeout_s)
        except CtlError as error:  # the switchover was refused, or the cluster could not be reached
            result.error = str(error)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            result.error = f"the write endpoint: {type(error).__name__}: {error}"
        result.ok = result.error is None and result.lost == 0
        if result.error is None and result.lost:
            result.error = f"{result.lost} acknowledged probe writes are missing on {result.new_primary}"
        result.note = result.note_text()
        result.recorded = await _record(ctl, client, result.note)
        return result


async def _drill(
    ctl: CtlContext,
    client: ApiClient,
    result: DrillResult,
    view: dict[str, Any],
    target: str | None,
    writes_per_s: float,
    endpoint: WriteEndpoint,
    timeout_s: float,
) -> None:
    old = result.old_primary
    run = int(time.time() * 1000)
    conn = await endpoint.connect()
    try:
        await conn.execute(CREATE_TABLE)
        await conn.execute(f"DELETE FROM {TABLE} WHERE run < $1", run)  # earlier drills' rows
    finally:
        await conn.close()
    writer = ProbeWriter(endpoint.connect, run, interval_s=1.0 / writes_per_s)
    watcher = Watcher(ctl, client, since_wall=time.time())
    writer.start()
    watcher.start()
    try:
        steady = time.monotonic() + STEADY_S
        if not await _until(
            lambda: len(writer.acked_by(old)) >= WARM_UP_ACKS and time.monotonic() >= steady, WARM_UP_TIMEOUT_S
        ):
            result.error = (
                f"probe writes through {endpoint.description} do not succeed: {writer.last_error or 'no answer'}"
            )
            return
        sent_at, sent_wall = time.monotonic(), time.time()
        watcher.since_wall = sent_wall
        await ctl.admin(client, "POST", "/switchover", {} if target is None else {"to": target})
        pause: Pause | None = None

        def new_acks() -> bool:
            nonlocal pause
            pause = writer.pause_after(old, sent_at)
            return pause is not None and (target is None or pause.first_new.server == target)

        if not await _until(new_acks, timeout_s):
            result.error = f"no probe write acknowledged by a new primary within {timeout_s:g} s"
            return
        assert pause is not None  # new_acks() returned True
        new = result.new_primary = pause.first_new.server
        steady = time.monotonic() + STEADY_S
        await _until(lambda: len(writer.acked_by(new)) >= AFTER_ACKS and time.monotonic() >= steady, 5.0)
    finally:
        await writer.stop()
        await watcher.stop()
    result.write_pause_s = round(pause.seconds, 3)
    result.acked, result.client_errors = len(writer.acks), writer.errors
    conn = await endpoint.connect()
    try:
        missing = await missing_acks(conn, run, writer.acks)
    finally:
        await conn.close()
    result.lost, result.lost_ids = len(missing), missing
    result.phases = await _phases(ctl, client, view, old, new, watcher, pause, sent_at, sent_wall)


async def _phases(
    ctl: CtlContext,
    client: ApiClient,
    view: dict[str, Any],
    old: str,
    new: str,
    watcher: Watcher,
    pause: Pause,
    sent_at: float,
    sent_wall: float,
) -> list[Phase]:
    def wall(t: float | None) -> float | None:
        return None if t is None else round(t - sent_wall, 3)

    elected = await _elected_at(ctl, client, new, view["term"])
    promoted = await _promoted_at(ctl, client, new, view["term"])
    phases = [
        Phase("switchover requested", 0.0, "failoverctl's clock"),
        Phase(
            f"{old} stopped",
            wall(watcher.stopped.get(old)),
            f"GET /health of {old} every {POLL_S * 1000:g} ms: when its probe found it stopped"
            if old in watcher.stopped
            else f"no GET /health poll (every {POLL_S * 1000:g} ms) saw it stopped",
        ),
        Phase(f"{new} caught up", None, f"not exposed by the API; log event switchover_caught_up on {old}"),
        Phase(
            f"{new} elected",
            wall(elected),
            f"GET /history, {new}'s wall clock at its last tick before it"
            if elected
            else "no entry for it in GET /history",
        ),
        Phase(
            f"{new} promoted",
            wall(promoted) if promoted else wall(watcher.writable.get(new)),
            f"GET /health last_failover of {new}, its wall clock"
            if promoted
            else f"the first GET /health poll showing {new} writable",
        ),
    ]
    if ctl.config.vip is None:
        phases.append(Phase(f"VIP on {new}", None, "no [vip] configured"))
    else:
        phases.append(
            Phase(
                f"VIP on {new}",
                wall(watcher.vip.get(new)),
                f"the first GET /health poll showing {new} holding it; the address follows its duplicate address check",
            )
        )
    phases.append(Phase(f"last write on {old}", round(pause.last_old.at - sent_at, 3), "probe client"))
    phases.append(Phase(f"first write on {new}", round(pause.first_new.at - sent_at, 3), "probe client"))
    return phases


async def _elected_at(ctl: CtlContext, client: ApiClient, new: str, old_term: int) -> float | None:

    try:
        _, answer = await ctl.ask(client, "GET", "/history", prefer=new)
    except CtlError:
        return None
    entries = answer.body.get("history", []) if isinstance(answer.body, dict) else []
    won = [e for e in entries if e.get("to") == new and e.get("term", 0) > old_term and e.get("wall_time")]
    return float(won[0]["wall_time"]) if won else None


async def _promoted_at(ctl: CtlContext, client: ApiClient, new: str, term: int) -> float | None:
    """When `new` saw its PostgreSQL writable in a term after `term`, by its own
    wall clock (its core records the last failover it made)."""
    address = dict(ctl.members()).get(new)
    if address is None:
        return None
    try:
        answer = await client.call(address, "GET", "/health", timeout_s=2.0)
    except Unreachable:
        return None
    body = answer.body if answer.status in (200, 503) and isinstance(answer.body, dict) else {}
    failover = body.get("last_failover")
    if not isinstance(failover, dict) or not isinstance(failover.get("term"), int) or failover["term"] <= term:
        return None
    wall = failover.get("wall_time")
    return float(wall) if isinstance(wall, (int, float)) else None


async def _record(ctl: CtlContext, client: ApiClient, note: str) -> bool:

    try:
        await ctl.admin(client, "POST", "/history", {"reason": note})
    except CtlError:
        return False
    return True


async def _until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def render(result: DrillResult) -> str:
    lines = [
        f"drill: switchover from {result.old_primary} to {result.new_primary or '?'}, "
        f"probe writes through {result.endpoint}"
    ]
    for phase in result.phases:
        at = f"{'-':>8}  " if phase.at_s is None else f"{phase.at_s:+8.3f} s"
        lines.append(f"  {at}  {phase.what:28}  ({phase.source})")
    if result.write_pause_s is not None:
        lines.append(
            f"write pause: {result.write_pause_s:.3f} s (last write on the old primary to the first on the new)"
        )
    if result.lost is not None:
        lost = f", ids {result.lost_ids[:10]}" if result.lost_ids else ""
        lines.append(
            f"probe writes: {result.acked} acknowledged, {result.lost} lost{lost} "
            f"({result.client_errors} connection errors while the primary moved)"
        )
    if result.error:
        lines.append(f"FAILED: {result.error}")
    lines.append(f"history note: {result.note!r}" + ("" if result.recorded else " (could not be recorded)"))
    return "\n".join(lines)
