"""Idle cost of the supervisors: RSS and CPU share of one core of each
`failoverd run` process of a healthy, idle three-member cluster on 127.0.0.1
(tests.support.cluster.LocalCluster: real PostgreSQL, quorum ANY 1, no VIP), read
from /proc over --seconds, once per heartbeat interval given.

    sudo .venv/bin/python bench/idle.py [--seconds 30] [--heartbeat 0.1 --heartbeat 0.2] [--json PATH]

The namespace lab (bench/failover.py) measures the same at default timing
with the VIP; this one shows what `[timing] heartbeat_interval_s` (also the
probe period) costs, since the supervisors' idle work is heartbeats, their
acknowledgements and probes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support, the helpers shared with the tests

from tests.support.cluster import LocalCluster
from tests.support.e2e.lab import process_usage
from tests.support.postgres import pg_os_user, require_bin_dir

SETTLE_S = 5.0  # after the cluster is healthy: the standbys' first catch-up is not idle


async def measure(bin_dir: Path, heartbeat_s: float, seconds: float) -> dict:
    os_user, owner = pg_os_user()
    base = Path(tempfile.mkdtemp(prefix="failoverd-idle-", dir="/tmp"))
    os.chmod(base, 0o755)
    cluster = LocalCluster(base, bin_dir, os_user, owner, timing=f"heartbeat_interval_s = {heartbeat_s}")
    try:
        cluster.start_all()
        primary = await cluster.wait_for("a healthy cluster", cluster.healthy, 120)
        await asyncio.sleep(SETTLE_S)
        pids = {name: sup.proc.pid for name, sup in cluster.supervisors.items()}
        before = {name: process_usage(pid)[1] for name, pid in pids.items()}
        started = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started
        members = {}
        for name, pid in pids.items():
            rss, cpu_s = process_usage(pid)
            members[name] = {
                "role": "primary" if name == primary else "standby",
                "rss_mb": round(rss / 2**20, 1),
                "cpu_percent": round((cpu_s - before[name]) / elapsed * 100, 2),
            }
        return {
            "heartbeat_interval_s": heartbeat_s,
            "seconds": round(elapsed, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "members": members,
        }
    finally:
        cluster.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement length per setting")
    parser.add_argument(
        "--heartbeat",
        type=float,
        action="append",
        default=None,
        help="heartbeat_interval_s to measure (repeat for several; default 0.1 and 0.2)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    bin_dir = require_bin_dir()
    results = []
    for heartbeat_s in args.heartbeat or [0.1, 0.2]:
        result = asyncio.run(measure(bin_dir, heartbeat_s, args.seconds))
        results.append(result)
        print(f"heartbeat_interval_s = {heartbeat_s:g} ({result['seconds']} s, load {result['load_average']}):")
        for name, m in sorted(result["members"].items(), key=lambda kv: kv[1]["role"]):
            print(f"  {name} ({m['role']}): {m['rss_mb']} MB, {m['cpu_percent']}% of one core", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
