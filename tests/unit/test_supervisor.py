"""The asyncio supervisor around the core, with small fakes behind its adapter
interfaces: three supervisors in one event loop, peers wired in memory, a
fake PostgreSQL per member. What is checked is the supervisor's own job:
the ordering contract of docs/design.md §2 on a real event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest

from failoverd.core import actions as act
from failoverd.core import events as ev
from failoverd.core.actions import ReplyCode
from failoverd.core.messages import Message, TimeoutNow, VoteResponse
from failoverd.core.node import Node, Role
from failoverd.core.requests import Pause, Reinit, Switchover
from failoverd.core.spec import ClusterSpec, Member, Timing
from failoverd.core.state import PersistentState, PgObservation, PgRole, Position
from failoverd.runtime.supervisor import FENCE_DROPS_QUEUE, Supervisor, SupervisorCounters
from tests.support import wait_for

TIMING = Timing(
    heartbeat_interval_s=0.02,
    election_timeout_min_s=0.2,
    election_timeout_max_s=0.3,
    lease_s=0.12,
    fence_margin_s=0.02,
    promote_timeout_s=2.0,
)
SPEC = ClusterSpec("t", (Member("a"), Member("b"), Member("c")), timing=TIMING)


class Journal:
    """One ordered record of everything every fake saw, across members."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, object]] = []

    def add(self, who: str, what: str, detail: object = None) -> None:
        self.entries.append((who, what, detail))


@dataclasses.dataclass
class FakeState:
    who: str
    journal: Journal
    saved: PersistentState | None = None

    def save(self, state: PersistentState) -> None:
        self.saved = state
        self.journal.add(self.who, "persist", state)


class FakePeers:
    """Delivers each message a millisecond later, unless the link is cut or the test is over."""

    def __init__(self, who: str, journal: Journal, cluster: dict[str, Supervisor]) -> None:
        self.who, self.journal, self.cluster = who, journal, cluster
        self.cut: set[str] = set()
        self.closed = False
        self.deliveries: set[asyncio.Task] = set()

    def send(self, to: str, msg: Message) -> None:
        self.journal.add(self.who, "send", msg)
        if to in self.cut or self.who in self.cluster[to].peers.cut:
            return
        asyncio.get_running_loop().call_later(0.001, self._start_delivery, to, msg)

    def _start_delivery(self, to: str, msg: Message) -> None:
        if self.closed:
            return
        task = asyncio.ensure_future(self._deliver(to, msg))
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def _deliver(self, to: str, msg: Message) -> None:
        await self.cluster[to].on_message(msg)


class FakePostgres:
    """Role, WAL position and upstream, changed by the supervisor's actions
    after a short delay. An action named in `gates` (by its method's name)
    waits until the test sets that event; `failures` makes one fail."""

    def __init__(self, who: str, journal: Journal, cluster: dict[str, FakePostgres]) -> None:
        self.who, self.journal, self.cluster = who, journal, cluster
        self.role = PgRole.ABSENT
        self.timeline, self.lsn = 1, 0
        self.upstream: str | None = None
        self.waiting_on_upstream = False
        self.gates: dict[str, asyncio.Event] = {}
        self.failures: dict[str, Exception] = {}
        self.pending_restart: tuple[str, ...] = ()  # settings that wait for a restart
        self.probes = 0

    def watch_postmaster(self, wake: Callable[[], None]) -> None:
        self.wake_on_exit = wake

    async def _gate(self, what: str) -> None:
        gate = self.gates.get(what)
        if gate is not None:
            await gate.wait()
        failure = self.failures.get(what)
        if failure is not None:
            raise failure

    async def probe(self, observed_at: float) -> PgObservation:
        self.probes += 1
        position = None if self.role is PgRole.ABSENT else Position(self.timeline, self.lsn)
        following = self.upstream if self.role is PgRole.STANDBY else None
        return PgObservation(self.role, observed_at, position, following)

    async def promote(self) -> None:
        self.journal.add(self.who, "promote")
        await asyncio.sleep(0.01)
        if self.role is PgRole.ABSENT:
            self.role, self.lsn = PgRole.PRIMARY, 100
        elif self.role is PgRole.STANDBY:
            self.role, self.timeline, self.upstream = PgRole.PRIMARY, self.timeline + 1, None

    async def follow(self, leader) -> None:
        self.journal.add(self.who, "follow", leader)
        await asyncio.sleep(0.01)
        source = self.cluster[leader]
        self.role, self.upstream, self.timeline, self.lsn = PgRole.STANDBY, leader, source.timeline, source.lsn

    async def start_standby(self, upstream) -> None:
        self.journal.add(self.who, "start_standby")
        if self.role is PgRole.STOPPED:
            self.role = PgRole.STANDBY

    async def stop(self, mode: str) -> None:
        self.journal.add(self.who, f"stop_{mode}")
        await asyncio.sleep(0.005)
        if self.role is not PgRole.ABSENT:
            self.role = PgRole.STOPPED

    async def configure_sync(self, sync_count: int, standbys: tuple[str, ...]) -> None:
        self.journal.add(self.who, "configure_sync", (sync_count, standbys))
        await self._gate("configure_sync")

    async def ensure_slots(self, standbys: tuple[str, ...]) -> None:
        pass

    async def checkpoint(self, timeout_s: float) -> None:
        self.journal.add(self.who, "checkpoint")
        await self._gate("checkpoint")
        self.journal.add(self.who, "checkpoint_done")

    async def restart(self) -> None:
        self.journal.add(self.who, "restart")
        await self._gate("restart")
        await asyncio.sleep(0.01)
        self.pending_restart = ()

    async def reinit(self, leader) -> None:
        self.journal.add(self.who, "reinit", leader)
        await self._gate("reinit")
        await asyncio.sleep(0.01)
        source = self.cluster[leader]
        self.role, self.upstream, self.timeline, self.lsn = PgRole.STANDBY, leader, source.timeline, source.lsn
        self.journal.add(self.who, "reinit_done", leader)


class FakeWatchdog:
    def __init__(self, who: str, journal: Journal) -> None:
        self.who, self.journal = who, journal
        self.deadline: float | None = None

    async def arm(self, deadline: float) -> None:
        self.deadline = deadline
        self.journal.add(self.who, "arm", deadline)

    async def disarm(self) -> None:
        self.deadline = None
        self.journal.add(self.who, "disarm")


class Cluster:
    """Three supervisors on real time; `skew` moves one member's monotonic
    clock (its core's time) ahead of the others'."""

    def __init__(self, disabled_safeguards: tuple[str, ...] = ()) -> None:
        self.journal = Journal()
        self.sups: dict[str, Supervisor] = {}
        self.pgs: dict[str, FakePostgres] = {}
        self.skew = {m.name: 0.0 for m in SPEC.members}
        for i, m in enumerate(SPEC.members):
            clock = functools.partial(self._clock, m.name)
            node = Node(SPEC, m.name, PersistentState(), clock(), random.Random(i))
            pg = FakePostgres(m.name, self.journal, self.pgs)
            self.pgs[m.name] = pg
            self.sups[m.name] = Supervisor(
                node,
                state=FakeState(m.name, self.journal),
                peers=FakePeers(m.name, self.journal, self.sups),
                postgres=pg,
                watchdog=FakeWatchdog(m.name, self.journal),
                vip=None,
                members={n.name: n.name for n in SPEC.members},
                clock=clock,
                disabled_safeguards=disabled_safeguards,
            )

    def _clock(self, name: str) -> float:
        return time.monotonic() + self.skew[name]

    async def __aenter__(self) -> Cluster:
        for s in self.sups.values():
            await s.start()
        return self

    async def __aexit__(self, *exc) -> None:
        tasks = []
        for s in self.sups.values():
            s.peers.closed = True
            tasks += [*s._tasks, *s.peers.deliveries, *([s._vip_watch] if s._vip_watch is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def give_each(self, attr: str, make) -> dict:
        """Set every supervisor's `attr` (a port: hooks, vip, ...) to make(name); returns them by name."""
        made = {name: make(name) for name in self.sups}
        for name, sup in self.sups.items():
            setattr(sup, attr, made[name])
        return made

    def leader(self) -> str:
        (name,) = [n for n, s in self.sups.items() if s.node.role is Role.LEADER]
        return name

    def primaries(self) -> list[str]:
        return [n for n, pg in self.pgs.items() if pg.role is PgRole.PRIMARY]

    def done(self, who: str) -> list[str]:
        """What `who`'s fakes were asked to do, in order."""
        return [what for name, what, _ in self.journal.entries if name == who]

    async def wait_for(self, predicate, timeout_s: float = 5.0, what: str = "the condition") -> None:
        """tests.support.wait_for, polling every 10 ms (the fakes' timing is that fine)."""
        await wait_for(what, predicate, timeout_s, interval_s=0.01)


def _ready(c: Cluster) -> bool:
    leaders = [s for s in c.sups.values() if s.node.role is Role.LEADER and s.status().primary_ready]
    standbys = [pg for pg in c.pgs.values() if pg.role is PgRole.STANDBY and pg.upstream is not None]
    return len(leaders) == 1 and len(standbys) == 2


async def test_bootstrap_elects_one_leader_and_the_others_follow():
    async with Cluster() as c:
        await c.wait_for(lambda: _ready(c))
        leader = c.primaries()[0]
        assert all(pg.upstream == leader for n, pg in c.pgs.items() if n != leader)
        # The watchdog was armed before the promotion was asked for.
        kinds = [what for who, what, _ in c.journal.entries if who == leader]
        assert kinds.index("arm") < kinds.index("promote")
        assert kinds.index("configure_sync") < kinds.index("promote")


async def test_a_settled_cluster_probes_at_the_healthy_interval_and_a_stopped_standby_every_heartbeat():
    async with Cluster() as c:
        await c.wait_for(lambda: _ready(c))
        await asyncio.sleep(0.2)  # the standbys' positions since the election are reported
        before = {n: pg.probes for n, pg in c.pgs.items()}
        await asyncio.sleep(1.0)
        # 10 a second at the healthy interval (0.1 s); every heartbeat would be 50.
        counts = {n: c.pgs[n].probes - before[n] for n in c.pgs}
        assert all(3 <= k <= 15 for k in counts.values()), counts
        standby = next(n for n, pg in c.pgs.items() if pg.role is PgRole.STANDBY)
        c.pgs[standby].role = PgRole.STOPPED
        await asyncio.sleep(0.15)  # the next healthy-interval probe sees it
        mark = c.pgs[standby].probes
        await asyncio.sleep(0.5)
        assert c.pgs[standby].probes - mark >= 0.5 / TIMING.heartbeat_interval_s * 0.6


async def test_every_granted_vote_is_persisted_before_it_is_sent():
    async with Cluster() as c:
        await c.wait_for(lambda: _ready(c))
    for i, (who, what, detail) in enumerate(c.journal.entries):
        if what == "send" and isinstance(detail, VoteResponse) and detail.granted:
            earlier = [d for w, k, d in c.journal.entries[:i] if w == who and k == "persist"]
            assert earlier and earlier[-1].term == detail.term and earlier[-1].voted_for is not None


async def test_primary_crash_fences_before_handing_over_and_a_standby_takes_over():
    async with Cluster() as c:
        await c.wait_for(lambda: _ready(c))
        old = c.primaries()[0]
        c.pgs[old].role = PgRole.STOPPED  # the postmaster died
        await c.wait_for(lambda: len(c.primaries()) == 1 and c.primaries()[0] != old)
        mine = [(what, detail) for who, what, detail in c.journal.entries if who == old]
        stops = [i for i, (what, _) in enumerate(mine) if what == "stop_immediate"]
        handovers = [i for i, (what, d) in enumerate(mine) if what == "send" and isinstance(d, TimeoutNow)]
        assert stops, "the old leader never fenced its PostgreSQL"
        # A hand-over (when a healthy successor was known) only after the fence.
        assert all(stops[0] < h for h in handovers)
        await c.wait_for(lambda: c.pgs[old].role is PgRole.STANDBY and c.pgs[old].upstream == c.primaries()[0])


async def test_isolated_leader_fences_itself_and_the_majority_elects_a_new_one():
    async with Cluster() as c:
        await c.wait_for(lambda: _ready(c))
        old = c.primaries()[0]
        c.sups[old].peers.cut = {n for n in c.sups if n != old}
        await c.wait_for(lambda: c.pgs[old].role is not PgRole.PRIMARY)
        assert c.sups[old].node.role is not Role.LEADER
        await c.wait_for(lambda: len(c.primaries()) == 1 and c.primaries()[0] != old)


async def test_orderly_stop_of_the_leader_hands_over():
    async with Cluster() as c:
        await c.wait_for(lambda: _ready(c))
        old = c.primaries()[0]
        await c.sups[old].stop()
        assert c.pgs[old].role is PgRole.STOPPED
        await c.wait_for(lambda: len(c.primaries()) == 1 and c.primaries()[0] != old)


async def test_postgres_work_runs_with_node_and_term_bound_for_its_log_events():
    # The daemon's log configuration merges contextvars into every event, so
    # what the adapter logs during an action carries the member and term.
    import structlog

    seen: list[dict] = []

    class RecordingPostgres(FakePostgres):
        async def follow(self, leader) -> None:
            seen.append(structlog.contextvars.get_contextvars())
            await super().follow(leader)

    c = Cluster()
    for name in list(c.pgs):
        pg = RecordingPostgres(name, c.journal, c.pgs)
        c.pgs[name] = pg
        c.sups[name].postgres = pg
    async with c:
        await c.wait_for(lambda: _ready(c))
    assert seen and all(ctx.get("term", 0) >= 1 and ctx.get("node") in ("a", "b", "c") for ctx in seen)


async def test_a_vip_that_cannot_be_taken_is_logged_not_fatal(_captured_logs):
    class ConflictingVip:
        def precheck(self) -> None:
            pass

        async def acquire(self) -> None:
            raise RuntimeError("another host answers for 198.18.7.100")

        async def acquisition_result(self) -> str | None:
            raise AssertionError("not asked: acquire() failed")

        async def release(self) -> None:
            pass

    c = Cluster()
    c.give_each("vip", lambda name: ConflictingVip())
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.sups[c.leader()]
        await c.wait_for(lambda: leader.status().vip_error is not None)
        await asyncio.sleep(0.2)
        assert not any(s.failed.is_set() for s in c.sups.values())
        st = leader.status()
        assert st.vip_held and st.vip_error == "another host answers for 198.18.7.100" and st.primary_ready
    failed = [e for e in _captured_logs if e["event"] == "vip_acquire_retry"]
    assert failed and failed[0]["error"] == "another host answers for 198.18.7.100" and failed[0]["retry_s"] == 2.0


async def test_orderly_stop_of_a_follower_leaves_its_standby_running():
    async with Cluster() as c:
        await c.wait_for(lambda: _ready(c))
        follower = next(n for n, s in c.sups.items() if s.node.role is Role.FOLLOWER)
        await c.sups[follower].stop()
        assert c.pgs[follower].role is PgRole.STANDBY
        mine = [what for who, what, _ in c.journal.entries if who == follower]
        # No fence, and the watchdog disarmed (work that was already running
        # in the PostgreSQL worker may be journaled after the disarm).
        assert "stop_immediate" not in mine and "stop_fast" not in mine and "disarm" in mine


# A lease long enough to span a jump of a leader's clock by most of the
# VIP retry interval (core.context.VIP_RETRY_S, 2 s) without real waiting.
LONG_LEASE = Timing(
    heartbeat_interval_s=0.02,
    election_timeout_min_s=4.0,
    election_timeout_max_s=4.5,
    lease_s=3.0,
    election_timeout_floor_s=4.0,  # a lease of 3 s throughout, not a shorter adaptive one
    fence_margin_s=0.02,
    promote_timeout_s=2.0,
)


async def _move_clock(c: Cluster, name: str, seconds: float) -> None:
    """Move `name`'s clock ahead, with a fresh long lease to span it, and
    wait until its supervisor has ticked on the new time."""
    sup = c.sups[name]
    await c.wait_for(lambda: (sup.status().lease_remaining_s or 0.0) > seconds + 0.5)
    c.skew[name] += seconds
    moved = sup.clock()
    await c.wait_for(lambda: sup.last_tick_at is not None and sup.last_tick_at >= moved)
    await c.wait_for(lambda: (sup.status().lease_remaining_s or 0.0) > seconds + 0.5)


async def test_a_failed_background_vip_acquisition_is_reported_and_asked_for_again_after_2_s(_captured_logs):
    class FlakyVip:
        """Adds the address in the background (as VirtualIp does): the first attempt fails."""

        def __init__(self) -> None:
            self.attempts = 0
            self.result: str | None = None
            self.held = False

        def precheck(self) -> None:
            pass

        async def acquire(self) -> None:
            self.attempts += 1
            self.result = "another host answers" if self.attempts == 1 else None

        async def acquisition_result(self) -> str | None:
            self.held = self.result is None
            return self.result

        async def release(self) -> None:
            self.held = False

    c = Cluster()
    vips = c.give_each("vip", lambda name: FlakyVip())
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        sup = c.sups[leader]
        await c.wait_for(lambda: sup.status().vip_error is not None)
        assert sup.status().vip_error == "another host answers" and sup.status().vip_held
        for s in c.sups.values():
            await s.retime(LONG_LEASE)
        await _move_clock(c, leader, 1.5)
        assert vips[leader].attempts == 1  # not yet: 1.5 s after the failure on the leader's clock
        await _move_clock(c, leader, 0.6)
        await c.wait_for(lambda: vips[leader].held)
        assert vips[leader].attempts == 2 and sup.status().vip_error is None
        assert sup.node.role is Role.LEADER and c.leader() == leader
        assert all(v.attempts == 0 for n, v in vips.items() if n != leader)
    failed = [e for e in _captured_logs if e["event"] == "vip_acquire_retry"]
    assert len(failed) == 1 and failed[0]["node"] == leader and failed[0]["error"] == "another host answers"


class _DeafUpstreamPostgres(FakePostgres):
    """follow() waits for an upstream that does not answer until the test
    sets `answer`; `asking` says whether it is still only asking (the
    adapter's waiting_on_upstream) or already changing the server."""

    asking = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.answer = asyncio.Event()

    async def follow(self, leader) -> None:
        self.journal.add(self.who, "follow", leader)
        self.waiting_on_upstream = self.asking
        try:
            await self.answer.wait()
        finally:
            self.waiting_on_upstream = False
        self.journal.add(self.who, "follow_done", leader)


@contextlib.asynccontextmanager
async def _pg_worker(sup: Supervisor) -> AsyncIterator[None]:
    """The supervisor's PostgreSQL worker alone (no ticks, no probes)."""
    worker = asyncio.create_task(sup._pg_worker())
    try:
        yield
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def _execute(sup: Supervisor, *actions: act.Action) -> None:
    """Carry out actions as if the core had returned them."""
    async with sup._lock:
        await sup._execute(list(actions))


async def _promote_during_a_follow(c: Cluster, asking: bool) -> _DeafUpstreamPostgres:
    """b's worker runs a Follow of a that waits on its upstream; then the core decides to promote b."""
    sup = c.sups["b"]
    pg = _DeafUpstreamPostgres("b", c.journal, c.pgs)
    pg.asking = asking
    pg.role, pg.lsn = PgRole.STANDBY, 100
    c.pgs["b"] = sup.postgres = pg
    await _execute(sup, act.Follow("a", 1))
    await c.wait_for(lambda: "follow" in c.done("b"))
    await _execute(sup, act.Promote(2))
    return pg


async def test_promote_interrupts_a_follow_still_asking_its_old_upstream(_captured_logs):
    c = Cluster()
    async with _pg_worker(c.sups["b"]):
        pg = await _promote_during_a_follow(c, asking=True)
        # The old upstream never answers: only cancelling the Follow lets the Promote run.
        await c.wait_for(lambda: pg.role is PgRole.PRIMARY)
    assert "follow_done" not in c.done("b")
    events = [(e["event"], e.get("action")) for e in _captured_logs]
    assert ("pg_action_interrupted", "Follow") in events and ("pg_action_cancelled", "Follow") in events


async def test_promote_waits_for_a_follow_that_already_changes_the_server(_captured_logs):
    c = Cluster()
    async with _pg_worker(c.sups["b"]):
        pg = await _promote_during_a_follow(c, asking=False)
        for _ in range(10):
            await asyncio.sleep(0.01)
        assert "promote" not in c.done("b") and pg.role is PgRole.STANDBY  # queued behind the Follow
        pg.answer.set()
        await c.wait_for(lambda: pg.role is PgRole.PRIMARY)
    # Never cut short half-way (a rewind, a clone, a restart): the Follow finished first.
    assert c.done("b").index("follow_done") < c.done("b").index("promote")
    events = [e["event"] for e in _captured_logs]
    assert "pg_action_interrupted" not in events and "pg_action_cancelled" not in events


async def test_a_follow_of_the_new_leader_interrupts_one_of_the_old_still_asking(_captured_logs):
    c = Cluster()
    sup = c.sups["c"]
    pg = _DeafUpstreamPostgres("c", c.journal, c.pgs)
    pg.role, pg.lsn = PgRole.STANDBY, 100
    c.pgs["c"] = sup.postgres = pg
    c.pgs["b"].role, c.pgs["b"].lsn = PgRole.PRIMARY, 100
    async with _pg_worker(sup):
        await _execute(sup, act.Follow("a", 1))
        await c.wait_for(lambda: pg.waiting_on_upstream)
        pg.asking = False  # the next follow() (of b) is not interrupted
        await _execute(sup, act.Follow("a", 1))  # the same leader again: left alone
        await asyncio.sleep(0.05)
        assert "pg_action_interrupted" not in [e["event"] for e in _captured_logs]
        await _execute(sup, act.Follow("b", 2))
        # a never answers: only an interruption lets the Follow of b start.
        await c.wait_for(lambda: [d for w, k, d in c.journal.entries if (w, k) == ("c", "follow")][-1:] == ["b"])
    assert [e["reason"] for e in _captured_logs if e["event"] == "pg_action_interrupted"] == ["follow"]
    assert [d for w, k, d in c.journal.entries if (w, k) == ("c", "follow_done")] == []


async def test_only_the_elected_member_prechecks_the_vip_before_acquiring_it():
    class RecordingVip:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def precheck(self) -> None:
            self.calls.append("precheck")

        async def acquire(self) -> None:
            self.calls.append("acquire")

        async def acquisition_result(self) -> str | None:
            return None

        async def release(self) -> None:
            self.calls.append("release")

    c = Cluster()
    vips = c.give_each("vip", lambda name: RecordingVip())
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        await c.wait_for(lambda: "acquire" in vips[leader].calls)
    assert vips[leader].calls.index("precheck") < vips[leader].calls.index("acquire")
    never_elected = [n for n in vips if not c.sups[n].counters.elected]
    assert never_elected and all("precheck" not in vips[n].calls for n in never_elected)


# ------------------------------------------ outcomes the core waits for


def _spy_outcomes(sup: Supervisor) -> list[tuple[str, str | None]]:
    """Record the outcomes the supervisor reports to its core (and still report them)."""
    reported: list[tuple[str, str | None]] = []
    node = sup.node
    checkpoint_done, rebuild_done = node.checkpoint_done, node.rebuild_done

    def on_checkpoint(error, now):
        reported.append(("checkpoint_done", error))
        return checkpoint_done(error, now)

    def on_rebuild(error, now):
        reported.append(("rebuild_done", error))
        return rebuild_done(error, now)

    node.checkpoint_done, node.rebuild_done = on_checkpoint, on_rebuild  # type: ignore[method-assign]
    return reported


async def test_a_fence_drops_queued_work_and_reports_a_dropped_checkpoint_or_rebuild(_captured_logs):
    c = Cluster()
    sup = c.sups["a"]
    pg = c.pgs["a"]
    pg.role = PgRole.PRIMARY
    pg.gates["configure_sync"] = asyncio.Event()  # never set: the running action only ends when cancelled
    reported = _spy_outcomes(sup)
    async with _pg_worker(sup):
        await _execute(sup, act.ConfigureSync(1, ("b",)))
        await c.wait_for(lambda: "configure_sync" in c.done("a"))
        await _execute(sup, act.Checkpoint("switchover"), act.Rebuild("b"), act.StartStandby())
        await _execute(sup, act.Fence("test"))
        assert not sup._pg_queue and pg.role is PgRole.STOPPED
        await c.wait_for(
            lambda: ("pg_action_cancelled", "ConfigureSync") in [(e["event"], e.get("action")) for e in _captured_logs]
        )
        await asyncio.sleep(0.05)
    assert reported == [("checkpoint_done", "dropped by a fence"), ("rebuild_done", "dropped by a fence")]
    dropped = [(e["action"], e["reason"]) for e in _captured_logs if e["event"] == "pg_action_dropped"]
    assert dropped == [("Checkpoint", "fence"), ("Rebuild", "fence"), ("StartStandby", "fence")]
    # Nothing decided before the fence ran behind it.
    assert c.done("a") == ["configure_sync", "stop_immediate"]


async def test_with_the_safeguard_off_a_fence_leaves_queued_work_in_place(_captured_logs):
    c = Cluster(disabled_safeguards=(FENCE_DROPS_QUEUE,))
    sup = c.sups["a"]
    pg = c.pgs["a"]
    pg.role = PgRole.PRIMARY
    gate = pg.gates["configure_sync"] = asyncio.Event()
    reported = _spy_outcomes(sup)
    async with _pg_worker(sup):
        await _execute(sup, act.ConfigureSync(1, ("b",)))
        await c.wait_for(lambda: "configure_sync" in c.done("a"))
        await _execute(sup, act.Checkpoint("switchover"), act.StartStandby())
        await _execute(sup, act.Fence("test"))
        assert [type(a) for a in sup._pg_queue] == [act.Checkpoint, act.StartStandby]
        assert reported == []
        gate.set()  # the running action was not cancelled: it ends, and the queued work runs after it
        await c.wait_for(lambda: "start_standby" in c.done("a"))
    assert c.done("a") == ["configure_sync", "stop_immediate", "checkpoint", "checkpoint_done", "start_standby"]
    assert reported == [("checkpoint_done", None)]
    events = [e["event"] for e in _captured_logs]
    assert "pg_action_dropped" not in events and "pg_action_cancelled" not in events


def test_an_unknown_safeguard_is_refused():
    with pytest.raises(ValueError, match="unknown safeguard"):
        Cluster(disabled_safeguards=("fence-drops-everything",))


async def test_a_rebuild_cut_short_by_a_fence_is_reported_to_the_core():
    c = Cluster()
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        follower = next(n for n in c.sups if n != leader)
        sup = c.sups[follower]
        c.pgs[follower].gates["reinit"] = asyncio.Event()  # the clone takes "forever"
        reply = await sup.request(Reinit(7, follower))
        assert (reply.request_id, reply.code, reply.message) == (
            7,
            ReplyCode.OK,
            f"rebuilding {follower} from {leader}",
        )
        await c.wait_for(lambda: "reinit" in c.done(follower))
        assert sup.status().rebuild.running
        c.pgs[follower].role = PgRole.PRIMARY  # its core fences a primary it does not lead
        await c.wait_for(lambda: not sup.status().rebuild.running)
        rebuild = sup.status().rebuild
        assert rebuild.leader == leader and rebuild.error == "cancelled" and rebuild.finished_at is not None
        assert "reinit_done" not in c.done(follower) and "stop_immediate" in c.done(follower)


async def _leader_with_a_healthy_successor(c: Cluster) -> tuple[str, str]:
    await c.wait_for(lambda: _ready(c))
    leader = c.leader()
    target = next(n for n in c.sups if n != leader)
    lead = c.sups[leader].node.lead

    def healthy() -> bool:
        view = lead.followers.get(target)
        return view is not None and view.pg_healthy and view.following and view.position_fresh

    await c.wait_for(healthy)
    return leader, target


async def test_a_switchover_is_answered_once_its_checkpoint_is_done():
    c = Cluster()
    async with c:
        leader, target = await _leader_with_a_healthy_successor(c)
        gate = c.pgs[leader].gates["checkpoint"] = asyncio.Event()
        asking = asyncio.create_task(c.sups[leader].request(Switchover(11, target)))
        await c.wait_for(lambda: "checkpoint" in c.done(leader))
        await asyncio.sleep(0.05)
        assert not asking.done() and "stop_fast" not in c.done(leader)  # no answer, no demotion yet
        gate.set()
        reply = await asking
        assert (reply.request_id, reply.code, reply.message) == (11, ReplyCode.OK, f"switchover to {target} started")
        assert c.done(leader).index("checkpoint_done") < c.done(leader).index("stop_fast")
        await c.wait_for(lambda: c.primaries() == [target])


async def test_a_failed_checkpoint_does_not_stop_the_switchover():
    c = Cluster()
    async with c:
        leader, _ = await _leader_with_a_healthy_successor(c)
        c.pgs[leader].failures["checkpoint"] = TimeoutError("canceling statement due to statement timeout")
        reply = await c.sups[leader].request(Switchover(12, None))
        assert reply.code is ReplyCode.OK and reply.message.startswith("switchover to ")
        assert "checkpoint" in c.done(leader) and "checkpoint_done" not in c.done(leader)
        await c.wait_for(lambda: len(c.primaries()) == 1 and c.primaries()[0] != leader)


async def test_a_request_the_core_does_not_answer_in_time_times_out():
    c = Cluster()
    async with c:
        leader, target = await _leader_with_a_healthy_successor(c)
        c.pgs[leader].gates["checkpoint"] = asyncio.Event()  # the CHECKPOINT hangs
        with pytest.raises(TimeoutError):  # the API answers 504: it may still be carried out
            await c.sups[leader].request(Switchover(13, target), timeout_s=0.2)
        assert not c.sups[leader]._replies  # nothing left waiting


async def test_a_follower_redirects_to_the_live_leader():
    c = Cluster()
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        follower = next(n for n in c.sups if n != leader)
        await c.wait_for(lambda: c.sups[follower].status().leader_live)
        reply = await c.sups[follower].request(Pause(14))
        assert (reply.code, reply.redirect) == (ReplyCode.REDIRECT, leader)
        reply = await c.sups[leader].request(Pause(15))
        assert reply.ok and reply.request_id == 15
        await c.wait_for(lambda: c.sups[follower].status().paused)


def test_counters_count_the_cores_events():
    counters = SupervisorCounters()
    events = [
        ev.RoleChanged(node="a", term=1, role="leader", previous="candidate", reason="bootstrap"),
        ev.Promoted(node="a", term=1, position=None, reason="bootstrap"),
        ev.RoleChanged(node="a", term=2, role="follower", previous="leader", reason="lease lost"),
        ev.RoleChanged(node="a", term=3, role="leader", previous="candidate", reason="election"),
        ev.Promoted(node="a", term=3, position=Position(2, 10), reason="election", outage_s=1.5),
        ev.FenceRequested(node="a", term=2, reason="lease lost"),
    ]
    for event in events:
        counters.count(event)
    assert counters.elected == {"bootstrap": 1, "election": 1}
    assert counters.promotions == {"bootstrap": 1, "election": 1}
    assert counters.failovers == 1  # the bootstrap replaced no primary
    assert counters.events == {"role_changed": 3, "promoted": 2, "fence": 1}
