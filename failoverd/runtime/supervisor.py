"""The asyncio loop around the protocol core.

It feeds the core ticks, peer messages and probe results and carries out the
returned actions in the documented order (docs/design.md §2):

* Core calls are serialised by one lock; each call's action list is executed
  before the next call starts, so the ordering contract holds across inputs.
* `Persist` is written and fsynced inline, before anything after it runs.
* `Fence` is awaited inline (bounded), so a hand-over message is only sent
  once PostgreSQL cannot write any more.
* Slow PostgreSQL work (promote, follow, start, clean stop, sync settings)
  runs one at a time in a background worker, so ticks, heartbeats and probes
  go on while it runs; a fence cancels queued work first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from failoverd.core import actions as act
from failoverd.core.messages import Heartbeat, Message
from failoverd.core.node import Node, Role
from failoverd.core.state import HistoryEntry, PersistentState, PgObservation, PgRole, Position, StateStamp
from failoverd.runtime.ports import HooksPort, PeersPort, PostgresPort, StatePort, VipPort, WatchdogPort

PG_ACTION_TIMEOUT_S = 600.0  # a clone of a large database may take long; fences never wait on this
FENCE_TIMEOUT_S = 5.0
PROMOTING_PROBE_S = 0.02  # probe interval while a promotion runs
SHUTDOWN_GRACE_S = 2.0
VIP_RETRY_S = 2.0  # a failed VIP acquisition is tried again this often while we should hold it


class PromotionVetoed(Exception):
    """The pre_promote hook said no; the message is its reason."""


@dataclasses.dataclass
class ReinitStatus:
    """The last rebuild of this member's standby asked for through the API."""

    leader: str
    started_at: float  # wall clock, for display
    finished_at: float | None = None
    error: str | None = None  # None while running or when it succeeded


@dataclasses.dataclass
class SupervisorStatus:
    """What the REST API and the CLI report about this member (read-only snapshot)."""

    name: str
    role: str
    term: int
    leader: str | None
    pg: PgObservation | None
    lease_remaining_s: float | None
    primary_ready: bool
    vip_held: bool
    paused: bool
    leader_live: bool = False  # leader heard within election_timeout_max (or we are it)
    # The primary's WAL position as last known here: our own on a primary-ready
    # leader, else the one the live leader's heartbeats carry.
    primary_position: Position | None = None
    pg_age_s: float | None = None  # how old the PostgreSQL observation is
    switchover_to: str | None = None
    switchover_at: float | None = None
    state_stamp: StateStamp = StateStamp(0, 0)
    history: tuple[HistoryEntry, ...] = ()
    reinit: ReinitStatus | None = None


@dataclasses.dataclass
class SupervisorCounters:
    """Counted from the core's Emit actions, for the metrics endpoint.

    A *failover* here is a promotion of this member's PostgreSQL that replaced
    another primary (any election but the bootstrap, switchovers included).
    Its *duration* runs from the last heartbeat this member heard from the
    previous leader to the first probe showing its own PostgreSQL writable:
    the write outage as this member saw it (unknown, and left alone, when it
    never heard a previous leader, e.g. after its own restart).
    """

    events: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    elected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by reason
    promotions: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by reason
    failovers: int = 0
    last_failover_duration_s: float | None = None
    last_failover_wall_time: float | None = None


class ReinitRefused(Exception):
    """This member cannot rebuild its standby now; the message says why."""


class Supervisor:
    def __init__(
        self,
        node: Node,
        *,
        state: StatePort,
        peers: PeersPort,
        postgres: PostgresPort | None,
        watchdog: WatchdogPort | None,
        vip: VipPort | None,
        members: dict[str, Any],
        probe_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
        hooks: HooksPort | None = None,
    ) -> None:
        self.node = node
        self.hooks = hooks
        self.state = state
        self.peers = peers
        self.postgres = postgres
        self.watchdog = watchdog
        self.vip = vip
        self.members = members  # name -> NodeConfig, for Follow's upstream
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self.log = log or structlog.get_logger("failoverd")
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._pg_queue: asyncio.Queue[act.Action] = asyncio.Queue()
        self._pg_busy: asyncio.Task | None = None
        self._pg_running: act.Action | None = None  # the action _pg_busy runs
        self._tasks: list[asyncio.Task] = []
        self.failed = asyncio.Event()  # set when a loop died; the daemon then exits non-zero
        self.failure: BaseException | None = None
        self.counters = SupervisorCounters()
        self._leader_heard_at: float | None = None  # last heartbeat from the leader we follow
        self._heard_before_election: float | None = None
        self._elected_reason: str | None = None
        self._reinit: ReinitStatus | None = None
        self.last_tick_at: float | None = None  # for the systemd watchdog's health check
        self._vip_retry_at = 0.0

    @property
    def _promoting(self) -> bool:
        """The PostgreSQL worker runs a Promote."""
        return isinstance(self._pg_running, act.Promote)

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loops = [self._ticker()]
        if self.postgres is not None:
            loops += [self._prober(), self._pg_worker()]
        self._tasks = [asyncio.create_task(self._guard(loop), name=loop.__name__) for loop in loops]
        self.log.info("supervisor_started", node=self.node.name, term=self.node.term)

    async def _guard(self, loop) -> None:
        """A loop that dies must take the supervisor down with it, loudly: a
        member that silently stopped ticking or probing is worse than a restart
        (the watchdog fences a leader whose supervisor is gone)."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failure = exc
            self.log.critical("supervisor_loop_failed", node=self.node.name, term=self.node.term,
                              loop=loop.__name__, error=repr(exc)[:500])
            self.failed.set()
            raise

    async def stop(self) -> None:
        """Orderly shutdown: hand leadership over (fencing), then stop the loops."""
        async with self._lock:
            try:
                await self._execute(self.node.shutdown(self.clock()))
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk; the watchdog fences at EOF
                self.log.critical("shutdown_handover_failed", node=self.node.name, term=self.node.term,
                                  error=repr(exc)[:300])
        if self.node.role is Role.FOLLOWER and self.watchdog is not None and not self.node.watchdog_armed:
            await self.watchdog.disarm()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            await asyncio.wait({task}, timeout=SHUTDOWN_GRACE_S)
        self.log.info("supervisor_stopped", node=self.node.name, term=self.node.term)

    # ---------------------------------------------------------------- inputs

    async def on_message(self, msg: Message) -> None:
        """Peer input; ProtocolError propagates to the peer server (answered 400)."""
        async with self._lock:
            now = self.clock()
            actions = self.node.receive(msg, now)
            if isinstance(msg, Heartbeat) and self.node.leader == msg.sender and self.node.term == msg.term:
                self._leader_heard_at = now
            await self._execute(actions)
        self._wake.set()

    async def retime(self, timing: Any) -> None:
        """Apply reloaded protocol timing (see failoverd.runtime.reload for when that is safe)."""
        async with self._lock:
            self.node.retime(timing)
            self.probe_interval_s = timing.heartbeat_interval_s
        self._wake.set()
        self.log.info("timing_changed", node=self.node.name, term=self.node.term,
                      heartbeat_interval_s=timing.heartbeat_interval_s, lease_s=timing.lease_s,
                      election_timeout_min_s=timing.election_timeout_min_s)

    async def request(self, req: Any) -> act.Reply:
        async with self._lock:
            actions = self.node.request(req, self.clock())
            await self._execute(actions)
        self._wake.set()
        for a in actions:
            if isinstance(a, act.Reply):
                return a
        raise RuntimeError("core returned no reply")  # a core bug, not a user error

    def status(self) -> SupervisorStatus:
        node = self.node
        now = self.clock()
        lead = node.lead
        leading = node.role is Role.LEADER
        heard = self._leader_heard_at
        leader_live = node.leader is not None and (
            leading or (heard is not None and now - heard < node.timing.election_timeout_max_s)
        )
        primary_position = None
        if leading and lead is not None and lead.primary_ready and node.pg is not None:
            primary_position = node.pg.position
        elif leader_live and node.leader_primary_ready:
            primary_position = node.ctx.last_primary_position
        return SupervisorStatus(
            name=node.name,
            role=node.role.value,
            term=node.term,
            leader=node.leader,
            pg=node.pg,
            lease_remaining_s=None if lead is None or not lead.lease_ever else max(0.0, lead.lease_until - now),
            primary_ready=bool(lead is not None and lead.primary_ready),
            vip_held=node.vip_held,
            paused=node.state.paused,
            leader_live=leader_live,
            primary_position=primary_position,
            pg_age_s=None if node.pg is None else max(0.0, now - node.pg.observed_at),
            switchover_to=node.state.switchover_to,
            switchover_at=node.state.switchover_at,
            state_stamp=node.state.stamp,
            history=node.state.history,
            reinit=None if self._reinit is None else dataclasses.replace(self._reinit),
        )

    async def checkpoint(self, timeout_s: float) -> None:
        """CHECKPOINT the local PostgreSQL (before a switchover, so that the
        shutdown checkpoint, which writes are paused for, has little left to do)."""
        if self.postgres is None:
            raise RuntimeError(f"{self.node.name} runs no PostgreSQL")
        started = self.clock()
        await self.postgres.checkpoint(timeout_s)
        self.log.info("pg_checkpoint_done", node=self.node.name, term=self.node.term,
                      seconds=round(self.clock() - started, 3))

    async def reinit(self) -> str:
        """Queue a rebuild of this member's standby from the primary (a fresh
        clone; the old data directory is kept aside). Runs in the PostgreSQL
        worker, so it never overlaps another PostgreSQL action; a fence drops it."""
        async with self._lock:
            node = self.node
            pg = node.pg
            if self.postgres is None:
                raise ReinitRefused(f"{node.name} is a witness: it has no PostgreSQL")
            if node.role is not Role.FOLLOWER:
                raise ReinitRefused(f"{node.name} is {node.role.value}: only a follower's standby can be rebuilt")
            if pg is not None and pg.role is PgRole.PRIMARY:
                raise ReinitRefused(f"{node.name}'s PostgreSQL is a primary")
            if node.leader is None or not node.leader_primary_ready or not self.status().leader_live:
                raise ReinitRefused(f"{node.name} knows no live primary to clone from")
            if self._reinit is not None and self._reinit.finished_at is None:
                raise ReinitRefused(f"a rebuild of {node.name} from {self._reinit.leader} is already running")
            self._reinit = ReinitStatus(leader=node.leader, started_at=time.time())
            self._pg_queue.put_nowait(Reinit(node.leader))
            self.log.info("reinit_queued", node=node.name, term=node.term, leader=node.leader)
            return f"rebuilding {node.name} from {node.leader}"

    # ----------------------------------------------------------------- loops

    async def _ticker(self) -> None:
        while True:
            async with self._lock:
                await self._execute(self.node.tick(self.clock(), wall_time=time.time()))
                await self._retry_vip()
                delay = max(0.0, min(self.node.next_wakeup() - self.clock(), self.probe_interval_s))
                self.last_tick_at = self.clock()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _prober(self) -> None:
        while True:
            # Cleared before the probe, not after: a ProbeNow asked for while
            # a probe runs wants one that starts later (e.g. "since the election").
            self._probe_now.clear()
            observed_at = self.clock()
            obs = await self.postgres.probe(observed_at)
            async with self._lock:
                await self._execute(self.node.observe(obs, self.clock()))
            self._wake.set()
            # While a promotion runs, look often: the core hands out the VIP and
            # points the standbys at us only once a probe shows us writable, and
            # the adapter's promote() still has work to do after that point.
            interval = PROMOTING_PROBE_S if self._promoting else self.probe_interval_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._probe_now.wait()

    async def _pg_worker(self) -> None:
        while True:
            action = await self._pg_queue.get()
            # Each action runs as a task of its own so that a fence can cancel
            # it without cancelling the worker. The worker waits with
            # asyncio.wait, which never swallows the worker's own cancellation
            # (awaiting the task directly can lose it if both finish at once).
            task = asyncio.create_task(self._run_pg_action_bounded(action))
            self._pg_busy, self._pg_running = task, action
            if self._promoting:
                self._probe_now.set()
            started = self.clock()
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                self._pg_busy = self._pg_running = None
            name = type(action).__name__
            if task.cancelled():
                self.log.info("pg_action_cancelled", node=self.node.name, term=self.node.term, action=name)
            elif task.exception() is not None:
                self.log.error("pg_action_failed", node=self.node.name, term=self.node.term, action=name,
                               error=str(task.exception())[:500])
                if isinstance(action, act.Promote):
                    # Give up leadership now rather than after promote_timeout.
                    async with self._lock:
                        await self._execute(self.node.promotion_failed(action.term, str(task.exception())[:200],
                                                                       self.clock()))
                    self._wake.set()
            else:
                self.log.info("pg_action_done", node=self.node.name, term=self.node.term, action=name,
                              seconds=round(self.clock() - started, 3))
            self._probe_now.set()

    async def _run_pg_action_bounded(self, action: act.Action) -> None:
        # The adapter's own events (clone, rewind, start, ...) carry the term
        # and member they were done for, without the adapter knowing the core.
        term = getattr(action, "term", self.node.term)
        with structlog.contextvars.bound_contextvars(node=self.node.name, term=term):
            async with asyncio.timeout(PG_ACTION_TIMEOUT_S):
                await self._run_pg_action(action)

    async def _run_pg_action(self, action: act.Action) -> None:
        pg = self.postgres
        if isinstance(action, act.Promote):
            if self.hooks is not None:
                veto = await self.hooks.pre_promote(action.term)
                if veto is not None:
                    raise PromotionVetoed(veto)
            await pg.promote()
        elif isinstance(action, act.Follow):
            await pg.follow(self.members[action.leader])
        elif isinstance(action, act.StartStandby):
            await pg.start_standby(None)
        elif isinstance(action, act.Demote):
            await pg.stop("fast")
        elif isinstance(action, act.ConfigureSync):
            await pg.configure_sync(action.sync_count, action.standbys)
        elif isinstance(action, Reinit):
            await self._run_reinit(action)

    async def _run_reinit(self, action: Reinit) -> None:
        record = self._reinit
        try:
            await self.postgres.reinit(self.members[action.leader])
        except BaseException as exc:
            if record is not None:
                record.error = "cancelled (fenced)" if isinstance(exc, asyncio.CancelledError) else str(exc)[:300]
            raise
        finally:
            if record is not None:
                record.finished_at = time.time()

    # --------------------------------------------------------------- actions

    async def _execute(self, actions: list[act.Action]) -> None:
        for a in actions:
            if isinstance(a, act.Persist):
                self._save(a.state)
            elif isinstance(a, act.Send):
                self.peers.send(a.to, a.message)
            elif isinstance(a, act.Emit):
                self.log.info(a.event.NAME, **a.event.fields())
                self._count(a)
                self._call_hooks(a)
            elif isinstance(a, act.ArmWatchdog):
                if self.watchdog is not None:
                    if a.deadline is None:
                        await self.watchdog.disarm()
                    else:
                        await self.watchdog.arm(a.deadline)
            elif isinstance(a, act.Fence):
                await self._fence(a.reason)
            elif isinstance(a, act.PrepareVip):
                if self.vip is not None:
                    self.vip.precheck()  # overlaps confirmation and promotion (adapters/vip.py)
            elif isinstance(a, (act.ReleaseVip, act.AcquireVip)):
                await self._move_vip(a)
            elif isinstance(a, act.ProbeNow):
                self._probe_now.set()
            elif isinstance(a, act.Reply):
                pass  # returned to the caller of request()
            elif isinstance(a, (act.Promote, act.Follow, act.StartStandby, act.Demote, act.ConfigureSync)):
                if self.postgres is not None:
                    if isinstance(a, (act.Promote, act.Follow)):
                        # The latest decision wins over queued or stuck work for an older one.
                        self._drop_queued((act.Follow, act.StartStandby), type(a).__name__.lower())
                        self._cancel_follow_asking_upstream(a)
                    self._pg_queue.put_nowait(a)
            else:
                raise TypeError(f"unknown action {a!r}")

    def _save(self, state: PersistentState) -> None:
        """Persist, fsynced, before anything after it runs. A state file that
        cannot be written (disk full, I/O error) ends the daemon: our term and
        vote would otherwise run ahead of the disk. Nothing after the failed
        Persist is sent; a leader's PostgreSQL is fenced by the watchdog,
        which sees its pipe close when the daemon exits."""
        try:
            self.state.save(state)
        except Exception as exc:
            if not self.failed.is_set():
                self.failure = exc
                self.log.critical("state_write_failed", node=self.node.name, term=self.node.term,
                                  error=repr(exc)[:300])
                self.failed.set()
            raise

    def _call_hooks(self, event: act.Emit) -> None:
        hooks = self.hooks
        name = event.event.NAME
        if hooks is None or name not in ("role_changed", "vip_acquired", "vip_released"):
            return
        fields = event.event.fields()
        term = int(fields.get("term", self.node.term))
        reason = str(fields.get("reason", ""))
        if name == "role_changed":
            hooks.role_changed(term=term, role=str(fields.get("role")), previous=str(fields.get("previous")),
                               reason=reason)
        else:
            hooks.vip_changed(term=term, action=name.removeprefix("vip_"), reason=reason or "promoted")

    def _count(self, event: act.Emit) -> None:
        counters = self.counters
        name = event.event.NAME
        counters.events[name] += 1
        fields = event.event.fields()
        if name == "role_changed" and fields.get("role") == "leader":
            self._elected_reason = str(fields.get("reason", "election"))
            counters.elected[self._elected_reason] += 1
            self._heard_before_election, self._leader_heard_at = self._leader_heard_at, None
        elif name == "promoted":
            reason = self._elected_reason or "election"
            counters.promotions[reason] += 1
            if reason == "bootstrap":
                return
            counters.failovers += 1
            if self._heard_before_election is not None:
                counters.last_failover_duration_s = max(0.0, self.clock() - self._heard_before_election)
                counters.last_failover_wall_time = time.time()
                self._heard_before_election = None

    async def _move_vip(self, action: act.Action) -> None:
        """VIP trouble (another host answers, a command fails) is logged, never
        fatal: the primary stays correct and reachable through the DSN, and the
        watchdog removes the address when the lease ends."""
        if self.vip is None:
            return
        acquire = isinstance(action, act.AcquireVip)
        try:
            await (self.vip.acquire() if acquire else self.vip.release())
        except Exception as exc:  # noqa: BLE001 - reported, see docstring
            self.log.error("vip_acquire_failed" if acquire else "vip_release_failed",
                           node=self.node.name, term=self.node.term, error=str(exc)[:300])

    async def _retry_vip(self) -> None:
        """The core hands the VIP out once per leadership; an acquisition that
        failed in the background (another host answered, a command failed) is
        retried every VIP_RETRY_S for as long as the core still wants it held."""
        vip = self.vip
        if vip is None or not self.node.vip_held or vip.acquire_error is None:
            return
        now = self.clock()
        if now - self._vip_retry_at < VIP_RETRY_S:
            return
        self._vip_retry_at = now
        self.log.info("vip_acquire_retry", node=self.node.name, term=self.node.term, error=vip.acquire_error[:300])
        await self._move_vip(act.AcquireVip(self.node.term))

    def _cancel_follow_asking_upstream(self, superseded_by: act.Promote | act.Follow) -> None:
        """A new leader's Promote, or a Follow of the new leader, must not wait
        for a running Follow of the old leader that still waits for it to
        answer (up to the connect timeout, when it can send but not receive).
        Only cancelled before it changed anything locally
        (PostgresPort.waiting_on_upstream)."""
        task, running = self._pg_busy, self._pg_running
        if task is None or not isinstance(running, act.Follow) or not self.postgres.waiting_on_upstream:
            return
        if isinstance(superseded_by, act.Follow) and superseded_by.leader == running.leader:
            return
        self.log.info("pg_action_interrupted", node=self.node.name, term=self.node.term, action="Follow",
                      leader=running.leader, reason=type(superseded_by).__name__.lower())
        task.cancel()

    def _drop_queued(self, kinds: tuple[type, ...], reason: str) -> None:
        """Remove queued (not running) PostgreSQL work of these kinds: a new
        leader's Promote must not wait behind a Follow of the old leader."""
        kept = []
        while not self._pg_queue.empty():
            queued = self._pg_queue.get_nowait()
            if isinstance(queued, kinds):
                self.log.info("pg_action_dropped", node=self.node.name, term=self.node.term,
                              action=type(queued).__name__, reason=reason)
            else:
                kept.append(queued)
        for queued in kept:
            self._pg_queue.put_nowait(queued)

    async def _fence(self, reason: str) -> None:
        """Stop PostgreSQL immediately; queued PostgreSQL work is dropped first so
        nothing restarts or promotes it behind the fence."""
        self._drop_queued((object,), "fence")
        busy = self._pg_busy
        if busy is not None and not busy.done():
            busy.cancel()
        if self.postgres is None:
            return
        started = self.clock()
        try:
            async with asyncio.timeout(FENCE_TIMEOUT_S):
                await self.postgres.stop("immediate")
        except Exception as exc:  # noqa: BLE001 - the watchdog's deadline still fences
            self.log.error("fence_failed", node=self.node.name, term=self.node.term, reason=reason, error=str(exc)[:300])
            return
        self.log.info("fenced", node=self.node.name, term=self.node.term, reason=reason,
                      seconds=round(self.clock() - started, 3))
        self._probe_now.set()


@dataclasses.dataclass(frozen=True, slots=True)
class Reinit:
    """Supervisor-made PostgreSQL work (not a core action): rebuild the standby from `leader`."""

    leader: str


def new_rng() -> random.Random:
    return random.Random(int.from_bytes(os.urandom(8), "big"))

