#!/usr/bin/env python3
"""Planned switchover benchmark on real PostgreSQL (issue #5).

    .venv/bin/python bench/switchover.py [--runs 6] [--interval-ms 15] [--json bench/results/switchover.json]

Builds a fresh three-member cluster on 127.0.0.1 (three `failoverd run`
supervisors, default timing, quorum ANY 1; tests/support/cluster.py)
and runs `failoverctl switchover --to NODE --force` (the installed CLI) --runs
times, each to the next member after the current primary, so the targets
alternate and every member is primary in turn.

The writer is failoverd.ctl.drill.ProbeWriter, the drill's probe client: one
INSERT at a time, then a pause of --interval-ms (a light load), through a
libpq-style multi-host connection with target_session_attrs=read-write over
the members' Unix sockets, as an application following the primary with a
multi-host DSN would (no VIP on loopback). After an error it reconnects
every --retry-ms (50 ms); a connection attempt skips servers that are stopped
or in recovery, but starts a backend on each standby it tries: at 10 ms
(about 200 backends a second) the client itself slowed the switchover on the
2-core machine this was measured on (see docs/api.md). Each acknowledged row
records which server (cluster_name) acknowledged it.

Per switchover it measures:

* the write pause: from the last row acknowledged by the old primary to the
  first acknowledged by the new one (client clock);
* lost acknowledged writes: acknowledged ids missing on the new primary
  (must be 0), and two-primaries samples (every 50 ms over the sockets);
* the phases, from the supervisors' JSON logs (wall clock, same host),
  relative to the request reaching the leader: checkpoint done, demote
  requested, old primary stopped, target caught up, TimeoutNow sent,
  elected, promote requested, promoted (pg_promote returned, and the core's
  probe seeing it), VIP acquired (the core's decision; no address on
  loopback), first standby streaming from the new primary, first write.

Prints median/min/max, writes everything to --json, and exits 1 if a write
was lost, two primaries were seen, or a switchover did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support, the helpers shared with the tests

import asyncpg

from failoverd.ctl.drill import CREATE_TABLE, ProbeWriter, missing_acks
from tests.support.cluster import DualPrimarySampler, LocalCluster
from tests.support.postgres import pg_os_user, require_bin_dir

GOAL_MEDIAN_S = 0.5
# (label, member: "old" or "new" or "other", event, extra condition on the event)
PHASES = [
    ("checkpoint_done", "old", "pg_action_done", lambda e: e.get("action") == "Checkpoint"),
    ("demote_requested", "old", "switchover_started", None),
    ("old_stopped", "old", "pg_stopped", lambda e: e.get("mode") == "fast"),
    ("caught_up", "old", "switchover_caught_up", None),
    ("timeout_now_sent", "old", "role_changed", lambda e: e.get("previous") == "leader"),
    ("elected", "new", "role_changed", lambda e: e.get("role") == "leader"),
    ("promote_requested", "new", "promote", None),
    ("pg_promoted", "new", "pg_promoted", None),
    ("promoted", "new", "promoted", None),
    ("vip_acquired", "new", "vip_acquired", None),
    ("standby_streaming", "other", ("pg_retargeted", "pg_started"), None),
]
PHASE_ORDER = ["request_received"] + [p[0] for p in PHASES] + ["last_old_write", "first_write"]


def parse_ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def phase_times(cluster: LocalCluster, old: str, new: str, since_wall: float, until_wall: float) -> dict:
    """Wall times of the phases, from the supervisors' logs."""
    logs = {
        name: [e for e in sup.log_events() if "timestamp" in e and since_wall <= parse_ts(e["timestamp"]) <= until_wall]
        for name, sup in cluster.supervisors.items()
    }
    out: dict[str, float | None] = {}
    for label, who, event, cond in PHASES:
        names = [old] if who == "old" else [new] if who == "new" else [n for n in logs if n != new]
        events = event if isinstance(event, tuple) else (event,)
        found = [
            parse_ts(e["timestamp"])
            for n in names
            for e in logs[n]
            if e.get("event") in events and (cond is None or cond(e)) and (who != "other" or e.get("upstream") == new)
        ]
        out[label] = min(found) if found else None
    # The leader's core asks for the CHECKPOINT as soon as it accepts the request.
    accepted = next((e for e in logs[old] if e.get("event") == "checkpoint"), None)
    out["request_received"] = None if accepted is None else parse_ts(accepted["timestamp"])
    return out


async def healthy_with_writes(cluster: LocalCluster, writer: ProbeWriter, primary: str, count: int = 30) -> None:
    await cluster.wait_for(f"every standby streaming from {primary}", lambda: cluster.healthy(primary), 90)
    mark = len(writer.acked_by(primary))

    async def flowing() -> bool:
        return len(writer.acked_by(primary)) >= mark + count

    await cluster.wait_for(f"writes acknowledged by {primary}", flowing, 30)


async def one_switchover(cluster: LocalCluster, writer: ProbeWriter, old: str, target: str, index: int) -> dict:
    await healthy_with_writes(cluster, writer, old)
    sent_mono, sent_wall = time.monotonic(), time.time()
    done = await cluster.actl("switchover", "--to", target, "--force", timeout_s=120)
    ctl_s = time.monotonic() - sent_mono
    if done.returncode != 0:
        raise RuntimeError(f"failoverctl switchover: exit {done.returncode}: {done.stdout} {done.stderr}")

    async def new_acks() -> bool:
        return writer.pause_after(old, sent_mono) is not None

    await cluster.wait_for(f"a write acknowledged by {target}", new_acks, 60)
    pause = writer.pause_after(old, sent_mono)
    await healthy_with_writes(cluster, writer, target, count=10)
    phases = phase_times(cluster, old, target, sent_wall - 1, pause.first_new.wall + 5)
    phases["last_old_write"] = pause.last_old.wall
    phases["first_write"] = pause.first_new.wall
    origin = phases["request_received"] or sent_wall
    relative = {k: None if phases.get(k) is None else round(phases[k] - origin, 3) for k in PHASE_ORDER}
    conn = await connect_socket(cluster, target)
    try:
        missing = await missing_acks(conn, writer.run_id, writer.acks)
    finally:
        await conn.close()
    result = {
        "run": index,
        "old_primary": old,
        "new_primary": pause.first_new.server,
        "write_pause_s": round(pause.seconds, 3),
        "lost_acked_writes": len(missing),
        "failoverctl_s": round(ctl_s, 3),
        "request_received_from": "checkpoint event" if phases["request_received"] else "failoverctl start",
        "phases_s": relative,
    }
    print(json.dumps(result), flush=True)
    return result


async def connect_socket(cluster: LocalCluster, name: str) -> asyncpg.Connection:
    adapter = cluster.adapters[name]
    return await asyncpg.connect(
        host=str(adapter.socket_dir), port=adapter.pg.port, user="postgres", database="postgres", timeout=5
    )


async def bench(
    runs: int,
    interval_s: float,
    bin_dir: Path,
    os_user: str,
    owner,
    keep_logs: Path | None = None,
    retry_s: float = 0.05,
) -> tuple[dict, list[dict]]:
    base = Path(tempfile.mkdtemp(prefix="failoverd-swbench-", dir="/tmp"))
    os.chmod(base, 0o755)
    cluster = LocalCluster(base, bin_dir, os_user, owner)
    results: list[dict] = []
    try:
        cluster.start_all()
        primary = await cluster.wait_for("a healthy cluster", cluster.healthy, 120)
        hosts, ports = cluster.dsn_hosts()

        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(
                host=hosts,
                port=ports,
                user="postgres",
                database="postgres",
                target_session_attrs="read-write",
                timeout=2,
            )

        conn = await connect()
        try:
            await conn.execute(CREATE_TABLE)
        finally:
            await conn.close()
        writer = ProbeWriter(connect, run=int(time.time()), interval_s=interval_s, retry_s=retry_s)
        sampler = DualPrimarySampler(cluster)
        sampler.start()
        writer.start()
        try:
            names = list(cluster.data_names)
            for i in range(runs):
                target = names[(names.index(primary) + 1) % len(names)]
                results.append(await one_switchover(cluster, writer, primary, target, i))
                primary = target
        finally:
            await writer.stop()
            await sampler.stop()
        conn = await connect_socket(cluster, primary)
        try:
            missing = await missing_acks(conn, writer.run_id, writer.acks)
        finally:
            await conn.close()
        summary = summarize(results)
        summary.update(
            acked_writes=len(writer.acks),
            lost_acked_writes_final=len(missing),
            writer_errors=writer.errors,
            dual_primary_samples=len(sampler.dual),
            samples=sampler.samples,
        )
        return summary, results
    except Exception:
        print(cluster.logs()[-8000:], file=sys.stderr)
        raise
    finally:
        cluster.cleanup()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for sup in cluster.supervisors.values():
                shutil.copy(sup.log_path, keep_logs / sup.log_path.name)
            for name, adapter in cluster.adapters.items():
                if adapter.logfile.exists():
                    shutil.copy(adapter.logfile, keep_logs / f"{name}.postgresql.log")
        shutil.rmtree(base, ignore_errors=True)


def summarize(results: list[dict]) -> dict:
    pauses = [r["write_pause_s"] for r in results]
    phases = {}
    for key in PHASE_ORDER:
        values = [r["phases_s"][key] for r in results if r["phases_s"].get(key) is not None]
        if values:
            phases[key] = {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}
    return {
        "runs": len(results),
        "write_pause_median_s": round(statistics.median(pauses), 3) if pauses else None,
        "write_pause_min_s": min(pauses, default=None),
        "write_pause_max_s": max(pauses, default=None),
        "lost_acked_writes": sum(r["lost_acked_writes"] for r in results),
        "phases_s": phases,
    }


def report(summary: dict, interval_ms: float) -> None:
    print()
    print(
        f"planned switchover, loopback, 3 data members, default timing, quorum ANY 1, "
        f"one INSERT every {interval_ms:g} ms through a multi-host read-write connection: {summary['runs']} runs"
    )
    print(
        f"  write pause: median {summary['write_pause_median_s']} s, min {summary['write_pause_min_s']} s, "
        f"max {summary['write_pause_max_s']} s"
    )
    met = summary["write_pause_median_s"] is not None and summary["write_pause_median_s"] < GOAL_MEDIAN_S
    print(
        f"  [{'met' if met else 'MISSED'}] goal: median write pause < {GOAL_MEDIAN_S} s "
        f"(load average {summary['loadavg_1min']}, machine shared with other work)"
    )
    print(
        f"  lost acknowledged writes: {summary['lost_acked_writes']} per run, "
        f"{summary['lost_acked_writes_final']} on the final primary (of {summary['acked_writes']}); "
        f"two-primaries samples: {summary['dual_primary_samples']} of {summary['samples']}"
    )
    print("  phases, seconds after the request reached the leader (median, min, max):")
    for key, v in summary["phases_s"].items():
        print(f"    {key:20} {v['median']:7.3f} {v['min']:7.3f} {v['max']:7.3f}")


def main() -> int:
    import structlog

    # The harness probes with the daemon's adapter; its chatter is not the result.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6, help="switchovers (at least 1)")
    parser.add_argument("--interval-ms", type=float, default=15.0, help="pause after each acknowledged INSERT")
    parser.add_argument("--retry-ms", type=float, default=50.0, help="pause before reconnecting after an error")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "switchover.json")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the supervisors' logs into this directory")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    bin_dir = require_bin_dir()
    os_user, owner = pg_os_user()
    load_before = os.getloadavg()[0]
    summary, results = asyncio.run(
        bench(args.runs, args.interval_ms / 1000, bin_dir, os_user, owner, args.keep_logs, retry_s=args.retry_ms / 1000)
    )
    summary["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
    report(summary, args.interval_ms)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": " ".join(["bench/switchover.py", *sys.argv[1:]]),
                "summary": summary,
                "runs": results,
                "interval_ms": args.interval_ms,
                "retry_ms": args.retry_ms,
            },
            indent=1,
        )
    )
    print(f"written: {args.json}")
    bad = summary["lost_acked_writes"] or summary["lost_acked_writes_final"] or summary["dual_primary_samples"]
    return 1 if bad or len(results) < args.runs else 0


if __name__ == "__main__":
    sys.exit(main())
