"""Small deterministic harness for unit tests of the protocol core.

`Wire` holds a dict of real `Node`s and delivers the `Send` actions they return
to each other, synchronously and in FIFO order, at one instant `now`. Links can
be cut one direction at a time. Everything a node returned is recorded per node,
so tests can assert on actions and their order. No mocks, no clocks, no threads.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable

from failoverd.core import actions as act
from failoverd.core.node import Node
from failoverd.core.spec import ClusterSpec, Member, MemberKind, Replication, ReplicationMode, Timing
from failoverd.core.state import PersistentState, PgObservation, PgRole, Position

CLUSTER = "pgc"
T = Timing()  # heartbeat 0.1, election timeout 1.0..1.4, lease 0.8
LEASE_REFUSAL = "a leader's lease may still be valid here"  # the core's refusal reason


def make_spec(
    data: int = 3,
    witnesses: int = 0,
    k: int = 1,
    mode: ReplicationMode = ReplicationMode.QUORUM,
    priorities: dict[str, int] | None = None,
    nofailover: Iterable[str] = (),
    timing: Timing = T,
) -> ClusterSpec:
    """Data members a, b, c, ... then witnesses w1, w2, ..."""
    priorities = priorities or {}
    nofailover = set(nofailover)
    members = [Member(n, priority=priorities.get(n, 100), nofailover=n in nofailover) for n in "abcdefghi"[:data]]
    members += [Member(f"w{i + 1}", kind=MemberKind.WITNESS) for i in range(witnesses)]
    return ClusterSpec(
        CLUSTER, tuple(members), timing, Replication(mode=mode, sync_count=k if mode is ReplicationMode.QUORUM else 0)
    )


def make_node(
    spec: ClusterSpec,
    name: str,
    now: float = 0.0,
    seed: int = 0,
    persisted: PersistentState | None = None,
    disabled: Iterable[str] = (),
) -> Node:
    return Node(spec, name, persisted or PersistentState(), now, random.Random(seed), disabled)


def pos(lsn: int, timeline: int = 1) -> Position:
    return Position(timeline, lsn)


def obs(
    role: PgRole = PgRole.STANDBY,
    at: float = 0.0,
    lsn: int | None = 1000,
    following: str | None = None,
    timeline: int = 1,
) -> PgObservation:
    return PgObservation(role, at, None if lsn is None else Position(timeline, lsn), following)


def env(sender: str, term: int, cluster: str = CLUSTER) -> dict:
    """The envelope fields of a message, for building messages in tests."""
    return {"cluster": cluster, "sender": sender, "term": term}


def voter(name: str = "b", lsn: int | None = 1000, spec: ClusterSpec | None = None, now: float = 0.0, **kw) -> Node:
    """A node started at `now` (so it may vote from now + election_timeout_min), with a standby probe."""
    node = make_node(spec or make_spec(), name, now=now, **kw)
    if lsn is not None and node.me.is_data:
        node.observe(obs(PgRole.STANDBY, at=now, lsn=lsn), now)
    return node


# ------------------------------------------------------------- action queries


def of_type(actions: Iterable[act.Action], cls: type) -> list:
    return [a for a in actions if isinstance(a, cls)]


def sends(actions: Iterable[act.Action], msg_cls: type | None = None, to: str | None = None) -> list[act.Send]:
    return [
        a
        for a in actions
        if isinstance(a, act.Send)
        and (msg_cls is None or isinstance(a.message, msg_cls))
        and (to is None or a.to == to)
    ]


def messages(actions: Iterable[act.Action], msg_cls: type | None = None, to: str | None = None) -> list:
    return [s.message for s in sends(actions, msg_cls, to)]


def kinds(actions: Iterable[act.Action], skip: tuple[type, ...] = (act.Emit,)) -> list[str]:
    """Action class names in order (Emit skipped), handy for ordering asserts."""
    return [type(a).__name__ for a in actions if not isinstance(a, skip)]


def first_index(actions: list[act.Action], cls: type) -> int:
    for i, a in enumerate(actions):
        if isinstance(a, cls):
            return i
    raise AssertionError(f"no {cls.__name__} in {kinds(actions)}")


def events(actions: Iterable[act.Action]) -> list[str]:
    return [a.event.NAME for a in actions if isinstance(a, act.Emit)]


def switchover(node: Node, req, now: float) -> list[act.Action]:
    """A switchover request and, when accepted, the completion of the
    CHECKPOINT it asks for first: the actions of both, in order."""
    out = node.request(req, now)
    if of_type(out, act.Checkpoint):
        out = out + node.checkpoint_done(None, now)
    return out


# --------------------------------------------------------------------- wire


class Wire:
    """A dict of nodes plus synchronous, FIFO, droppable delivery of their Sends."""

    def __init__(
        self, spec: ClusterSpec, now: float = 0.0, seed: int = 0, persisted: dict[str, PersistentState] | None = None
    ) -> None:
        self.spec = spec
        persisted = persisted or {}
        self.nodes: dict[str, Node] = {
            m.name: make_node(spec, m.name, now, seed * 100 + i, persisted.get(m.name))
            for i, m in enumerate(spec.members)
        }
        self.cut: set[tuple[str, str]] = set()  # (sender, receiver) links that drop everything
        self.log: dict[str, list[act.Action]] = {n: [] for n in self.nodes}
        self.delivered: list[tuple[str, str, object]] = []

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    # -- links
    def drop(self, a: str, b: str, both: bool = True) -> None:
        self.cut.add((a, b))
        if both:
            self.cut.add((b, a))

    def isolate(self, name: str) -> None:
        for other in self.nodes:
            if other != name:
                self.drop(name, other)

    def heal(self) -> None:
        self.cut.clear()

    # -- driving
    def deliver(
        self, origin: str, actions: list[act.Action], now: float, hold: Iterable[type] = ()
    ) -> dict[str, list[act.Action]]:
        """Record `origin`'s actions and deliver every Send they lead to, transitively.

        Messages of a type in `hold` are not delivered (kept in `self.held`), so a
        test can stop a cascade at an interesting point. Returns the actions each
        node produced during this call (origin's included), in order.
        """
        hold = tuple(hold)
        self.held: list[act.Send] = []
        produced: dict[str, list[act.Action]] = {n: [] for n in self.nodes}
        queue: deque[tuple[str, act.Action]] = deque()

        def record(name: str, acts: list[act.Action]) -> None:
            produced[name].extend(acts)
            self.log[name].extend(acts)
            queue.extend((name, a) for a in acts)

        record(origin, actions)
        while queue:
            sender, a = queue.popleft()
            if not isinstance(a, act.Send) or (sender, a.to) in self.cut:
                continue
            if hold and isinstance(a.message, hold):
                self.held.append(a)
                continue
            self.delivered.append((sender, a.to, a.message))
            record(a.to, self.nodes[a.to].receive(a.message, now))
        return produced

    def tick(self, name: str, now: float, **kw) -> dict[str, list[act.Action]]:
        return self.deliver(name, self.nodes[name].tick(now), now, **kw)

    def tick_all(self, now: float) -> dict[str, list[act.Action]]:
        out: dict[str, list[act.Action]] = {n: [] for n in self.nodes}
        for name in self.nodes:
            for k, v in self.tick(name, now).items():
                out[k].extend(v)
        return out

    def observe(self, name: str, pg: PgObservation, now: float) -> dict[str, list[act.Action]]:
        return self.deliver(name, self.nodes[name].observe(pg, now), now)

    def observe_data(
        self,
        now: float,
        role: PgRole = PgRole.STANDBY,
        at: float | None = None,
        lsn: dict[str, int] | int = 1000,
        following: str | None = None,
    ) -> None:
        """Give every data member an observation (same role; per-node or shared LSN)."""
        for m in self.spec.data_members:
            n = lsn[m.name] if isinstance(lsn, dict) else lsn
            self.observe(m.name, obs(role, now if at is None else at, n, following), now)

    def elect(
        self, name: str, now: float = 2.0, obs_at: float | None = None, lsn: dict[str, int] | int = 1000
    ) -> dict[str, list[act.Action]]:
        """Observe every data member as a standby, then let `name` time out and win.

        With `obs_at` < `now` the probes predate the election, so the new leader
        has no fresh positions yet and cannot promote within this call.
        """
        self.observe_data(now, at=now if obs_at is None else obs_at, lsn=lsn)
        node = self.nodes[name]
        assert now >= node.ctx.election_deadline and now >= node.ctx.promise_until, "elect() too early"
        return self.tick(name, now)
