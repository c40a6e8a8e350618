"""The simulated side of every port the real supervisor talks to
(failoverd.runtime.ports): PostgreSQL, peers, the fencing watchdog, the
VIP, the state file and the log.

One set of ports belongs to one incarnation of one member's supervisor. Once
that supervisor is killed its ports are dead: they touch the world no more,
whatever its abandoned coroutines still do, so a seed replays the same.

The PostgreSQL port takes the real adapter's steps (failoverd.adapters.
postgres): a Follow asks the upstream over the network and plans each step
with `failoverd.core.follow`, a promotion is void once the server stops,
a probe of a hung server waits out its timeout.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, Protocol

from failoverd.core.follow import FollowFacts, FollowStep, may_discard_wal, plan_follow
from failoverd.core.messages import Message
from failoverd.core.state import PersistentState, PgObservation, PgRole
from failoverd.sim.hosts import Host
from failoverd.sim.network import SimNetwork
from failoverd.sim.postgres import SimPostgres, SimRole

PROBE_S = 0.001  # a probe's round trip over the kept connection
PROBE_TIMEOUT_S = 1.0  # [postgres] probe_timeout_s: a hung server answers nothing
ASK_UPSTREAM_S = 0.003  # connect to the upstream and ask it, besides the network's round trip
UPSTREAM_CONNECT_TIMEOUT_S = 2.0  # an upstream that cannot be reached
BOOTSTRAP_S = 0.5  # initdb and the first start
START_S = 0.2
PROMOTE_S = 0.15
FAST_STOP_S = 0.1
IMMEDIATE_STOP_S = 0.005
RETARGET_S = 0.02
CLONE_S = 0.3
REWIND_S = (0.1, 0.5)
SYNC_S = 0.005
CHECKPOINT_S = 0.05
VIP_ADD_S = 0.01
SLOW_PG_EXTRA_S = (0.2, 2.0)  # a slow disk or a busy server: every step drags


class World(Protocol):
    """What the ports need of the simulated world (failoverd.sim.world.World)."""

    now: float
    rng: random.Random
    net: SimNetwork
    hosts: dict[str, Host]
    disabled: frozenset[str]

    def alive(self, host: Host, incarnation: int) -> bool: ...
    def log(self, text: str) -> None: ...
    def on_log(self, host: Host, level: str, event: str, fields: dict[str, Any]) -> None: ...
    def send(self, src: str, dst: str, msg: Message) -> None: ...
    def slowness(self, host: Host) -> float: ...
    def observation(self, host: Host, observed_at: float) -> PgObservation: ...
    def bootstrap(self, host: Host) -> None: ...
    def start_server(self, host: Host, upstream: str | None) -> None: ...
    def finish_promote(self, host: Host, stops: int) -> bool: ...
    def stop_server(self, host: Host, why: str) -> None: ...
    def begin_fast_stop(self, host: Host) -> bool: ...
    def configure_sync(self, host: Host, sync_count: int, standbys: tuple[str, ...]) -> None: ...
    def stream_from(self, host: Host, upstream: str | None) -> None: ...
    def clone(self, host: Host, leader: str) -> bool: ...
    def reclone(self, host: Host, leader: str) -> bool: ...
    def rewind(self, host: Host, leader: str) -> bool: ...
    def arm_watchdog(self, host: Host, deadline: float | None) -> None: ...
    def take_vip(self, host: Host) -> None: ...
    def drop_vip(self, host: Host) -> None: ...


class SimPostgresError(Exception):
    """What the real adapter's PostgresError would say."""


class SimPostgresPort:
    def __init__(self, world: World, host: Host, incarnation: int) -> None:
        self.world = world
        self.host = host
        self.incarnation = incarnation
        self._lock = asyncio.Lock()
        self._asking = False

    # ------------------------------------------------------------ helpers

    @property
    def _alive(self) -> bool:
        return self.world.alive(self.host, self.incarnation)

    async def _take(self, seconds: float) -> None:
        """Let `seconds` of PostgreSQL work pass (longer while it is slow),
        then check that this supervisor still lives to see the result."""
        await asyncio.sleep(seconds + self.world.slowness(self.host))
        if not self._alive:
            raise asyncio.CancelledError  # a killed process does nothing more

    @property
    def pg(self) -> SimPostgres:
        pg = self.host.pg
        if pg is None:
            raise SimPostgresError(f"{self.host.name} has no PostgreSQL")
        return pg

    # --------------------------------------------------------------- probe

    async def probe(self, observed_at: float) -> PgObservation:
        pg = self.pg
        if self.world.now < pg.probe_hung_until and pg.running:
            await asyncio.sleep(PROBE_TIMEOUT_S)
            return PgObservation(PgRole.UNRESPONSIVE, observed_at, stalled=pg.probe_says_stalled)
        obs = self.world.observation(self.host, observed_at)
        await asyncio.sleep(PROBE_S)
        return obs

    @property
    def waiting_on_upstream(self) -> bool:
        return self._asking

    def watch_postmaster(self, wake: Callable[[], None]) -> None:
        """Nothing: a simulated crash is seen at the next probe, as the real
        adapter sees it where it has no pidfds (the slower case)."""

    # ------------------------------------------------------------- actions

    async def promote(self) -> None:
        async with self._lock:
            pg = self.pg
            if pg.role is SimRole.ABSENT:
                await self._take(BOOTSTRAP_S)
                self.world.bootstrap(self.host)
                return
            if pg.role is SimRole.STOPPED:
                await self._take(START_S)
                self.world.start_server(self.host, upstream=None)
            if pg.role is SimRole.PRIMARY:
                return
            if pg.role is not SimRole.STANDBY:
                raise SimPostgresError(f"cannot promote: the server is {pg.role.value}")
            stops = pg.stops
            await self._take(PROMOTE_S)
            if not self.world.finish_promote(self.host, stops):
                raise SimPostgresError("promotion did not finish: the server stopped")

    async def start_standby(self, upstream: Any) -> None:
        async with self._lock:
            if self.pg.role is SimRole.STOPPED:
                await self._take(START_S)
                self.world.start_server(self.host, upstream=None)
            elif self.pg.role is SimRole.STANDBY:
                await self._take(RETARGET_S)
                self.world.stream_from(self.host, None)

    async def stop(self, mode: str) -> None:
        # Not under the lock, as the real adapter's: a fence never waits.
        if mode == "immediate":
            self.world.stop_server(self.host, "fenced")
            await asyncio.sleep(IMMEDIATE_STOP_S)
            return
        if not self.world.begin_fast_stop(self.host):
            return
        while self.pg.role is SimRole.STOPPING:
            await asyncio.sleep(0.01)
            if not self._alive:
                raise asyncio.CancelledError

    async def configure_sync(self, sync_count: int, standbys: tuple[str, ...]) -> None:
        async with self._lock:
            await self._take(SYNC_S)
            self.world.configure_sync(self.host, sync_count, standbys)

    async def ensure_slots(self, standbys: tuple[str, ...]) -> None:
        return None

    async def checkpoint(self, timeout_s: float) -> None:
        if not self.pg.running:
            raise SimPostgresError("cannot checkpoint: the server is not running")
        await self._take(CHECKPOINT_S)

    async def follow(self, leader: Any) -> None:
        async with self._lock:
            await self._follow(str(leader))

    pending_restart: tuple[str, ...] = ()

    async def restart(self) -> None:
        async with self._lock:
            if self.pg.role is not SimRole.STANDBY:
                raise SimPostgresError(f"cannot restart: the server is {self.pg.role.value}")
            upstream = self.pg.upstream
            self.world.stop_server(self.host, "restart")
            await self._take(FAST_STOP_S + START_S)
            self.world.stream_from(self.host, upstream)

    async def reinit(self, leader: Any) -> None:
        async with self._lock:
            name = str(leader)
            pg = self.pg
            if pg.role is SimRole.PRIMARY:
                raise SimPostgresError("refusing to rebuild a primary")
            if pg.running:
                self.world.stop_server(self.host, "reinit")
                await self._take(FAST_STOP_S)
            up = await self._ask(name)
            if not may_discard_wal(up.role is not SimRole.PRIMARY, self.world.disabled):
                raise SimPostgresError(f"{name} is not a primary: nothing rebuilt, nothing discarded")
            await self._take(CLONE_S)
            if not self.world.reclone(self.host, name):
                raise SimPostgresError(f"cannot clone from {name}")

    # ----------------------------------------------------------- following

    async def _ask(self, leader: str) -> Any:
        """Connect to the upstream and ask it what it is (the real adapter's
        _ask_upstream): a server that cannot be reached fails the Follow."""
        self._asking = True
        try:
            rtt = self.world.net.round_trip(self.host.name, leader)
            if rtt is None:
                await asyncio.sleep(UPSTREAM_CONNECT_TIMEOUT_S)
                raise SimPostgresError(f"cannot connect to {leader}: timeout")
            await asyncio.sleep(ASK_UPSTREAM_S + rtt)
            if not self._alive:
                raise asyncio.CancelledError
            up = self.world.hosts[leader].pg
            if up is None or up.role not in (SimRole.PRIMARY, SimRole.STANDBY):
                raise SimPostgresError(f"cannot connect to {leader}: refused")
            return up
        finally:
            self._asking = False

    async def _follow(self, leader: str) -> None:
        pg = self.pg
        if pg.role is SimRole.ABSENT:
            await self._ask(leader)
            await self._take(CLONE_S)
            if not self.world.clone(self.host, leader):
                raise SimPostgresError(f"pg_basebackup from {leader} failed")
            return
        local = _LOCAL_ROLE.get(pg.role)
        if local is None:
            raise SimPostgresError(f"cannot follow {leader}: the server is {pg.role.value}")
        up = await self._ask(leader)
        step, why = plan_follow(
            FollowFacts(local, up.role is not SimRole.PRIMARY, pg.compatible_with(up)), self.world.disabled
        )
        if step is FollowStep.STOP:
            self.world.stop_server(self.host, f"to follow {leader}")
            await self._take(FAST_STOP_S)
            # Our WAL is final now; the upstream is asked again (the rule of core/follow.py).
            up = await self._ask(leader)
            step, why = plan_follow(
                FollowFacts(PgRole.STOPPED, up.role is not SimRole.PRIMARY, pg.compatible_with(up)), self.world.disabled
            )
        self.world.log(f"{self.host.name} follow step {step.value} toward {leader} ({why})")
        if step is FollowStep.CASCADE:
            if pg.lsn > up.lsn:
                raise SimPostgresError(f"cannot stream from {leader}, a standby: our WAL goes further")
            await self._take(START_S if pg.role is SimRole.STOPPED else RETARGET_S)
            self.world.stream_from(self.host, leader)
        elif step is FollowStep.RETARGET:
            await self._take(RETARGET_S)
            self.world.stream_from(self.host, leader)
        elif step is FollowStep.START:
            await self._take(START_S)
            self.world.stream_from(self.host, leader)
        elif step is FollowStep.REWIND:
            await self._take(self.world.rng.uniform(*REWIND_S))
            if not self.world.rewind(self.host, leader):
                raise SimPostgresError(f"pg_rewind from {leader} failed")
            await self._take(START_S)
            self.world.stream_from(self.host, leader)
        elif step is FollowStep.CLONE:
            await self._take(CLONE_S)
            if not self.world.clone(self.host, leader):
                raise SimPostgresError(f"pg_basebackup from {leader} failed")
        else:
            raise SimPostgresError(f"cannot follow {leader}: {why}")


_LOCAL_ROLE = {SimRole.STOPPED: PgRole.STOPPED, SimRole.STANDBY: PgRole.STANDBY, SimRole.PRIMARY: PgRole.PRIMARY}


class SimPeers:
    """Peer messages go through the simulated network as the immutable
    objects the core built: the codec is the peer adapter's, tested on its
    own (tests/unit/test_messages.py, the fuzz tests), and decoding every
    heartbeat's cluster state would be a fifth of the simulation's time."""

    def __init__(self, world: World, host: Host, incarnation: int) -> None:
        self.world, self.host, self.incarnation = world, host, incarnation

    def send(self, to: str, msg: Message) -> None:
        if self.world.alive(self.host, self.incarnation):
            self.world.send(self.host.name, to, msg)


class SimWatchdog:
    """The fencing watchdog is its own process: the world keeps its deadline
    and fences at it, whatever the supervisor does (frozen or dead)."""

    def __init__(self, world: World, host: Host, incarnation: int) -> None:
        self.world, self.host, self.incarnation = world, host, incarnation

    async def arm(self, deadline: float) -> None:
        if self.world.alive(self.host, self.incarnation):
            self.world.arm_watchdog(self.host, deadline)

    async def disarm(self) -> None:
        if self.world.alive(self.host, self.incarnation):
            self.world.arm_watchdog(self.host, None)


class SimVip:
    def __init__(self, world: World, host: Host, incarnation: int) -> None:
        self.world, self.host, self.incarnation = world, host, incarnation
        self._acquiring: asyncio.Task[None] | None = None
        self._error: str | None = None

    def precheck(self) -> None:
        return None  # no duplicate address detection to start early

    async def acquire(self) -> None:
        if self._acquiring is None or self._acquiring.done():
            self._error = None
            self._acquiring = asyncio.get_running_loop().create_task(self._add())

    async def _add(self) -> None:
        await asyncio.sleep(VIP_ADD_S)
        if self.world.alive(self.host, self.incarnation):
            self.world.take_vip(self.host)

    async def acquisition_result(self) -> str | None:
        task = self._acquiring
        if task is not None:
            await asyncio.wait([task])
            if task.cancelled():
                return "cancelled"
        return self._error

    async def release(self) -> None:
        task, self._acquiring = self._acquiring, None
        if task is not None and not task.done():
            task.cancel()
        if self.world.alive(self.host, self.incarnation):
            self.world.drop_vip(self.host)


class SimStateFile:
    def __init__(self, world: World, host: Host, incarnation: int) -> None:
        self.world, self.host, self.incarnation = world, host, incarnation

    def save(self, state: PersistentState) -> None:
        if self.world.alive(self.host, self.incarnation):
            self.host.disk = state  # fsynced: survives a crash of the process


class TraceLog:
    """The supervisor's structured log, kept in the world's trace."""

    def __init__(self, world: World, host: Host, incarnation: int) -> None:
        self.world, self.host, self.incarnation = world, host, incarnation

    def _log(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self.world.alive(self.host, self.incarnation):
            self.world.on_log(self.host, level, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, fields)

    def debug(self, event: str, **fields: Any) -> None:
        return None

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._log("critical", event, fields)

    def bind(self, **fields: Any) -> TraceLog:
        return self


Shuffle = Callable[[list[Any]], None]
