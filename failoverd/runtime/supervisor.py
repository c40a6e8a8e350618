"""The one executor of the protocol core's actions.

It feeds the core ticks, peer messages, probe results and the outcomes the
core waits for, and carries out the returned actions in the documented order
(docs/design.md §2). The same code runs in the daemon and, on virtual time
with simulated ports, in `failoverd simulate`:

* Core calls are serialised by one lock; each call's action list is executed
  before the next call starts, so the ordering contract holds across inputs.
* `Persist` is written and fsynced inline, before anything after it runs.
* `Fence` is awaited inline (bounded), so a hand-over message is only sent
  once PostgreSQL cannot write any more. It first drops queued PostgreSQL
  work and cancels the running one.
* Slow PostgreSQL work (promote, follow, start, clean stop, sync settings,
  checkpoint, rebuild) runs one at a time in a background worker, so ticks,
  heartbeats and probes go on while it runs. A Promote or a Follow drops
  queued Follow/StartStandby work (the latest decision wins).

It decides nothing: every judgement (liveness, routing of requests, the
reinit policy, retries of the VIP) is the core's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import structlog

from failoverd.core import actions as act
from failoverd.core import events as ev
from failoverd.core.messages import Message
from failoverd.core.node import Node
from failoverd.core.requests import AdminRequest
from failoverd.core.state import PersistentState, Role
from failoverd.core.status import MemberStatus
from failoverd.runtime.ports import HooksPort, PeersPort, PostgresPort, StatePort, VipPort, WatchdogPort

PG_ACTION_TIMEOUT_S = 600.0  # a clone of a large database may take long; fences never wait on this
CHECKPOINT_TIMEOUT_S = 30.0
FENCE_TIMEOUT_S = 5.0
PROMOTING_PROBE_S = 0.02  # probe interval while a promotion runs
TICK_INTERVAL_MAX_S = 1.0  # the ticker looks at least this often (and tells the systemd watchdog it lives)
SHUTDOWN_GRACE_S = 2.0
REPLY_TIMEOUT_S = CHECKPOINT_TIMEOUT_S + 15.0  # a switchover answers once its checkpoint is done
# The executor's own safeguard (the core has the others): switched off, a fence
# leaves queued PostgreSQL work in place and the running one going.
FENCE_DROPS_QUEUE = "fence-drops-queue"
SAFEGUARDS = frozenset({FENCE_DROPS_QUEUE})


class PromotionVetoed(Exception):
    """The pre_promote hook said no; the message is its reason."""


@dataclasses.dataclass
class SupervisorCounters:
    """Counted from the core's events, for the metrics endpoint."""

    events: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    elected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by reason
    promotions: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by reason
    failovers: int = 0

    def count(self, event: ev.Event) -> None:
        self.events[event.NAME] += 1
        if isinstance(event, ev.RoleChanged) and event.role == "leader":
            self.elected[event.reason] += 1
        elif isinstance(event, ev.Promoted):
            self.promotions[event.reason] += 1
            if event.reason != "bootstrap":
                self.failovers += 1


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
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        log: Any = None,
        hooks: HooksPort | None = None,
        disabled_safeguards: Iterable[str] = (),
    ) -> None:
        disabled = frozenset(disabled_safeguards)
        if disabled - SAFEGUARDS:
            raise ValueError(f"unknown safeguard(s) {sorted(disabled - SAFEGUARDS)}")
        self.node = node
        self.hooks = hooks
        self.state = state
        self.peers = peers
        self.postgres = postgres
        self.watchdog = watchdog
        self.vip = vip
        self.members = members  # name -> the member's configuration, for Follow's upstream
        self.clock = clock
        self.wall_clock = wall_clock
        self.log = log or structlog.get_logger("failoverd")
        self.disabled = disabled
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._pg_queue: collections.deque[act.Action] = collections.deque()
        self._pg_queued = asyncio.Event()
        self._pg_busy: asyncio.Task[None] | None = None
        self._pg_running: act.Action | None = None  # the action _pg_busy runs
        self._replies: dict[int, asyncio.Future[act.Reply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._vip_watch: asyncio.Task[None] | None = None
        self.failed = asyncio.Event()  # set when a loop died; the daemon then exits non-zero
        self.failure: BaseException | None = None
        self.counters = SupervisorCounters()
        self.last_tick_at: float | None = None  # for the systemd watchdog's health check
        self._ticker_wakes_at = float("-inf")  # when the ticker looks next (inputs wake it only for sooner)

    @property
    def _promoting(self) -> bool:
        """The PostgreSQL worker runs a Promote."""
        return isinstance(self._pg_running, act.Promote)

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loops: list[tuple[str, Coroutine[Any, Any, None]]] = [("ticker", self._ticker())]
        if self.postgres is not None:
            loops += [("prober", self._prober()), ("pg_worker", self._pg_worker())]
            self.postgres.watch_postmaster(self._probe_now.set)  # a crash is probed at once
        self._tasks = [asyncio.create_task(self._guard(name, loop), name=name) for name, loop in loops]
        self.log.info("supervisor_started", node=self.node.name, term=self.node.term)

    async def _guard(self, name: str, loop: Coroutine[Any, Any, None]) -> None:
        """A loop that dies must take the supervisor down with it, loudly: a
        member that silently stopped ticking or probing is worse than a restart
        (the watchdog fences a leader whose supervisor is gone)."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failure = exc
            self.log.critical(
                "supervisor_loop_failed",
                node=self.node.name,
                term=self.node.term,
                loop=name,
                error=repr(exc)[:500],
            )
            self.failed.set()
            raise

    async def stop(self) -> None:
        """Orderly shutdown: hand leadership over (fencing), then stop the loops."""
        async with self._lock:
            try:
                await self._execute(self.node.shutdown(self.clock()))
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk; the watchdog fences at EOF
                self.log.critical(
                    "shutdown_handover_failed", node=self.node.name, term=self.node.term, error=repr(exc)[:300]
                )
        if self.node.role is Role.FOLLOWER and self.watchdog is not None and not self.node.watchdog_armed:
            await self.watchdog.disarm()
        tasks = [*self._tasks, *([self._vip_watch] if self._vip_watch is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            await asyncio.wait({task}, timeout=SHUTDOWN_GRACE_S)
        for future in self._replies.values():
            future.cancel()
        self.log.info("supervisor_stopped", node=self.node.name, term=self.node.term)

    # ---------------------------------------------------------------- inputs

    async def on_message(self, msg: Message) -> None:
        """Peer input; ProtocolError propagates to the peer server (answered 400)."""
        async with self._lock:
            await self._execute(self.node.receive(msg, self._now()))
        self._nudge()

    async def retime(self, timing: Any) -> None:
        """Apply reloaded protocol timing (see failoverd.runtime.reload for when that is safe)."""
        async with self._lock:
            self.node.retime(timing)
        self._nudge()
        self.log.info(
            "timing_changed",
            node=self.node.name,
            term=self.node.term,
            heartbeat_interval_s=timing.heartbeat_interval_s,
            lease_s=timing.lease_s,
            election_timeout_min_s=timing.election_timeout_min_s,
        )

    async def request(self, req: AdminRequest, timeout_s: float = REPLY_TIMEOUT_S) -> act.Reply:
        """The core's answer to an operator's request. It may come after
        other inputs (a switchover answers once its checkpoint is done).
        TimeoutError when none came in `timeout_s`: the request may have
        been carried out."""
        future: asyncio.Future[act.Reply] = asyncio.get_running_loop().create_future()
        self._replies[req.request_id] = future
        try:
            async with self._lock:
                await self._execute(self.node.request(req, self._now()))
            self._nudge()
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._replies.pop(req.request_id, None)

    def _nudge(self) -> None:
        """Wake the ticker if the core now wants a tick sooner than it sleeps."""
        if self.node.next_wakeup() < self._ticker_wakes_at:
            self._wake.set()

    def status(self) -> MemberStatus:
        return self.node.status(self.clock())

    def _now(self) -> float:
        """The core's time for an input, with the wall time that labels what
        the input leads to (an election's history entry is stamped when it
        is won, not at the tick before)."""
        self.node.label_wall_time(self.wall_clock())
        return self.clock()

    def pending_restart(self) -> tuple[str, ...]:
        """Settings the local PostgreSQL applies only at a restart (the adapter's report)."""
        return () if self.postgres is None else self.postgres.pending_restart

    # ----------------------------------------------------------------- loops

    async def _ticker(self) -> None:
        """Tick the core when its own wake-up time has come. An input may
        bring that time closer (a new leader heartbeats at once), so every
        input wakes this loop to look again, without a tick that is not due:
        an idle member costs one core call per event, not two."""
        due = True  # the first tick labels the wall time at once
        while True:
            async with self._lock:
                if due:
                    await self._execute(self.node.tick(self.clock(), wall_time=self.wall_clock()))
                delay = max(0.0, min(self.node.next_wakeup() - self.clock(), TICK_INTERVAL_MAX_S))
                self.last_tick_at = self.clock()
                self._ticker_wakes_at = self.last_tick_at + delay
            self._wake.clear()
            due = True
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
                due = self.clock() >= self.node.next_wakeup()
            except TimeoutError:
                pass

    async def _prober(self) -> None:
        postgres = self.postgres
        if postgres is None:
            return
        while True:
            # Cleared before the probe, not after: a ProbeNow asked for while
            # a probe runs wants one that starts later (e.g. "since the election").
            self._probe_now.clear()
            obs = await postgres.probe(self.clock())
            async with self._lock:
                await self._execute(self.node.observe(obs, self._now()))
                interval = self.node.probe_interval()  # failoverd.core.probing
            self._nudge()
            # While a promotion runs, look often: the core hands out the VIP and
            # points the standbys at us only once a probe shows us writable, and
            # the adapter's promote() still has work to do after that point.
            if self._promoting:
                interval = PROMOTING_PROBE_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._probe_now.wait()

    async def _pg_worker(self) -> None:
        while True:
            while not self._pg_queue:
                self._pg_queued.clear()
                await self._pg_queued.wait()
            action = self._pg_queue.popleft()
            # Each action runs as a task of its own so that a fence can cancel
            # it without cancelling the worker. The worker waits with
            # asyncio.wait, which never swallows the worker's own cancellation
            # (awaiting the task directly can lose it if both finish at once).
            task = asyncio.create_task(self._run_pg_action_bounded(action))
            self._pg_busy, self._pg_running = task, action
            if self._promoting:
                self._probe_now.set()
            started = self.clock()
            name = type(action).__name__
            self.log.info("pg_action_started", node=self.node.name, term=self.node.term, action=name)
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                self._pg_busy = self._pg_running = None
            error = None
            if task.cancelled():
                error = "cancelled"
                self.log.info("pg_action_cancelled", node=self.node.name, term=self.node.term, action=name)
            elif task.exception() is not None:
                error = str(task.exception())[:500] or type(task.exception()).__name__
                self.log.error("pg_action_failed", node=self.node.name, term=self.node.term, action=name, error=error)
            else:
                self.log.info(
                    "pg_action_done",
                    node=self.node.name,
                    term=self.node.term,
                    action=name,
                    seconds=round(self.clock() - started, 3),
                )
            await self._report_outcome(action, error)
            self._probe_now.set()

    async def _report_outcome(self, action: act.Action, error: str | None) -> None:
        """Tell the core how an action it waits for ended."""
        now = self._now
        if isinstance(action, act.Promote) and error is not None and error != "cancelled":
            outcome = lambda: self.node.promotion_failed(action.term, error[:200], now())
        elif isinstance(action, act.Checkpoint):
            outcome = lambda: self.node.checkpoint_done(error, now())
        elif isinstance(action, act.Rebuild):
            outcome = lambda: self.node.rebuild_done(error, now())
        elif isinstance(action, act.RestartServer):
            outcome = lambda: self.node.restart_done(error, now())
        else:
            return
        async with self._lock:
            await self._execute(outcome())
        self._nudge()

    async def _run_pg_action_bounded(self, action: act.Action) -> None:
        # The adapter's own events (clone, rewind, start, ...) carry the term
        # and member they were done for, without the adapter knowing the core.
        term = getattr(action, "term", self.node.term)
        timeout_s = CHECKPOINT_TIMEOUT_S if isinstance(action, act.Checkpoint) else PG_ACTION_TIMEOUT_S
        with structlog.contextvars.bound_contextvars(node=self.node.name, term=term):
            async with asyncio.timeout(timeout_s):
                await self._run_pg_action(action)

    async def _run_pg_action(self, action: act.Action) -> None:
        pg = self.postgres
        if pg is None:
            return
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
        elif isinstance(action, act.Checkpoint):
            await pg.checkpoint(CHECKPOINT_TIMEOUT_S)
        elif isinstance(action, act.Rebuild):
            await pg.reinit(self.members[action.leader])
        elif isinstance(action, act.RestartServer):
            await pg.restart()

    # --------------------------------------------------------------- actions

    async def _execute(self, actions: list[act.Action]) -> None:
        for a in actions:
            if isinstance(a, act.Persist):
                self._save(a.state)
            elif isinstance(a, act.Send):
                self.peers.send(a.to, a.message)
            elif isinstance(a, act.Emit):
                self._on_event(a.event)
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
            elif isinstance(a, act.AcquireVip):
                await self._acquire_vip(a.term)
            elif isinstance(a, act.ReleaseVip):
                await self._release_vip()
            elif isinstance(a, act.ProbeNow):
                self._probe_now.set()
            elif isinstance(a, act.Reply):
                future = self._replies.get(a.request_id)
                if future is not None and not future.done():
                    future.set_result(a)
            elif isinstance(a, act.PG_WORK):
                self._queue_pg_work(a)
            else:
                raise TypeError(f"unknown action {a!r}")

    def _queue_pg_work(self, a: act.Action) -> None:
        if self.postgres is None:
            return
        if isinstance(a, (act.Promote, act.Follow)):
            # The latest decision wins over queued or stuck work for an older one.
            self._drop_queued((act.Follow, act.StartStandby), type(a).__name__.lower())
            self._cancel_follow_asking_upstream(a)
        self._pg_queue.append(a)
        self._pg_queued.set()
        self.log.info(
            "pg_action_queued",
            node=self.node.name,
            term=self.node.term,
            action=type(a).__name__,
            queued=len(self._pg_queue),
        )

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
                self.log.critical("state_write_failed", node=self.node.name, term=self.node.term, error=repr(exc)[:300])
                self.failed.set()
            raise

    def _on_event(self, event: ev.Event) -> None:
        self.log.info(event.NAME, **event.fields())
        self.counters.count(event)
        hooks = self.hooks
        if hooks is None:
            return
        if isinstance(event, ev.RoleChanged):
            hooks.role_changed(term=event.term, role=event.role, previous=event.previous, reason=event.reason)
        elif self.vip is None:
            return  # no [vip]: nothing moves
        elif isinstance(event, ev.VipAcquired):
            hooks.vip_changed(term=event.term, action="acquired", reason="promoted")
        elif isinstance(event, ev.VipReleased):
            hooks.vip_changed(term=event.term, action="released", reason=event.reason)

    async def _acquire_vip(self, term: int) -> None:
        """Start taking the address and report how that ends to the core, which
        retries a failure. VIP trouble is never fatal: the primary stays
        correct and reachable through the DSN, and the watchdog removes the
        address when the lease ends."""
        vip = self.vip
        if vip is None:
            return
        try:
            await vip.acquire()
        except Exception as exc:  # noqa: BLE001 - reported to the core below
            await self._vip_outcome(term, str(exc) or type(exc).__name__)
            return
        if self._vip_watch is not None:
            self._vip_watch.cancel()
        self._vip_watch = asyncio.create_task(self._watch_vip(term), name="vip-acquisition")

    async def _watch_vip(self, term: int) -> None:
        vip = self.vip
        if vip is None:
            return
        error = await vip.acquisition_result()
        async with self._lock:
            await self._execute(self.node.vip_result(term, error, self._now()))

    async def _vip_outcome(self, term: int, error: str) -> None:
        # Called inside _execute, under the lock: the core's answer joins the list being run.
        await self._execute(self.node.vip_result(term, error, self._now()))

    async def _release_vip(self) -> None:
        vip = self.vip
        if vip is None:
            return
        watch, self._vip_watch = self._vip_watch, None
        if watch is not None:
            watch.cancel()
        try:
            await vip.release()
        except Exception as exc:  # noqa: BLE001 - the watchdog removes it at the lease deadline
            self.log.error("vip_release_failed", node=self.node.name, term=self.node.term, error=str(exc)[:300])

    def _cancel_follow_asking_upstream(self, superseded_by: act.Action) -> None:
        """A new leader's Promote, or a Follow of the new leader, must not wait
        for a running Follow of the old leader that still waits for it to
        answer (up to the connect timeout, when it can send but not receive).
        Only cancelled before it changed anything locally
        (PostgresPort.waiting_on_upstream)."""
        task, running = self._pg_busy, self._pg_running
        postgres = self.postgres
        if task is None or not isinstance(running, act.Follow) or postgres is None or not postgres.waiting_on_upstream:
            return
        if isinstance(superseded_by, act.Follow) and superseded_by.leader == running.leader:
            return
        self.log.info(
            "pg_action_interrupted",
            node=self.node.name,
            term=self.node.term,
            action="Follow",
            leader=running.leader,
            reason=type(superseded_by).__name__.lower(),
        )
        task.cancel()

    def _drop_queued(self, kinds: tuple[type, ...], reason: str) -> list[act.Action]:
        """Remove queued (not running) PostgreSQL work of these kinds: a new
        leader's Promote must not wait behind a Follow of the old leader."""
        kept: collections.deque[act.Action] = collections.deque()
        dropped = []
        for queued in self._pg_queue:
            if isinstance(queued, kinds):
                dropped.append(queued)
                self.log.info(
                    "pg_action_dropped",
                    node=self.node.name,
                    term=self.node.term,
                    action=type(queued).__name__,
                    reason=reason,
                )
            else:
                kept.append(queued)
        self._pg_queue = kept
        return dropped

    async def _fence(self, reason: str) -> None:
        """Stop PostgreSQL immediately; queued PostgreSQL work is dropped first
        and the running action cancelled, so nothing restarts or promotes the
        server behind the fence."""
        if FENCE_DROPS_QUEUE not in self.disabled:
            for dropped in self._drop_queued((object,), "fence"):
                if isinstance(dropped, (act.Checkpoint, act.Rebuild, act.RestartServer)):
                    await self._report_dropped(dropped)
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
            self.log.error(
                "fence_failed", node=self.node.name, term=self.node.term, reason=reason, error=str(exc)[:300]
            )
            return
        self.log.info(
            "fenced", node=self.node.name, term=self.node.term, reason=reason, seconds=round(self.clock() - started, 3)
        )
        self._probe_now.set()

    async def _report_dropped(self, action: act.Action) -> None:
        # Under the lock already (inside _execute): run the core's answer inline.
        if isinstance(action, act.Checkpoint):
            await self._execute(self.node.checkpoint_done("dropped by a fence", self._now()))
        elif isinstance(action, act.Rebuild):
            await self._execute(self.node.rebuild_done("dropped by a fence", self._now()))
        elif isinstance(action, act.RestartServer):
            await self._execute(self.node.restart_done("dropped by a fence", self._now()))


def new_rng() -> random.Random:
    return random.Random(int.from_bytes(os.urandom(8), "big"))
