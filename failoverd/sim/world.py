"""The simulated cluster: the real supervisors (failoverd.runtime.supervisor,
with the real core inside) on simulated hosts.

Only the network, disks, clocks, PostgreSQL, the fencing watchdog and the
VIP are simulated (failoverd.sim.ports); every decision and its execution,
work queue included, is the code the daemon runs. One `random.Random(seed)`
drives everything, each supervisor runs on a deterministic loop of its own
(failoverd.sim.loop), and no wall clock is read, so a seed replays exactly.
Invariants are checked after every step; the first violation stops the run
with a message and the tail of the trace.
"""

from __future__ import annotations

import collections
import functools
import heapq
import random
from collections.abc import Callable
from typing import Any

from failoverd.core import events as ev
from failoverd.core.messages import Message
from failoverd.core.node import Node
from failoverd.core.requests import AdminRequest
from failoverd.core.spec import ClusterSpec, ReplicationMode
from failoverd.core.state import PgObservation, Role
from failoverd.runtime.supervisor import Supervisor
from failoverd.sim.hosts import Host
from failoverd.sim.loop import SimLoop
from failoverd.sim.network import SimNetwork
from failoverd.sim.ports import (
    FAST_STOP_S,
    SLOW_PG_EXTRA_S,
    SimPeers,
    SimPostgresPort,
    SimStateFile,
    SimVip,
    SimWatchdog,
    TraceLog,
)
from failoverd.sim.postgres import SimPostgres, SimRole, WalEntry

REPLICATION_STEP_S = 0.01
CLIENT_WRITE_INTERVAL_S = 0.02
TRACE_LINES = 80
MAX_STEPS_AT_ONE_INSTANT = 20_000
WALL_CLOCK_BASE = 1_900_000_000.0  # the supervisors' wall clocks: labels only
LONG_STEP_P = 0.03  # a step of PostgreSQL work that takes long (see World.slowness)
LONG_STEP_S = (0.5, 3.0)
# Supervisor log events kept in the trace (the core's events always are).
TRACED_LOG_EVENTS = frozenset(
    {
        "supervisor_started",
        "pg_action_queued",
        "pg_action_started",
        "pg_action_done",
        "pg_action_failed",
        "pg_action_cancelled",
        "pg_action_dropped",
        "pg_action_interrupted",
        "fenced",
        "fence_failed",
        "vip_release_failed",
        "supervisor_loop_failed",
        "state_write_failed",
        "shutdown_handover_failed",
    }
)


class Violation(Exception):
    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


class World:
    def __init__(self, spec: ClusterSpec, seed: int, disabled_safeguards: frozenset[str] = frozenset()) -> None:
        from failoverd.core.context import SAFEGUARDS as CORE_SAFEGUARDS

        self.spec = spec
        self.seed = seed
        self.rng = random.Random(seed)
        self.disabled = disabled_safeguards
        self.core_disabled = disabled_safeguards & CORE_SAFEGUARDS
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        names = [m.name for m in spec.members]
        self.net = SimNetwork(names, self.rng)
        drift = spec.timing.clock_drift_max
        self.hosts: dict[str, Host] = {}
        for m in spec.members:
            host = Host(
                name=m.name,
                is_data=m.is_data,
                clock_rate=1 + self.rng.uniform(-drift, drift),
                clock_offset=self.rng.uniform(0, 1000),
                wall_offset=self.rng.uniform(-1, 1),
            )
            if m.is_data:
                host.pg = SimPostgres(m.name)
            self.hosts[m.name] = host
        self._host_list = list(self.hosts.values())
        self.leaders: dict[int, str] = {}
        self.acked: dict[int, tuple[str, int]] = {}  # write id -> (primary, lsn)
        self.ack_times: list[float] = []
        self.ack_primaries: list[str] = []
        self.next_write_id = 1
        self.trace: collections.deque[tuple[float, str]] = collections.deque(maxlen=TRACE_LINES)
        self.check_lease_fence = "lease" not in disabled_safeguards
        self.quorum_mode = spec.replication.mode is ReplicationMode.QUORUM
        self.violation: Violation | None = None
        self.steps = 0
        self._same_instant = 0
        self.members = {m.name: m.name for m in spec.members}  # what a Follow names: the member

    # ------------------------------------------------------------- the clock

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """A world event (network, replication, clients, faults) at real time `when`."""
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, fn))

    def run_until(self, end: float) -> None:
        while self.violation is None:
            when, runner = self._next()
            if runner is None or when > end:
                break
            if when <= self.now:
                self._same_instant += 1
                if self._same_instant > MAX_STEPS_AT_ONE_INSTANT:
                    self.fail("progress", f"more than {MAX_STEPS_AT_ONE_INSTANT} steps at t={self.now}: a busy loop")
                    break
            else:
                self._same_instant = 0
                self.now = when
            self.steps += 1
            runner()
            if self.violation is None:
                self._check_invariants()
        if self.violation is None:
            self.now = max(self.now, end)

    def _next(self) -> tuple[float, Callable[[], None] | None]:
        """The earliest thing to run: a world event, or a step of a running
        supervisor's loop (a frozen one waits). Ties: the world first, then
        the hosts in the order of the configuration."""
        best_t = self._queue[0][0] if self._queue else float("inf")
        best: Callable[[], None] | None = self._pop_world if self._queue else None
        for host in self.hosts.values():
            loop = host.loop
            if loop is None or loop.frozen:
                continue
            t = loop.next_real_time()
            if t is not None and t < best_t:
                best_t, best = t, loop.run_once
        return best_t, best

    def _pop_world(self) -> None:
        _, _, fn = heapq.heappop(self._queue)
        fn()

    # ------------------------------------------------------------ the trace

    def log(self, text: str) -> None:
        self.trace.append((self.now, text))

    def trace_lines(self) -> tuple[str, ...]:
        return tuple(f"{t:9.3f} {text}" for t, text in self.trace)

    def fail(self, invariant: str, detail: str) -> None:
        if self.violation is None:
            self.violation = Violation(invariant, detail)

    def on_log(self, host: Host, level: str, event: str, fields: dict[str, Any]) -> None:
        """A line of a supervisor's log: the core's events and the work queue go to the trace."""
        if event == "supervisor_loop_failed":
            self.fail("supervisor-failed", f"{host.name}: {fields.get('loop')}: {fields.get('error')}")
        if event in TRACED_LOG_EVENTS or event in CORE_EVENTS:
            shown = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("node", "seconds"))
            self.log(f"{host.name} {event} {shown}")

    def on_loop_error(self, host: str, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.fail("unhandled-exception", f"{host}: {context.get('message')}: {exc!r}"[:500])

    # --------------------------------------------------------- supervisors

    def alive(self, host: Host, incarnation: int) -> bool:
        return host.incarnation == incarnation and host.supervisor is not None

    def start_supervisor(self, name: str) -> None:
        host = self.hosts[name]
        if host.supervisor is not None:
            return
        host.incarnation += 1
        inc = host.incarnation
        # No I/O in the simulation: the parts of AbstractEventLoop it leaves out are never called.
        loop = SimLoop(
            name,
            clock=lambda: host.local(self.now),
            to_real=host.real,  # type: ignore[abstract]
            on_error=self.on_loop_error,
        )
        rng = random.Random(self.rng.getrandbits(64))
        node = Node(self.spec, name, host.disk, host.local(self.now), rng, self.core_disabled)
        postgres = SimPostgresPort(self, host, inc) if host.is_data else None
        host.supervisor = Supervisor(
            node,
            state=SimStateFile(self, host, inc),
            peers=SimPeers(self, host, inc),
            postgres=postgres,
            watchdog=SimWatchdog(self, host, inc) if host.is_data else None,
            vip=SimVip(self, host, inc) if host.is_data else None,
            members=self.members,
            clock=loop.time,
            wall_clock=lambda: WALL_CLOCK_BASE + host.wall_offset + self.now,
            log=TraceLog(self, host, inc),
            disabled_safeguards=self.disabled - self.core_disabled,
        )
        host.loop = loop
        self.log(f"{name} supervisor started term={host.disk.term}")
        loop.call_soon(self._spawn, host, inc, host.supervisor.start)

    def _spawn(self, host: Host, incarnation: int, work: Callable[[], Any]) -> None:
        """Start a coroutine on the host's loop, made only now: one made for a
        process killed before it ran would never be awaited."""
        loop = host.loop
        if loop is not None and host.incarnation == incarnation:
            loop.create_task(work())

    def shutdown(self) -> None:
        """End every process (the run is over)."""
        for host in self.hosts.values():
            if host.loop is not None:
                loop, host.loop, host.supervisor = host.loop, None, None
                loop.kill()

    def kill_supervisor(self, name: str) -> None:
        """SIGKILL: nothing of the process runs again; its watchdog sees the pipe close."""
        host = self.hosts[name]
        if host.supervisor is None or host.loop is None:
            return
        loop = host.loop
        host.loop = None
        host.supervisor = None
        loop.kill()
        self.log(f"{name} supervisor killed")
        if host.watchdog_deadline is not None:
            self._watchdog_fence(host, "supervisor pipe closed")

    def freeze(self, name: str) -> None:
        host = self.hosts[name]
        if host.loop is not None and not host.loop.frozen:
            host.loop.frozen = True
            self.log(f"{name} supervisor frozen")

    def thaw(self, name: str) -> None:
        host = self.hosts[name]
        if host.loop is None or not host.loop.frozen:
            return
        host.loop.frozen = False
        # What piled up runs in an order the kernel chose.
        host.loop.shuffle_ready(self.rng.shuffle)
        self.log(f"{name} supervisor thawed")

    def request(self, name: str, req: AdminRequest) -> None:
        """An operator's request to this member's supervisor (as its API would)."""
        host = self.hosts[name]
        supervisor, loop = host.supervisor, host.loop
        if supervisor is None or loop is None:
            return
        loop.call_soon(self._spawn, host, host.incarnation, lambda: supervisor.request(req))

    def send(self, src: str, dst: str, msg: Message) -> None:
        for delay in self.net.deliveries(src, dst):
            target = self.hosts[dst]
            inc = target.incarnation
            self.at(self.now + delay, functools.partial(self._deliver, target, msg, inc))

    def _deliver(self, host: Host, msg: Message, incarnation: int) -> None:
        supervisor, loop = host.supervisor, host.loop
        if supervisor is None or loop is None or host.incarnation != incarnation:
            return
        loop.call_soon(self._spawn, host, incarnation, lambda: supervisor.on_message(msg))

    # ------------------------------------------------------------ watchdog

    def arm_watchdog(self, host: Host, deadline: float | None) -> None:
        host.watchdog_deadline = deadline
        if deadline is None:
            return

        def expire() -> None:
            if host.watchdog_deadline == deadline:
                self._watchdog_fence(host, "lease deadline passed")

        self.at(host.real(deadline), expire)

    def _watchdog_fence(self, host: Host, reason: str) -> None:
        host.watchdog_deadline = None
        if host.vip:
            host.vip = False
        if host.pg is not None and host.pg.running:
            self.log(f"{host.name} watchdog fenced PostgreSQL: {reason}")
            host.pg.stop()

    # ----------------------------------------------------------------- VIP

    def take_vip(self, host: Host) -> None:
        if not host.vip:
            host.vip = True
            self.log(f"{host.name} holds the VIP")

    def drop_vip(self, host: Host) -> None:
        host.vip = False

    # ---------------------------------------------------------- PostgreSQL

    def slowness(self, host: Host) -> float:
        """Extra time one step of PostgreSQL work takes: much more while the
        host is slow (a fault), and now and then a step that simply takes
        long (crash recovery on start, a big rewind, a checkpoint's fsyncs):
        "buggify" in FoundationDB's sense, so that work queued behind it
        waits and decisions go stale, as they do on real hosts."""
        extra = 0.0
        if self.now < host.slow_until:
            extra += self.rng.uniform(*SLOW_PG_EXTRA_S)
        if self.rng.random() < LONG_STEP_P:
            extra += self.rng.uniform(*LONG_STEP_S)
        return extra

    def observation(self, host: Host, observed_at: float) -> PgObservation:
        pg = host.pg
        if pg is None:
            raise ValueError(f"{host.name} has no PostgreSQL")
        following = None
        if pg.role is SimRole.STANDBY and pg.upstream is not None:
            up = self.hosts[pg.upstream].pg
            if up is not None and up.running and pg.compatible_with(up) and self.net.connected(pg.upstream, host.name):
                following = pg.upstream
        return pg.observation(observed_at, following)

    def start_server(self, host: Host, upstream: str | None) -> None:
        pg = host.pg
        if pg is not None and pg.role is SimRole.STOPPED:
            pg.role = SimRole.STANDBY
            pg.upstream = upstream
            pg.flush_acks.clear()

    def stop_server(self, host: Host, why: str) -> None:
        """An immediate stop: writes not yet acknowledged are lost."""
        pg = host.pg
        if pg is not None and pg.running:
            self.log(f"{host.name} PostgreSQL stopped ({why})")
            pg.stop()

    def begin_fast_stop(self, host: Host) -> bool:
        """A fast shutdown: no new writes, WAL sent to connected standbys, then stopped."""
        pg = host.pg
        if pg is None or not pg.running:
            return False
        if pg.role is not SimRole.PRIMARY:
            self.stop_server(host, "fast stop")
            return False
        pg.role = SimRole.STOPPING
        stops = pg.stops

        def done() -> None:
            if pg.role is not SimRole.STOPPING or pg.stops != stops:
                return
            for other in self.hosts.values():
                spg = other.pg
                if spg is not None and spg.role is SimRole.STANDBY and spg.upstream == host.name:
                    if self.net.connected(host.name, other.name) and spg.compatible_with(pg):
                        for e in pg.wal[spg.lsn :]:
                            spg.append(e)
            pg.stop()
            self.log(f"{host.name} PostgreSQL stopped (fast)")

        self.at(self.now + FAST_STOP_S, done)
        return True

    def bootstrap(self, host: Host) -> None:
        pg = host.pg
        if pg is not None and pg.role is SimRole.ABSENT:
            pg.append(WalEntry(1, f"initdb-{host.name}"))
            self._became_primary(host)

    def finish_promote(self, host: Host, stops: int) -> bool:
        """pg_promote() completes unless the server stopped since it was asked
        (PostgreSQL removes a leftover promote signal file when it starts)."""
        pg = host.pg
        if pg is None or pg.stops != stops:
            return False
        if pg.role is SimRole.PRIMARY:
            return True
        if pg.role is not SimRole.STANDBY:
            return False
        tl = max((p.pg.timeline for p in self.hosts.values() if p.pg is not None), default=1) + 1
        pg.append(WalEntry(tl, f"promote-{host.name}-{tl}-{self.steps}"))
        self._became_primary(host)
        return True

    def _became_primary(self, host: Host) -> None:
        pg = host.pg
        assert pg is not None
        pg.role = SimRole.PRIMARY
        pg.upstream = None
        pg.flush_acks.clear()
        self.log(f"{host.name} PostgreSQL promoted at {pg.position()}")
        if self.quorum_mode:
            missing = [w for w in self.acked if w not in pg.write_ids]
            if missing:
                self.fail("no-lost-acked-write", f"{host.name} promoted without acked writes {missing[:5]}")

    def configure_sync(self, host: Host, sync_count: int, standbys: tuple[str, ...]) -> None:
        pg = host.pg
        if pg is not None:
            pg.sync_count = sync_count
            pg.sync_names = standbys

    def stream_from(self, host: Host, upstream: str | None) -> None:
        pg = host.pg
        if pg is None:
            return
        if pg.role is SimRole.STOPPED:
            pg.role = SimRole.STANDBY
        if pg.role is SimRole.STANDBY:
            pg.upstream = upstream
            pg.flush_acks.clear()

    def clone(self, host: Host, leader: str) -> bool:
        """pg_basebackup from `leader` as it is now (False: it fails)."""
        pg, up = host.pg, self.hosts[leader].pg
        if pg is None or pg.role is not SimRole.ABSENT or up is None or not up.running:
            return False
        if not self.net.connected(leader, host.name):
            return False
        for e in up.wal:
            pg.append(e)  # pg_basebackup
        pg.upstream = leader
        pg.role = SimRole.STANDBY
        self.log(f"{host.name} cloned from {leader} at {pg.position()}")
        return True

    def reclone(self, host: Host, leader: str) -> bool:
        """reinit: the data directory moved aside (its WAL leaves the cluster), then a clone."""
        pg = host.pg
        if pg is None or pg.role is not SimRole.STOPPED:
            return False
        pg.truncate(0)
        pg.role = SimRole.ABSENT
        self.log(f"{host.name} data directory moved aside for a rebuild from {leader}")
        return self.clone(host, leader)

    def rewind(self, host: Host, leader: str) -> bool:
        """pg_rewind against the upstream as it is now: keep the common prefix."""
        pg, up = host.pg, self.hosts[leader].pg
        if pg is None or pg.role is not SimRole.STOPPED or up is None or not up.running:
            return False
        if not self.net.connected(leader, host.name):
            return False
        keep = pg.common_prefix(up)
        if keep < pg.lsn:
            self.log(f"{host.name} rewound from {pg.lsn} to {keep} toward {leader} ({up.role.value})")
            pg.truncate(keep)
        return True

    # ------------------------------------------------------- replication/clients

    def start(self) -> None:
        for host in self.hosts.values():
            self.start_supervisor(host.name)
        self.at(self.now + REPLICATION_STEP_S, self._replication_step)
        self.at(self.now + CLIENT_WRITE_INTERVAL_S, self._client_step)

    def _replication_step(self) -> None:
        for host in self.hosts.values():
            pg = host.pg
            if pg is None or pg.role is not SimRole.STANDBY or pg.upstream is None:
                continue
            up = self.hosts[pg.upstream].pg
            if up is None or up.role not in (SimRole.PRIMARY, SimRole.STOPPING, SimRole.STANDBY):
                continue
            if not self.net.connected(pg.upstream, host.name) or not pg.compatible_with(up):
                continue
            if self.now < pg.replication_stalled_until:
                continue
            for e in up.wal[pg.lsn : pg.lsn + 50]:
                pg.append(e)
            if up.role is not SimRole.STANDBY and self.net.connected(host.name, pg.upstream):
                up.flush_acks[host.name] = pg.lsn
                self._ack_pending(self.hosts[pg.upstream])
        self.at(self.now + REPLICATION_STEP_S, self._replication_step)

    def _ack_pending(self, host: Host) -> None:
        pg = host.pg
        assert pg is not None
        while pg.pending and pg.acked_by_sync(pg.pending[0][0]):
            lsn, wid = pg.pending.pop(0)
            self._check_lease_fence(host)
            self.acked[wid] = (host.name, lsn)
            self.ack_times.append(self.now)
            self.ack_primaries.append(host.name)

    def _client_step(self) -> None:
        # Clients write to every server that accepts writes: the worst case of
        # clients on both sides of a partition.
        for host in self.hosts.values():
            pg = host.pg
            if pg is None or not pg.writable:
                continue
            self._check_lease_fence(host)
            wid = self.next_write_id
            self.next_write_id += 1
            pg.append(WalEntry(pg.timeline, f"w{wid}", wid))
            pg.pending.append((pg.lsn, wid))
            self._ack_pending(host)
        self.at(self.now + CLIENT_WRITE_INTERVAL_S, self._client_step)

    # ------------------------------------------------------------ invariants

    def _check_lease_fence(self, host: Host) -> None:
        if not self.check_lease_fence:
            return
        deadline = host.watchdog_deadline
        if deadline is None or host.local(self.now) >= deadline:
            self.fail("fenced-primary-accepts-nothing", f"{host.name} accepted a write without a live lease")

    def _check_invariants(self) -> None:
        writable = vips = 0
        for host in self._host_list:
            pg = host.pg
            if pg is not None and pg.role is SimRole.PRIMARY:
                writable += 1
            if host.vip:
                vips += 1
            supervisor = host.supervisor
            if supervisor is not None and supervisor.node.ctx.role is Role.LEADER:
                term = supervisor.node.ctx.term
                existing = self.leaders.get(term)
                if existing is None:
                    self.leaders[term] = host.name
                    self.log(f"{host.name} became leader term={term}")
                elif existing != host.name:
                    self.fail("one-leader-per-term", f"term {term}: {existing} and {host.name}")
        if writable > 1:
            names = [h.name for h in self._host_list if h.pg is not None and h.pg.writable]
            self.fail("one-writable-primary", f"{names} accept writes at the same time")
        if vips > 1:
            self.fail("one-vip-holder", f"{[h.name for h in self._host_list if h.vip]} hold the VIP")

    def check_final(self) -> None:
        primary = self.writable_primary()
        if primary is None or not self.quorum_mode:
            return
        pg = self.hosts[primary].pg
        assert pg is not None
        missing = [w for w in self.acked if w not in pg.write_ids]
        if missing:
            self.fail("no-lost-acked-write", f"final primary {primary} lacks acked writes {missing[:5]}")

    def writable_primary(self) -> str | None:
        for h in self.hosts.values():
            if h.pg is not None and h.pg.writable:
                return h.name
        return None

    def stable_primary(self) -> str | None:
        """The writable primary whose supervisor leads and has seen it writable."""
        primary = self.writable_primary()
        if primary is None:
            return None
        node = self.hosts[primary].node
        lead = None if node is None else node.lead
        return primary if lead is not None and lead.primary_ready else None


def _subclasses(cls: type[ev.Event]) -> list[type[ev.Event]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


CORE_EVENTS = frozenset(cls.NAME for cls in _subclasses(ev.Event))
