"""The simulated cluster: real `failoverd.core.Node`s on simulated hosts.

Only the network, disks, clocks, PostgreSQL and the fencing watchdog are
simulated. Everything runs from one `random.Random(seed)`, events are ordered
by (real time, sequence number), and no wall clock is read, so a seed replays
exactly. Invariants are checked after every event; the first violation stops
the run with a message and the tail of the trace.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import random
from collections.abc import Callable

from failoverd.core import actions as act
from failoverd.core.messages import decode_message, encode_message
from failoverd.core.follow import FollowFacts, FollowStep, plan_follow
from failoverd.core.node import InvariantViolation, Node, Role
from failoverd.core.spec import ClusterSpec, ReplicationMode
from failoverd.core.state import PersistentState, PgRole
from failoverd.sim.network import SimNetwork
from failoverd.sim.postgres import SimPostgres, SimRole, WalEntry

PROMOTE_S = 0.15
ASK_UPSTREAM_S = 0.003  # connect to the upstream and ask it, besides the network's round trip
CLONE_S = 0.3
RETARGET_S = 0.02
FOLLOW_STOP_S = (0.05, 0.3)  # a standby's fast stop before it is compared and rewound
REWIND_S = (0.1, 0.5)
SLOW_PG_EXTRA_S = (0.2, 2.0)
FAST_STOP_S = 0.1
START_S = 0.2
PROBE_INTERVAL_S = 0.1
REPLICATION_STEP_S = 0.01
CLIENT_WRITE_INTERVAL_S = 0.02
TRACE_LINES = 60
MAX_EVENTS_AT_ONE_INSTANT = 10_000


class Violation(Exception):
    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@dataclasses.dataclass
class Host:
    name: str
    is_data: bool
    clock_rate: float
    clock_offset: float
    disk: PersistentState = dataclasses.field(default_factory=PersistentState)
    node: Node | None = None  # None while the supervisor is down
    frozen: bool = False
    inbox: list = dataclasses.field(default_factory=list)  # messages that arrived while frozen
    pg: SimPostgres | None = None
    watchdog_deadline: float | None = None  # local time; None = disarmed
    vip: bool = False
    tick_at: float | None = None
    incarnation: int = 0

    def local(self, real: float) -> float:
        return self.clock_offset + self.clock_rate * real

    def real(self, local: float) -> float:
        return (local - self.clock_offset) / self.clock_rate

    @property
    def alive(self) -> bool:
        return self.node is not None and not self.frozen


class SimCluster:
    def __init__(self, spec: ClusterSpec, seed: int, disabled_safeguards: frozenset[str] = frozenset()) -> None:
        self.spec = spec
        self.seed = seed
        self.rng = random.Random(seed)
        self.disabled = disabled_safeguards
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
            )
            if m.is_data:
                host.pg = SimPostgres(m.name)
            self.hosts[m.name] = host
        self.leaders: dict[int, str] = {}
        self.acked: dict[int, tuple[str, int]] = {}  # write id -> (primary, lsn)
        self.ack_times: list[float] = []
        self.ack_primaries: list[str] = []
        self.next_write_id = 1
        self.trace: collections.deque[str] = collections.deque(maxlen=TRACE_LINES)
        self.check_lease_fence = "lease" not in disabled_safeguards
        self.quorum_mode = spec.replication.mode is ReplicationMode.QUORUM
        self.violation: Violation | None = None
        self.events = 0
        self._same_instant = 0

    # ------------------------------------------------------------ event loop

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, fn))

    def run_until(self, end: float) -> None:
        while self._queue and self._queue[0][0] <= end and self.violation is None:
            when, _, fn = heapq.heappop(self._queue)
            if when == self.now:
                self._same_instant += 1
                if self._same_instant > MAX_EVENTS_AT_ONE_INSTANT:
                    self._fail("progress", f"more than {MAX_EVENTS_AT_ONE_INSTANT} events at t={when}: a busy loop")
                    break
            else:
                self._same_instant = 0
            self.now = when
            self.events += 1
            try:
                fn()
                self._check_invariants()
            except InvariantViolation as exc:
                self._fail("core-invariant", str(exc))
            except Violation as exc:
                self.violation = exc
        if self.violation is None:
            self.now = max(self.now, end)

    def _fail(self, invariant: str, detail: str) -> None:
        self.violation = Violation(invariant, detail)

    def log(self, text: str) -> None:
        self.trace.append(f"{self.now:9.3f} {text}")

    def start(self) -> None:
        for host in self.hosts.values():
            self.start_supervisor(host.name)
        self.at(self.now + REPLICATION_STEP_S, self._replication_step)
        self.at(self.now + CLIENT_WRITE_INTERVAL_S, self._client_step)
        for host in self.hosts.values():
            if host.pg is not None:
                self.at(self.now + self.rng.uniform(0, PROBE_INTERVAL_S), lambda h=host: self.probe_loop(h))

    # --------------------------------------------------------- supervisors

    def start_supervisor(self, name: str) -> None:
        host = self.hosts[name]
        if host.node is not None:
            return
        host.incarnation += 1
        host.frozen = False
        host.inbox.clear()
        rng = random.Random(self.rng.getrandbits(64))
        host.node = Node(self.spec, name, host.disk, host.local(self.now), rng, self.disabled)
        self.log(f"{name} supervisor started term={host.disk.term}")
        pg = host.pg
        if pg is not None and pg.role is SimRole.STOPPED:
            # Start-up policy of the real adapter: an existing data directory
            # always starts as a standby; only a leader promotes.
            self._pg_later(host, START_S, self._finish_start_standby)
        if pg is not None:
            self._probe(host)
        self._schedule_tick(host)

    def kill_supervisor(self, name: str) -> None:
        host = self.hosts[name]
        if host.node is None:
            return
        host.node = None
        host.frozen = False
        host.inbox.clear()
        host.tick_at = None
        self.log(f"{name} supervisor killed")
        if host.watchdog_deadline is not None:
            self._watchdog_fence(host, "supervisor pipe closed")

    def freeze(self, name: str) -> None:
        host = self.hosts[name]
        if host.node is not None and not host.frozen:
            host.frozen = True
            self.log(f"{name} supervisor frozen")

    def thaw(self, name: str) -> None:
        host = self.hosts[name]
        if host.node is None or not host.frozen:
            return
        host.frozen = False
        self.log(f"{name} supervisor thawed with {len(host.inbox)} queued messages")
        queued, host.inbox = host.inbox, []
        jobs: list[Callable[[], None]] = [lambda: self._tick(host, host.incarnation, force=True)]
        jobs += [lambda m=m: self._deliver(host, m, host.incarnation) for m in queued]
        self.rng.shuffle(jobs)
        for job in jobs:
            self.at(self.now, job)
        if host.pg is not None:
            self.at(self.now, lambda: self._probe(host))

    def _call(self, host: Host, fn: Callable[[Node], list]) -> None:
        node = host.node
        before = node.role
        actions = fn(node)
        self._execute(host, actions)
        if node.role is Role.LEADER and before is not Role.LEADER:
            existing = self.leaders.get(node.term)
            if existing is not None and existing != host.name:
                raise Violation("one-leader-per-term", f"term {node.term}: {existing} and {host.name}")
            self.leaders[node.term] = host.name
            self.log(f"{host.name} became leader term={node.term}")
        self._schedule_tick(host)

    def _schedule_tick(self, host: Host) -> None:
        if host.node is None:
            return
        # The epsilon keeps local->real->local rounding from landing a tick a
        # hair before the deadline, which would reschedule it forever.
        wake = host.real(host.node.next_wakeup()) + 1e-6
        wake = min(max(wake, self.now), self.now + 0.5)
        if host.tick_at is not None and self.now <= host.tick_at <= wake:
            return
        host.tick_at = wake
        inc = host.incarnation
        self.at(wake, lambda: self._tick(host, inc, scheduled=wake))

    def _tick(self, host: Host, incarnation: int, scheduled: float | None = None, force: bool = False) -> None:
        if host.incarnation != incarnation or host.node is None:
            return
        if not force and scheduled != host.tick_at:
            return
        host.tick_at = None
        if host.frozen:
            return
        self._call(host, lambda n: n.tick(host.local(self.now)))

    def _probe(self, host: Host) -> None:
        if not host.alive or host.pg is None:
            return
        pg = host.pg
        following = None
        if pg.role is SimRole.STANDBY and pg.upstream is not None:
            up = self.hosts[pg.upstream].pg
            if up is not None and up.running and pg.compatible_with(up):
                following = pg.upstream
        obs = pg.observation(host.local(self.now), following, hung=self.now < pg.probe_hung_until)
        self._call(host, lambda n: n.observe(obs, host.local(self.now)))

    def probe_loop(self, host: Host) -> None:
        self._probe(host)
        self.at(self.now + PROBE_INTERVAL_S / host.clock_rate, lambda: self.probe_loop(host))

    def _deliver(self, host: Host, wire: dict, incarnation: int) -> None:
        if host.node is None or host.incarnation != incarnation:
            return
        if host.frozen:
            host.inbox.append(wire)
            return
        msg = decode_message(wire)
        self._call(host, lambda n: n.receive(msg, host.local(self.now)))

    # --------------------------------------------------------------- actions

    def _execute(self, host: Host, actions: list) -> None:
        for a in actions:
            if isinstance(a, act.Persist):
                host.disk = a.state
            elif isinstance(a, act.Send):
                wire = encode_message(a.message)
                for delay in self.net.deliveries(host.name, a.to):
                    dst = self.hosts[a.to]
                    inc = dst.incarnation
                    self.at(self.now + delay, lambda d=dst, w=wire, i=inc: self._deliver(d, w, i))
            elif isinstance(a, act.ArmWatchdog):
                self._arm_watchdog(host, a.deadline)
            elif isinstance(a, act.Fence):
                self._fence(host, a.reason)
            elif isinstance(a, act.ReleaseVip):
                host.vip = False
            elif isinstance(a, act.PrepareVip):
                pass  # the model has no duplicate address detection to start early
            elif isinstance(a, act.AcquireVip):
                host.vip = True
                self.log(f"{host.name} acquired VIP")
            elif isinstance(a, act.Demote):
                self._demote(host)
            elif isinstance(a, act.ConfigureSync):
                host.pg.sync_count = a.sync_count
                host.pg.sync_names = a.standbys
            elif isinstance(a, act.Promote):
                stops = host.pg.stops
                self._pg_later(host, PROMOTE_S, lambda h, n=stops: self._finish_promote(h, n))
            elif isinstance(a, act.Follow):
                leader = a.leader
                self._ask_upstream(host, leader)
            elif isinstance(a, act.StartStandby):
                self._pg_later(host, START_S, self._finish_start_standby)
            elif isinstance(a, act.ProbeNow):
                self.at(self.now + 0.002, lambda h=host: self._probe(h))
            elif isinstance(a, act.Emit):
                self.log(f"{host.name} {a.event.describe()}")

    def _arm_watchdog(self, host: Host, deadline: float | None) -> None:
        host.watchdog_deadline = deadline
        if deadline is None:
            return
        inc = host.incarnation

        def expire() -> None:
            if host.watchdog_deadline == deadline and host.incarnation == inc:
                self._watchdog_fence(host, "lease deadline passed")

        self.at(host.real(deadline), expire)

    def _watchdog_fence(self, host: Host, reason: str) -> None:
        host.vip = False
        if host.pg is not None and host.pg.running:
            self.log(f"{host.name} watchdog fenced PostgreSQL: {reason}")
            host.pg.stop()

    def _fence(self, host: Host, reason: str) -> None:
        host.vip = False
        if host.pg is not None and host.pg.running:
            self.log(f"{host.name} fenced PostgreSQL: {reason}")
            host.pg.stop()

    def _demote(self, host: Host) -> None:
        pg = host.pg
        if pg.role is not SimRole.PRIMARY:
            return
        pg.role = SimRole.STOPPING

        def done() -> None:
            if pg.role is SimRole.STOPPING:
                for other in self.hosts.values():  # fast shutdown sends all WAL to connected standbys
                    spg = other.pg
                    if spg is not None and spg.role is SimRole.STANDBY and spg.upstream == host.name:
                        if self.net.connected(host.name, other.name) and spg.compatible_with(pg):
                            for e in pg.wal[spg.lsn:]:
                                spg.append(e)
                pg.stop()
                self._probe(host)

        self.at(self.now + FAST_STOP_S, done)

    def _pg_later(self, host: Host, delay: float, fn: Callable[[Host], None]) -> None:
        inc = host.incarnation
        if host.pg is not None and self.now < host.pg.slow_until:
            delay += self.rng.uniform(*SLOW_PG_EXTRA_S)  # a slow disk or a busy server: every step drags

        def run() -> None:
            fn(host)
            if host.incarnation == inc and host.alive:
                self._probe(host)

        self.at(self.now + delay, run)

    def _finish_start_standby(self, host: Host) -> None:
        if host.pg.role is SimRole.STOPPED:
            host.pg.role = SimRole.STANDBY

    def _finish_promote(self, host: Host, stops: int) -> None:
        # Like `pg_promote()`, this completes whatever the supervisor does
        # meanwhile; only a stop of the server (a fence) voids it.
        pg = host.pg
        if pg.stops != stops:
            return
        if pg.role is SimRole.ABSENT:
            pg.append(WalEntry(1, f"initdb-{host.name}"))
        elif pg.role is SimRole.STANDBY:
            tl = max((p.pg.timeline for p in self.hosts.values() if p.pg is not None), default=1) + 1
            pg.append(WalEntry(tl, f"promote-{host.name}-{tl}-{self.events}"))
        else:
            return
        pg.role = SimRole.PRIMARY
        pg.upstream = None
        pg.flush_acks.clear()
        self.log(f"{host.name} PostgreSQL promoted at {pg.position()}")
        if self.quorum_mode:
            missing = [w for w in self.acked if w not in pg.write_ids]
            if missing:
                raise Violation("no-lost-acked-write", f"{host.name} promoted without acked writes {missing[:5]}")

    def _ask_upstream(self, host: Host, leader: str) -> None:
        delay = self.net.round_trip(host.name, leader)
        if delay is not None:  # else the connection attempt fails and the Follow with it
            self._pg_later(host, ASK_UPSTREAM_S + delay, lambda h: self._follow_step(h, leader))

    def _follow_step(self, host: Host, leader: str) -> None:
        """One step of a Follow, as the real adapter takes it (failoverd.core.follow):
        read our role, then ask the upstream, then act; after a stop, ask again.
        An upstream that cannot be reached fails the Follow, changing nothing."""
        pg = host.pg
        up_host = self.hosts[leader]
        up = up_host.pg
        if pg.role is SimRole.PRIMARY or pg.role is SimRole.STOPPING:
            return  # fenced or promoted meanwhile: the core decides again
        reachable = (up is not None and up.running and self.net.connected(host.name, leader)
                     and self.net.connected(leader, host.name))
        if not reachable:
            return
        local = {SimRole.ABSENT: PgRole.ABSENT, SimRole.STOPPED: PgRole.STOPPED, SimRole.STANDBY: PgRole.STANDBY}[pg.role]
        prefix = pg.compatible_with(up)
        step, _ = plan_follow(FollowFacts(local, up.role is not SimRole.PRIMARY, prefix), self.disabled)
        if step is FollowStep.CLONE:
            self._pg_later(host, CLONE_S, lambda h: self._clone(h, leader))
        elif step is FollowStep.CASCADE:
            if pg.lsn > up.lsn:
                return  # our WAL goes further than the standby's: refused, nothing discarded
            self._stream_from(host, leader, START_S if pg.role is SimRole.STOPPED else RETARGET_S)
        elif step is FollowStep.RETARGET:
            self._stream_from(host, leader, RETARGET_S)
        elif step is FollowStep.START:
            self._stream_from(host, leader, START_S)
        elif step is FollowStep.STOP:
            pg.stop()
            self._pg_later(host, self.rng.uniform(*FOLLOW_STOP_S), lambda h: self._ask_upstream(h, leader))
        elif step is FollowStep.REWIND:
            self._pg_later(host, self.rng.uniform(*REWIND_S), lambda h: self._rewind(h, leader))

    def _stream_from(self, host: Host, leader: str, delay: float) -> None:
        def done(h: Host) -> None:
            pg = h.pg
            if pg.role in (SimRole.STOPPED, SimRole.STANDBY):
                pg.upstream = leader
                pg.flush_acks.clear()
                pg.role = SimRole.STANDBY
        self._pg_later(host, delay, done)

    def _clone(self, host: Host, leader: str) -> None:
        pg, up = host.pg, self.hosts[leader].pg
        if pg.role is not SimRole.ABSENT or up is None or not up.running or not self.net.connected(leader, host.name):
            return
        for e in up.wal:
            pg.append(e)  # pg_basebackup
        pg.upstream = leader
        pg.role = SimRole.STANDBY

    def _rewind(self, host: Host, leader: str) -> None:
        """pg_rewind against the upstream as it is now: keep the common prefix."""
        pg, up = host.pg, self.hosts[leader].pg
        if pg.role is not SimRole.STOPPED or up is None or not up.running or not self.net.connected(leader, host.name):
            return  # the rewind fails; the server stays stopped with its WAL
        keep = pg.common_prefix(up)
        if keep < pg.lsn:
            self.log(f"{host.name} rewound from {pg.lsn} to {keep} to follow {leader} ({up.role.value})")
            pg.truncate(keep)
        self._stream_from(host, leader, START_S)

    # ------------------------------------------------------- replication/clients

    def _replication_step(self) -> None:
        for host in self.hosts.values():
            pg = host.pg
            if pg is None or pg.role is not SimRole.STANDBY or pg.upstream is None:
                continue
            up = self.hosts[pg.upstream].pg
            if up is None or up.role not in (SimRole.PRIMARY, SimRole.STOPPING):
                continue
            if not self.net.connected(pg.upstream, host.name) or not pg.compatible_with(up):
                continue
            if self.now < pg.replication_stalled_until:
                continue
            for e in up.wal[pg.lsn: pg.lsn + 50]:
                pg.append(e)
            if self.net.connected(host.name, pg.upstream):
                up.flush_acks[host.name] = pg.lsn
                self._ack_pending(self.hosts[pg.upstream])
        self.at(self.now + REPLICATION_STEP_S, self._replication_step)

    def _ack_pending(self, host: Host) -> None:
        pg = host.pg
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
            raise Violation("fenced-primary-accepts-nothing", f"{host.name} accepted a write without a live lease")

    def _check_invariants(self) -> None:
        writable = [h.name for h in self.hosts.values() if h.pg is not None and h.pg.writable]
        if len(writable) > 1:
            raise Violation("one-writable-primary", f"{writable} accept writes at the same time")
        vips = [h.name for h in self.hosts.values() if h.vip]
        if len(vips) > 1:
            raise Violation("one-vip-holder", f"{vips} hold the VIP")

    def check_final(self) -> None:
        primary = self.writable_primary()
        if primary is None or not self.quorum_mode:
            return
        missing = [w for w in self.acked if w not in self.hosts[primary].pg.write_ids]
        if missing:
            raise Violation("no-lost-acked-write", f"final primary {primary} lacks acked writes {missing[:5]}")

    def writable_primary(self) -> str | None:
        for h in self.hosts.values():
            if h.pg is not None and h.pg.writable:
                return h.name
        return None
