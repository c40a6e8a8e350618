#!/usr/bin/env python3
"""Rolling restart benchmark on real PostgreSQL (issue #15).

    .venv/bin/python bench/rolling_restart.py [--runs 3] [--interval-ms 15] [--json bench/results/rolling_restart.json]

Builds a fresh three-member cluster on 127.0.0.1 (three `failoverd run`
supervisors, default timing, quorum ANY 1; tests/support/cluster.py) and, per
run, changes a setting PostgreSQL takes only at a restart
(max_locks_per_transaction, a new value each run) in [postgres.parameters],
runs `failoverctl reload`, then `failoverctl restart --rolling --pending-only
--force` (the installed CLI): the standbys one at a time, a switchover, the
old primary restarted by it.

The writer is the drill's probe client (failoverd.ctl.drill.ProbeWriter), as
in bench/switchover.py: one INSERT at a time and a pause of --interval-ms,
through a multi-host read-write connection over the members' sockets.

Per run: the longest stretch between two acknowledged writes from the
restart's start to its end (the write gap a client sees), how long the
whole restart took, acknowledged writes missing on the final primary, and
samples with two primaries (every 50 ms). Prints median/min/max, writes
everything to --json, exits 1 if a write was lost, two primaries were seen,
or a restart failed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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

PARAMETER = "max_locks_per_transaction"  # postmaster context: a restart applies it


def write_parameter(cluster: LocalCluster, value: int) -> None:
    text = cluster.config_path.read_text()
    head, sep, tail = text.partition("\n[api]\n")
    head = head.split("\n[postgres.parameters]\n")[0]
    cluster.config_path.write_text(f'{head}\n[postgres.parameters]\n{PARAMETER} = "{value}"\n{sep}{tail}')


async def connect_socket(cluster: LocalCluster, name: str) -> asyncpg.Connection:
    adapter = cluster.adapters[name]
    return await asyncpg.connect(
        host=str(adapter.socket_dir), port=adapter.pg.port, user="postgres", database="postgres", timeout=5
    )


async def one_run(cluster: LocalCluster, writer: ProbeWriter, index: int) -> dict:
    primary = await cluster.wait_for("a healthy cluster", cluster.healthy, 90)
    mark = len(writer.acks)
    await cluster.wait_for("writes flowing", lambda: len(writer.acks) >= mark + 30, 30)
    value = 128 + 16 * index
    write_parameter(cluster, value)
    done = await cluster.actl("reload")
    if done.returncode != 0:
        raise RuntimeError(f"failoverctl reload: exit {done.returncode}: {done.stdout} {done.stderr}")
    started = time.monotonic()
    done = await cluster.actl("restart", "--rolling", "--pending-only", "--force", timeout_s=300)
    ended = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"failoverctl restart: exit {done.returncode}: {done.stdout} {done.stderr}")
    mark = len(writer.acks)
    await cluster.wait_for("writes flowing after the restart", lambda: len(writer.acks) >= mark + 10, 30)
    times = [a.at for a in writer.acks if started - 1 <= a.at <= ended + 1]
    gap = max((b - a for a, b in itertools.pairwise(times)), default=None)
    new = await cluster.wait_for("one primary", cluster.primary, 30)
    applied = {}
    for name in cluster.data_names:
        conn = await connect_socket(cluster, name)
        try:
            applied[name] = await conn.fetchval(f"SHOW {PARAMETER}")
        finally:
            await conn.close()
    if set(applied.values()) != {str(value)}:
        raise RuntimeError(f"{PARAMETER} not {value} everywhere after the restart: {applied}")
    result = {
        "run": index,
        "old_primary": primary,
        "new_primary": new,
        "write_gap_s": None if gap is None else round(gap, 3),
        "restart_s": round(ended - started, 1),
        "steps": done.stdout.splitlines(),
    }
    print(json.dumps(result), flush=True)
    return result


async def bench(runs: int, interval_s: float, bin_dir: Path, os_user: str, owner) -> tuple[dict, list[dict]]:
    base = Path(tempfile.mkdtemp(prefix="failoverd-rrbench-", dir="/tmp"))
    os.chmod(base, 0o755)
    cluster = LocalCluster(base, bin_dir, os_user, owner)
    results: list[dict] = []
    try:
        cluster.start_all()
        await cluster.wait_for("a healthy cluster", cluster.healthy, 120)
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
        writer = ProbeWriter(connect, run=int(time.time()), interval_s=interval_s, retry_s=0.05)
        sampler = DualPrimarySampler(cluster)
        sampler.start()
        writer.start()
        try:
            for i in range(runs):
                results.append(await one_run(cluster, writer, i))
        finally:
            await writer.stop()
            await sampler.stop()
        final = await cluster.wait_for("one primary", cluster.primary, 30)
        conn = await connect_socket(cluster, final)
        try:
            missing = await missing_acks(conn, writer.run_id, writer.acks)
        finally:
            await conn.close()
        gaps = [r["write_gap_s"] for r in results if r["write_gap_s"] is not None]
        totals = [r["restart_s"] for r in results]
        summary = {
            "runs": len(results),
            "write_gap_median_s": round(statistics.median(gaps), 3) if gaps else None,
            "write_gap_min_s": min(gaps, default=None),
            "write_gap_max_s": max(gaps, default=None),
            "restart_median_s": round(statistics.median(totals), 1) if totals else None,
            "acked_writes": len(writer.acks),
            "lost_acked_writes": len(missing),
            "writer_errors": writer.errors,
            "dual_primary_samples": len(sampler.dual),
            "samples": sampler.samples,
        }
        return summary, results
    except Exception:
        print(cluster.logs()[-8000:], file=sys.stderr)
        raise
    finally:
        cluster.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="rolling restarts (at least 1)")
    parser.add_argument("--interval-ms", type=float, default=15.0, help="pause after each acknowledged INSERT")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "rolling_restart.json")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    bin_dir = require_bin_dir()
    os_user, owner = pg_os_user()
    load_before = os.getloadavg()[0]
    summary, results = asyncio.run(bench(args.runs, args.interval_ms / 1000, bin_dir, os_user, owner))
    summary["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    print()
    print(
        f"rolling restart (reload, then restart --rolling --pending-only), loopback, 3 data members, default timing, "
        f"one INSERT every {args.interval_ms:g} ms: {summary['runs']} runs"
    )
    print(
        f"  write gap: median {summary['write_gap_median_s']} s, min {summary['write_gap_min_s']} s, "
        f"max {summary['write_gap_max_s']} s; whole restart median {summary['restart_median_s']} s"
    )
    print(
        f"  lost acknowledged writes: {summary['lost_acked_writes']} of {summary['acked_writes']}; "
        f"two-primaries samples: {summary['dual_primary_samples']} of {summary['samples']}; "
        f"load average {summary['loadavg_1min']}"
    )
    bad = summary["lost_acked_writes"] or summary["dual_primary_samples"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
