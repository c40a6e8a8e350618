"""The asyncio supervisor around the core, with small fakes behind its adapter
interfaces: three supervisors in one event loop, peers wired in memory, a
fake PostgreSQL per member. What is checked is the supervisor's own job:
the ordering contract of docs/design.md §2 on a real event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

from failoverd.core import actions as act
from failoverd.core.messages import Message, TimeoutNow, VoteResponse
from failoverd.core.node import Node, Role
from failoverd.core.spec import ClusterSpec, Member, Timing
from failoverd.core.state import PersistentState, PgObservation, PgRole, Position
import failoverd.runtime.supervisor as supervisor_module
from failoverd.runtime.supervisor import Supervisor

TIMING = Timing(heartbeat_interval_s=0.02, election_timeout_min_s=0.2, election_timeout_max_s=0.3, lease_s=0.12,
                fence_margin_s=0.02, promote_timeout_s=2.0)
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
    def __init__(self, who: str, journal: Journal, cluster: dict[str, Supervisor]) -> None:
        self.who, self.journal, self.cluster = who, journal, cluster
        self.cut: set[str] = set()

    def send(self, to: str, msg: Message) -> None:
        self.journal.add(self.who, "send", msg)
        if to in self.cut or self.who in self.cluster[to].peers.cut:
            return
        asyncio.get_running_loop().call_later(0.001, lambda: asyncio.ensure_future(self._deliver(to, msg)))

    async def _deliver(self, to: str, msg: Message) -> None:
        await self.cluster[to].on_message(msg)


class FakePostgres:
    """Role, WAL position and upstream, changed by the supervisor's actions after a short delay."""

    def __init__(self, who: str, journal: Journal, cluster: dict[str, FakePostgres]) -> None:
        self.who, self.journal, self.cluster = who, journal, cluster
        self.role = PgRole.ABSENT
        self.timeline, self.lsn = 1, 0
        self.upstream: str | None = None
        self.waiting_on_upstream = False

    async def probe(self, observed_at: float) -> PgObservation:
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

    async def ensure_slots(self, standbys: tuple[str, ...]) -> None:
        pass


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
    def __init__(self) -> None:
        self.journal = Journal()
        self.sups: dict[str, Supervisor] = {}
        self.pgs: dict[str, FakePostgres] = {}
        for i, m in enumerate(SPEC.members):
            node = Node(SPEC, m.name, PersistentState(), time.monotonic(), random.Random(i))
            pg = FakePostgres(m.name, self.journal, self.pgs)
            self.pgs[m.name] = pg
            self.sups[m.name] = Supervisor(
                node, state=FakeState(m.name, self.journal), peers=FakePeers(m.name, self.journal, self.sups),
                postgres=pg, watchdog=FakeWatchdog(m.name, self.journal), vip=None,
                members={n.name: n.name for n in SPEC.members}, probe_interval_s=0.02,
            )

    async def __aenter__(self) -> Cluster:
        for s in self.sups.values():
            await s.start()
        return self

    async def __aexit__(self, *exc) -> None:
        for s in self.sups.values():
            for task in s._tasks:
                task.cancel()
        await asyncio.gather(*(t for s in self.sups.values() for t in s._tasks), return_exceptions=True)

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

    async def wait_for(self, predicate, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.01)


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
        await c.wait_for(lambda: c.pgs[old].role is not PgRole.PRIMARY, timeout_s=2.0)
        assert c.sups[old].node.role is not Role.LEADER
        await c.wait_for(lambda: len(c.primaries()) == 1 and c.primaries()[0] != old)


async def test_orderly_stop_of_the_leader_hands_over():
    async with Cluster() as c:
        await c.wait_for(lambda: _ready(c))
        old = c.primaries()[0]
        await c.sups[old].stop()
        assert c.pgs[old].role is PgRole.STOPPED
        await c.wait_for(lambda: len(c.primaries()) == 1 and c.primaries()[0] != old, timeout_s=2.0)


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
        acquire_error = None

        def precheck(self) -> None:
            pass

        async def acquire(self) -> None:
            raise RuntimeError("another host answers for 198.18.7.100")

        async def release(self) -> None:
            pass

    c = Cluster()
    c.give_each("vip", lambda name: ConflictingVip())
    async with c:
        await c.wait_for(lambda: _ready(c))
        await asyncio.sleep(0.2)
        assert not any(s.failed.is_set() for s in c.sups.values())
    assert any(e["event"] == "vip_acquire_failed" for e in _captured_logs)


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


async def test_a_failed_background_vip_acquisition_is_retried_while_leader(_captured_logs, monkeypatch):
    monkeypatch.setattr(supervisor_module, "VIP_RETRY_S", 0.05)

    class FlakyVip:
        """Fails in the background (as VirtualIp does) twice, then holds."""

        def __init__(self) -> None:
            self.acquire_error: str | None = None
            self.attempts = 0
            self.held = False

        def precheck(self) -> None:
            pass

        async def acquire(self) -> None:
            self.attempts += 1
            self.acquire_error = "another host answers" if self.attempts <= 2 else None
            self.held = self.acquire_error is None

        async def release(self) -> None:
            self.held = False

    c = Cluster()
    vips = c.give_each("vip", lambda name: FlakyVip())
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        await c.wait_for(lambda: vips[leader].held)
        assert vips[leader].attempts == 3
        assert all(v.attempts == 0 for n, v in vips.items() if n != leader)
    retries = [e for e in _captured_logs if e["event"] == "vip_acquire_retry"]
    assert len(retries) == 2 and all(e["node"] == leader and e["term"] >= 1 for e in retries)


class _DeafUpstreamPostgres(FakePostgres):
    """follow() waits for an upstream that never answers; `asking` says
    whether it is still only asking (the adapter's waiting_on_upstream)."""

    asking = True

    async def follow(self, leader) -> None:
        self.journal.add(self.who, "follow", leader)
        self.waiting_on_upstream = self.asking
        try:
            await asyncio.sleep(1.0)
        finally:
            self.waiting_on_upstream = False


async def _promote_during_a_follow(asking: bool) -> tuple[_DeafUpstreamPostgres, float]:
    c = Cluster()
    sup = c.sups["b"]
    pg = _DeafUpstreamPostgres("b", c.journal, c.pgs)
    pg.asking = asking
    pg.role, pg.lsn = PgRole.STANDBY, 100
    c.pgs["b"] = sup.postgres = pg
    worker = asyncio.create_task(sup._pg_worker())
    try:
        sup._pg_queue.put_nowait(act.Follow("a", 1))
        while "follow" not in [e[1] for e in c.journal.entries if e[0] == "b"]:
            await asyncio.sleep(0.005)
        started = time.monotonic()
        async with sup._lock:
            await sup._execute([act.Promote(2)])
        while pg.role is not PgRole.PRIMARY:
            assert time.monotonic() - started < 3.0
            await asyncio.sleep(0.005)
        return pg, time.monotonic() - started
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_promote_interrupts_a_follow_still_asking_its_old_upstream(_captured_logs):
    _, took = await _promote_during_a_follow(asking=True)
    assert took < 0.5, took
    events = [e["event"] for e in _captured_logs]
    assert "pg_action_interrupted" in events and "pg_action_cancelled" in events


async def test_promote_waits_for_a_follow_that_already_changes_the_server(_captured_logs):
    _, took = await _promote_during_a_follow(asking=False)
    assert took >= 0.9, took  # never cut short half-way (a rewind, a clone, a restart)
    assert "pg_action_interrupted" not in [e["event"] for e in _captured_logs]


async def test_a_follow_of_the_new_leader_interrupts_one_of_the_old_still_asking(_captured_logs):
    c = Cluster()
    sup = c.sups["c"]
    pg = _DeafUpstreamPostgres("c", c.journal, c.pgs)
    pg.role, pg.lsn = PgRole.STANDBY, 100
    c.pgs["c"] = sup.postgres = pg
    c.pgs["b"].role, c.pgs["b"].lsn = PgRole.PRIMARY, 100
    worker = asyncio.create_task(sup._pg_worker())
    try:
        sup._pg_queue.put_nowait(act.Follow("a", 1))
        while not pg.waiting_on_upstream:
            await asyncio.sleep(0.005)
        pg.asking = False  # the next follow() (of b) is not interrupted
        started = time.monotonic()
        async with sup._lock:
            await sup._execute([act.Follow("a", 1)])  # the same leader again: left alone
        await asyncio.sleep(0.05)
        assert "pg_action_interrupted" not in [e["event"] for e in _captured_logs]
        async with sup._lock:
            await sup._execute([act.Follow("b", 2)])
        while [e[2] for e in c.journal.entries if e[:2] == ("c", "follow")][-1:] != ["b"]:
            assert time.monotonic() - started < 0.5
            await asyncio.sleep(0.005)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    assert [e["reason"] for e in _captured_logs if e["event"] == "pg_action_interrupted"] == ["follow"]


async def test_only_the_elected_member_prechecks_the_vip_before_acquiring_it():
    class RecordingVip:
        acquire_error = None

        def __init__(self) -> None:
            self.calls: list[str] = []

        def precheck(self) -> None:
            self.calls.append("precheck")

        async def acquire(self) -> None:
            self.calls.append("acquire")

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
