"""Runs seeds: a safety phase with random faults, then a liveness phase.

Safety phase: from empty data directories the cluster bootstraps, then a
seeded schedule injects crashes, restarts, freezes, partitions (symmetric,
asymmetric, supervisor-port only), lossy/slow links, postmaster kills,
stalled replication, hung probes and planned switchovers; invariants are checked after
every event. Liveness phase: everything heals and a writable primary that
acknowledges writes must appear within `LIVENESS_BOUND_S`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import statistics

from failoverd.core.requests import Failover, Switchover
from failoverd.core.spec import ClusterSpec, Member, MemberKind, Replication, ReplicationMode, Timing
from failoverd.sim.world import Violation, World

SAFETY_S = 30.0
LIVENESS_BOUND_S = 15.0
FAULT_GAP_S = (0.3, 2.5)


@dataclasses.dataclass(frozen=True)
class SeedResult:
    seed: int
    violation: str | None
    trace: tuple[str, ...]
    failover_gaps_s: tuple[float, ...]
    recovered_after_s: float | None
    events: int

    @property
    def ok(self) -> bool:
        return self.violation is None


# The default timing, but a leader asks for a shorter promise after 2 s of
# quick acknowledgements rather than 10: within a 30 s seed, promises then
# shrink and grow again many times, around every kind of fault.
SIM_TIMING = Timing(promise_window_s=2.0)


def preset_spec(
    data_nodes: int = 3,
    witness: bool = False,
    sync_count: int = 1,
    timing: Timing | None = None,
    mode: ReplicationMode = ReplicationMode.QUORUM,
) -> ClusterSpec:
    members = [Member(f"db{i + 1}") for i in range(data_nodes)]
    if witness:
        members.append(Member("witness", kind=MemberKind.WITNESS))
    replication = Replication(mode=mode, sync_count=sync_count if mode is ReplicationMode.QUORUM else 0)
    return ClusterSpec(name="sim", members=tuple(members), timing=timing or SIM_TIMING, replication=replication)


# The cluster shapes every protocol change is run against (make simulate-long,
# and a slice of each in make test): name -> preset_spec arguments.
SHAPES: dict[str, dict] = {
    "3-data": dict(data_nodes=3, sync_count=1),
    "3-data-k2": dict(data_nodes=3, sync_count=2),
    "5-data": dict(data_nodes=5, sync_count=1),
    "5-data-k2": dict(data_nodes=5, sync_count=2),
    "2-data-witness": dict(data_nodes=2, witness=True, sync_count=1),
}


FAULT_KINDS = (
    "kill_postmaster",
    "kill_supervisor",
    "quick_restart",
    "freeze",
    "isolate",
    "isolate_inbound",
    "cut_pair",
    "cut_peer_only",
    "lossy",
    "stall_replication",
    "host_crash",
    "switchover",
    "pg_hang",
    "operator_failover",
    "slow_pg",
)
# Swarm testing (Groce et al., ISSTA 2012): each seed draws its own mix of
# faults, every kind left out of some seeds and weighted up in others, so
# that runs concentrate on rarer combinations (a slow PostgreSQL during
# switchovers and postmaster kills, say) instead of averaging them all out.
SWARM_WEIGHTS = (0, 1, 1, 3)


class FaultInjector:
    """Draws one fault at a time from the cluster's seeded RNG and schedules its healing."""

    def __init__(self, sim: World) -> None:
        self.sim = sim
        self.rng = sim.rng
        self.request_id = 0
        weights = [self.rng.choice(SWARM_WEIGHTS) for _ in FAULT_KINDS]
        if sum(1 for w in weights if w) < 2:
            weights = [1] * len(FAULT_KINDS)
        self.weights = weights
        sim.log("faults " + " ".join(f"{k}={w}" for k, w in zip(FAULT_KINDS, weights) if w))

    def leader(self) -> str | None:
        for h in self.sim.hosts.values():
            node = h.node
            if node is not None and node.lead is not None:
                return h.name
        return None

    def leader_or_random(self) -> str:
        leader = self.leader()
        if leader is not None and self.rng.random() < 0.7:
            return leader
        return self.rng.choice(list(self.sim.hosts))

    def inject(self) -> None:
        sim, rng = self.sim, self.rng
        now = sim.now
        target = self.leader_or_random()
        host = sim.hosts[target]
        kind = rng.choices(FAULT_KINDS, self.weights)[0]
        sim.log(f"FAULT {kind} {target}")
        heal_after = rng.uniform(0.2, 4.0)
        if kind == "kill_postmaster" and host.pg is not None and host.pg.running:
            sim.stop_server(host, "postmaster killed")
        elif kind == "kill_supervisor":
            sim.kill_supervisor(target)
            sim.at(now + heal_after, lambda: sim.start_supervisor(target))
        elif kind == "quick_restart":
            sim.kill_supervisor(target)
            sim.at(now + rng.uniform(0.001, 0.3), lambda: sim.start_supervisor(target))
        elif kind == "freeze":
            sim.freeze(target)
            sim.at(now + heal_after, lambda: sim.thaw(target))
        elif kind == "isolate":
            sim.net.isolate(target)
            sim.at(now + heal_after, sim.net.heal)
        elif kind == "isolate_inbound":
            sim.net.isolate_inbound(target)
            sim.at(now + heal_after, sim.net.heal)
        elif kind in ("cut_pair", "cut_peer_only"):
            other = rng.choice([n for n in sim.hosts if n != target])
            (sim.net.cut_pair if kind == "cut_pair" else sim.net.cut_peer_only)(target, other)
            sim.at(now + heal_after, sim.net.heal)
        elif kind == "lossy":
            p = sim.net.profile
            p.loss = rng.uniform(0, 0.3)
            p.duplicate = rng.uniform(0, 0.1)
            p.spike = rng.uniform(0, 0.2)
            p.delay_max_s = rng.uniform(0.005, 0.15)
            sim.at(now + heal_after, sim.net.heal)
        elif kind == "stall_replication" and host.pg is not None:
            host.pg.replication_stalled_until = now + heal_after
        elif kind == "slow_pg" and host.pg is not None:
            host.slow_until = now + heal_after
        elif kind == "pg_hang" and host.pg is not None:
            host.pg.probe_hung_until = now + rng.uniform(0.2, 5.0)
            host.pg.probe_says_stalled = rng.random() < 0.5
        elif kind == "host_crash":
            sim.kill_supervisor(target)
            sim.stop_server(host, "host crashed")
            host.vip = False
            sim.at(now + heal_after, lambda: sim.start_supervisor(target))
        elif kind == "switchover":
            self.request_id += 1
            sim.request(target, Switchover(self.request_id, None))
        elif kind == "operator_failover":
            # Without allow_data_loss: an operator's choice of target must
            # keep every safety property. Sent to the leader when there is
            # one, else to the target itself; the core redirects as the API
            # would (here: the request simply ends).
            self.request_id += 1
            chosen = rng.choice([m.name for m in sim.spec.data_members])
            sim.request(self.leader() or chosen, Failover(self.request_id, chosen))

    def heal_all(self) -> None:
        sim = self.sim
        sim.net.heal()
        for name, host in sim.hosts.items():
            host.slow_until = 0.0
            if host.pg is not None:
                host.pg.replication_stalled_until = 0.0
                host.pg.probe_hung_until = 0.0
            if host.supervisor is None:
                sim.start_supervisor(name)
            elif host.frozen:
                sim.thaw(name)


def run_seed(
    spec: ClusterSpec,
    seed: int,
    disabled: frozenset[str] = frozenset(),
    safety_s: float = SAFETY_S,
    keep_trace: bool = True,
) -> SeedResult:
    sim = World(spec, seed, disabled)
    faults = FaultInjector(sim)
    sim.start()
    t = 3.0  # let the cluster bootstrap before the first fault
    while t < safety_s:
        sim.at(t, faults.inject)
        t += sim.rng.uniform(*FAULT_GAP_S)
    sim.run_until(safety_s)
    recovered = None
    if sim.violation is None:
        sim.at(sim.now, faults.heal_all)
        start = sim.now
        acks_before = len(sim.ack_times)
        step = 0.1
        while sim.violation is None and sim.now < start + LIVENESS_BOUND_S:
            sim.run_until(sim.now + step)
            if len(sim.ack_times) > acks_before and sim.ack_times[-1] > start + 0.5 and sim.stable_primary():
                recovered = sim.now - start
                break
        if sim.violation is None and recovered is None:
            sim.violation = Violation(
                "liveness", f"no writable primary acknowledging writes within {LIVENESS_BOUND_S} s of healing"
            )
        if sim.violation is None:
            try:
                sim.check_final()
            except Violation as exc:
                sim.violation = exc
    sim.shutdown()
    return SeedResult(
        seed=seed,
        violation=None if sim.violation is None else str(sim.violation),
        trace=sim.trace_lines() if keep_trace or sim.violation is not None else (),
        failover_gaps_s=_failover_gaps(sim),
        recovered_after_s=recovered,
        events=sim.steps,
    )


def _failover_gaps(sim: World) -> tuple[float, ...]:
    """Write unavailability around each change of primary: last ack on the old one to first ack on the new."""
    gaps = []
    for i in range(1, len(sim.ack_times)):
        if sim.ack_primaries[i] != sim.ack_primaries[i - 1]:
            gaps.append(sim.ack_times[i] - sim.ack_times[i - 1])
    return tuple(gaps)


def _run_one(args: tuple) -> SeedResult:
    spec, seed, disabled, keep_trace = args
    return run_seed(spec, seed, disabled, keep_trace=keep_trace)


def run_seeds(
    spec: ClusterSpec,
    seeds: list[int],
    disabled: frozenset[str] = frozenset(),
    workers: int | None = None,
    stop_on_violation: bool = False,
    keep_traces: bool = True,
) -> list[SeedResult]:
    """Run seeds, sharded over `workers` processes (default: every core).
    Without `keep_traces` only a violating seed keeps its trace, so that a
    sweep of 100,000 seeds does not hold 100,000 traces."""
    workers = workers or max(1, min(len(seeds), os.cpu_count() or 1))
    jobs = [(spec, s, disabled, keep_traces) for s in seeds]
    if workers == 1:
        results = []
        for job in jobs:
            results.append(_run_one(job))
            if stop_on_violation and not results[-1].ok:
                break
        return results
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))


@dataclasses.dataclass(frozen=True)
class Summary:
    seeds: int
    violations: int
    failovers: int
    failover_median_s: float | None
    failover_max_s: float | None
    recovery_max_s: float | None
    first_violation: SeedResult | None
    violating_seeds: tuple[int, ...] = ()


def summarize(results: list[SeedResult]) -> Summary:
    gaps = [g for r in results for g in r.failover_gaps_s]
    recoveries = [r.recovered_after_s for r in results if r.recovered_after_s is not None]
    bad = [r for r in results if not r.ok]
    return Summary(
        seeds=len(results),
        violations=len(bad),
        failovers=len(gaps),
        failover_median_s=statistics.median(gaps) if gaps else None,
        failover_max_s=max(gaps) if gaps else None,
        recovery_max_s=max(recoveries) if recoveries else None,
        first_violation=bad[0] if bad else None,
        violating_seeds=tuple(r.seed for r in bad),
    )
