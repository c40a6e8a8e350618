"""The supervisor's side of hooks, reload and a failing state file, on the fake
three-member cluster of test_supervisor (real cores, fake adapters)."""

from __future__ import annotations

import asyncio

from test_supervisor import Cluster, _ready

from failoverd.core.spec import Timing
from failoverd.core.state import PgRole


class RecordingHooks:
    def __init__(self, veto: str | None = None) -> None:
        self.veto = veto
        self.calls: list[tuple] = []

    def role_changed(self, *, term, role, previous, reason):
        self.calls.append(("role", term, role, previous))

    def vip_changed(self, *, term, action, reason):
        self.calls.append(("vip", term, action, reason))

    async def pre_promote(self, term):
        self.calls.append(("pre_promote", term))
        return self.veto


async def test_role_change_hook_reports_the_new_leader():
    c = Cluster()
    hooks = c.give_each("hooks", lambda name: RecordingHooks())
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        calls = hooks[leader].calls
        assert ("role", c.sups[leader].node.term, "leader", "candidate") in calls
        # pre_promote ran before the promotion of the leader's PostgreSQL
        assert ("pre_promote", c.sups[leader].node.term) in calls


class QuietVip:
    """A VIP that is always added at once."""

    def precheck(self) -> None:
        return None

    async def acquire(self) -> None:
        return None

    async def acquisition_result(self) -> str | None:
        return None

    async def release(self) -> None:
        return None


async def test_vip_hooks_follow_the_cores_vip_events():
    c = Cluster()
    hooks = c.give_each("hooks", lambda name: RecordingHooks())
    c.give_each("vip", lambda name: QuietVip())
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        term = c.sups[leader].node.term
        await c.wait_for(lambda: ("vip", term, "acquired", "promoted") in hooks[leader].calls)
        assert [call for n, h in hooks.items() if n != leader for call in h.calls if call[0] == "vip"] == []
        await c.sups[leader].stop()  # steps down, releasing the VIP
        calls = hooks[leader].calls
        assert ("vip", term, "released", "supervisor shutting down") in calls
        assert ("role", term, "follower", "leader") in calls
        assert calls.index(("vip", term, "acquired", "promoted")) < calls.index(("role", term, "follower", "leader"))


async def test_no_vip_hook_without_a_vip():
    c = Cluster()
    hooks = c.give_each("hooks", lambda name: RecordingHooks())
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        await c.wait_for(lambda: any(call[0] == "role" and call[2] == "leader" for call in hooks[leader].calls))
        await c.sups[leader].stop()
        assert [call for h in hooks.values() for call in h.calls if call[0] == "vip"] == []


async def test_a_pre_promote_veto_hands_leadership_on_and_nobody_is_promoted_behind_it():
    c = Cluster()
    c.give_each("hooks", lambda name: RecordingHooks(veto="pre_promote hook exited 1"))
    async with c:
        await c.wait_for(lambda: any(s.counters.events["promotion_failed"] for s in c.sups.values()), timeout_s=10)
        await asyncio.sleep(0.5)
        assert c.primaries() == []  # every member's fencing hook says no
        vetoed = [n for n, s in c.sups.items() if s.counters.events["promotion_failed"]]
        assert vetoed
        assert all(("promote" not in [e[1] for e in c.journal.entries if e[0] == n]) for n in vetoed)


async def test_only_the_vetoing_member_is_skipped():
    c = Cluster()
    hooks = c.give_each("hooks", lambda name: RecordingHooks())
    first = sorted(c.sups)[0]
    hooks[first].veto = "not here"
    async with c:
        await c.wait_for(lambda: len(c.primaries()) == 1, timeout_s=15)
        assert c.primaries() != [first]


async def test_retime_changes_the_cores_timing():
    c = Cluster()
    sup = next(iter(c.sups.values()))
    timing = Timing(heartbeat_interval_s=0.05, election_timeout_min_s=1.0, election_timeout_max_s=1.4, lease_s=0.8)
    await sup.retime(timing)
    assert sup.node.timing is timing and sup.node.spec.timing is timing


async def test_a_state_file_that_cannot_be_written_stops_the_supervisor():
    c = Cluster()
    victim = next(iter(c.sups.values()))

    def full_disk(state):
        raise OSError(28, "No space left on device")

    victim.state.save = full_disk
    async with c:
        await c.wait_for(lambda: victim.failed.is_set(), timeout_s=10)
        assert isinstance(victim.failure, OSError)
        assert all(pg.role is not PgRole.PRIMARY for n, pg in c.pgs.items() if c.sups[n] is victim)
