"""Mode `loopback` of bench/failover.py: SIGKILL of the primary's postmaster
on a three-member cluster on 127.0.0.1 (no namespaces, no VIP), to the first
write acknowledged by another server, through a multi-host DSN.

Each run builds a fresh cluster (three `failoverd run` supervisors, default
timing, quorum ANY 1) with tests.support.cluster.LocalCluster, starts a
writer that inserts as fast as commits return, kills the primary's postmaster and
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
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # imported by bench/failover.py, which has put it there already
    sys.path.insert(0, str(REPO))  # for tests.support, the helpers shared with the tests

from tests.support.cluster import LocalCluster, first_write_not_by, start_watched


async def one_run(index: int, bin_dir: Path, os_user: str, owner) -> dict:
    base = Path(tempfile.mkdtemp(prefix="failoverd-bench-", dir="/tmp"))
    os.chmod(base, 0o755)
    cluster = LocalCluster(base, bin_dir, os_user, owner)
    try:
        old, writer, sampler = await start_watched(cluster, healthy_timeout_s=120, settle_s=2.0, writer_pause_s=0.0)
        kill_at = time.monotonic()
        os.kill(cluster.postmaster_pid(old), signal.SIGKILL)
        first = await first_write_not_by(writer, old, kill_at, 30)
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
    print(
        f"  median {summary['unavailable_median_s']} s, min {summary['unavailable_min_s']} s, "
        f"max {summary['unavailable_max_s']} s"
    )
    print(
        f"  lost acknowledged writes {summary['lost_acked_writes']}, "
        f"two-primary samples {summary['dual_primary_samples']}"
    )
    return summary, results


if __name__ == "__main__":
    # Not a script of its own: bench/failover.py runs it and owns the options.
    print(__doc__)
    print("Run it as: .venv/bin/python bench/failover.py --mode loopback [--runs 5] [--json PATH]")
