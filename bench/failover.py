#!/usr/bin/env python3
"""Failover time on real PostgreSQL: SIGKILL of the primary's postmaster to the
first acknowledged write on the new primary.

Each run builds a fresh three-member cluster on loopback (three `failoverd run`
supervisors, default timing, quorum ANY 1), starts a writer that inserts as
fast as commits return, kills the primary's postmaster, and records:
unavailability (kill -> first write acknowledged by another server), lost
acknowledged writes on the final primary, and two-primaries samples.

    sudo .venv/bin/python bench/failover.py --runs 5 [--json bench/results/failover.json]

Needs root (to run PostgreSQL and the supervisors as the postgres user) or to
be run as that user, and PostgreSQL server binaries (pg_config --bindir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "integration"), str(REPO)]

from cluster_harness import DualPrimarySampler, LocalCluster, Writer  # noqa: E402
from pg_helpers import find_bin_dir  # noqa: E402


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


def main() -> int:
    import logging

    import structlog

    # The harness probes with the daemon's adapter; its debug chatter is not the result.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    bin_dir = find_bin_dir()
    if bin_dir is None:
        print("PostgreSQL server binaries not found (pg_config --bindir)", file=sys.stderr)
        return 2
    if os.geteuid() == 0:
        os_user, entry = "postgres", pwd.getpwnam("postgres")
        owner = (entry.pw_uid, entry.pw_gid)
    else:
        os_user, owner = pwd.getpwuid(os.geteuid()).pw_name, None
    results = [asyncio.run(one_run(i, bin_dir, os_user, owner)) for i in range(args.runs)]
    times = [r["unavailable_s"] for r in results if r["unavailable_s"] is not None]
    summary = {
        "runs": len(results),
        "unavailable_median_s": statistics.median(times) if times else None,
        "unavailable_min_s": min(times, default=None),
        "unavailable_max_s": max(times, default=None),
        "runs_without_recovery": len(results) - len(times),
        "lost_acked_writes": sum(r["lost_acked_writes"] for r in results),
        "dual_primary_samples": sum(r["dual_primary_samples"] for r in results),
    }
    print(f"postmaster SIGKILL -> first acknowledged write on the new primary, {len(results)} runs")
    print(f"  median {summary['unavailable_median_s']} s, min {summary['unavailable_min_s']} s, "
          f"max {summary['unavailable_max_s']} s")
    print(f"  lost acknowledged writes {summary['lost_acked_writes']}, "
          f"two-primary samples {summary['dual_primary_samples']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    bad = summary["lost_acked_writes"] or summary["dual_primary_samples"] or summary["runs_without_recovery"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
