"""Mode `loopback` of bench/failover.py: SIGKILL of the primary's postmaster
on a three-member cluster on 127.0.0.1 (no namespaces, no VIP), to the first
write acknowledged by another server, through a multi-host DSN.

Each run builds a fresh cluster (three `failoverd run` supervisors, default
timing, quorum ANY 1) with cluster_harness.LocalCluster, starts a writer that
inserts as fast as commits return, kills the primary's postmaster and
records: unavailability (kill -> first write acknowledged by another server),
lost acknowledged writes on the final primary, and two-primaries samples.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

from cluster_harness import DualPrimarySampler, LocalCluster, Writer


async def one_run(index: int, bin_dir: Path, os_user: str, owner) -> dict:
    base = Path(tempfile.mkdtemp(prefix="failoverd-bench-", dir="/tmp"))
    os.chmod(base, 0o755)
    cluster = LocalCluster(base, bin_dir, os_user, owner)
    try:
        cluster.start_all()
        old = await cluster.wait_for("a healthy cluster", cluster.healthy, 120)
        writer = Writer(cluster)
        writer.pause_s = 0.0
        await writer.setup()
        sampler = DualPrimarySampler(cluster)
        sampler.start()
        writer.start()
        await asyncio.sleep(2.0)
        kill_at = time.monotonic()
        os.kill(cluster.postmaster_pid(old), signal.SIGKILL)
        deadline = kill_at + 30
        first = None
        while first is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            first = next((t for t, by in zip(writer.acked_at, writer.acked_by)
                          if t > kill_at and by not in (None, old)), None)
        await asyncio.sleep(1.0)
        await writer.stop()
        await sampler.stop()
        final = await cluster.wait_for("one primary", cluster.primary, 30)
        missing = await writer.missing_on(final)
        result = {
            "run": index,
            "old_primary": old,
            "new_primary": final,
            "unavailable_s": None if first is None else round(first - kill_at, 3),
            "acked_writes": len(writer.acked),
            "lost_acked_writes": len(missing),
            "dual_primary_samples": len(sampler.dual),
            "samples": sampler.samples,
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        cluster.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def summarize(results: list[dict]) -> dict:
    times = [r["unavailable_s"] for r in results if r["unavailable_s"] is not None]
    return {
        "runs": len(results),
        "unavailable_median_s": statistics.median(times) if times else None,
        "unavailable_min_s": min(times, default=None),
        "unavailable_max_s": max(times, default=None),
        "runs_without_recovery": len(results) - len(times),
        "lost_acked_writes": sum(r["lost_acked_writes"] for r in results),
        "dual_primary_samples": sum(r["dual_primary_samples"] for r in results),
    }


def run(runs: int, bin_dir: Path, os_user: str, owner) -> tuple[dict, list[dict]]:
    results = [asyncio.run(one_run(i, bin_dir, os_user, owner)) for i in range(runs)]
    summary = summarize(results)
    print(f"postmaster SIGKILL -> first acknowledged write on the new primary (loopback), {len(results)} runs")
    print(f"  median {summary['unavailable_median_s']} s, min {summary['unavailable_min_s']} s, "
          f"max {summary['unavailable_max_s']} s")
    print(f"  lost acknowledged writes {summary['lost_acked_writes']}, "
          f"two-primary samples {summary['dual_primary_samples']}")
    return summary, results
