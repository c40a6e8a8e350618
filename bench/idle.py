"""Idle cost of the supervisors: RSS and CPU share of one core of each
`failoverd run` process of a healthy, idle three-member cluster, read from
/proc over --seconds.

    sudo .venv/bin/python bench/idle.py --lab [--seconds 60] [--json PATH]
    sudo .venv/bin/python bench/idle.py [--seconds 30] [--heartbeat 0.1 --heartbeat 0.2] [--json PATH]

--lab: the namespace lab (tests/support/e2e/lab.py: hosts in network
namespaces, the VIP, supervisors as `postgres` with only the network
capabilities, as systemd runs them) at default timing; each member's figures
are its supervisor's plus its fencing watchdog's (what failoverd costs a
host), against the goals of at most 1 % of a core and 45 MB.

Without --lab: three members on 127.0.0.1 (tests.support.cluster.LocalCluster:
real PostgreSQL, quorum ANY 1, no VIP), once per heartbeat interval given,
to show what `[timing] heartbeat_interval_s` costs (the probe period of a
settled server, `probe_interval_s`, follows it: 5 intervals by default),
since the supervisors' idle work is heartbeats, their acknowledgements and
probes.
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
GOAL_CPU_PERCENT = 1.0  # per member, supervisor plus watchdog (issue #14)
GOAL_RSS_MB = 45.0


async def measure_lab(bin_dir: Path, seconds: float) -> dict:
    from tests.support.e2e.lab import DATA, E2ELab, lab_dir
    from tests.support.e2e.scenarios import measure_idle

    with lab_dir("failoverd-idle-") as base:
        lab = E2ELab(base, bin_dir, modes=dict.fromkeys(DATA, "caps"))
        try:
            lab.build()
            lab.start_all()
            await lab.wait_for("bootstrap", lab.healthy, 180)
            await asyncio.sleep(SETTLE_S)
            members = await measure_idle(lab, seconds)
        finally:
            lab.close()
    return {"mode": "namespace lab", "load_average": [round(x, 2) for x in os.getloadavg()], "members": members}


def report_lab(result: dict) -> bool:
    print(f"namespace lab, default timing (load {result['load_average']}):")
    met = True
    for name, m in sorted(result["members"].items(), key=lambda kv: kv[1]["role"]):
        cpu = round(m["cpu_percent"] + m["watchdog_cpu_percent"], 2)
        rss = round(m["rss_mb"] + m["watchdog_rss_mb"], 1)
        ok = cpu <= GOAL_CPU_PERCENT and rss <= GOAL_RSS_MB
        met = met and ok
        print(
            f"  {name} ({m['role']}): supervisor {m['rss_mb']} MB {m['cpu_percent']}%, watchdog "
            f"{m['watchdog_rss_mb']} MB {m['watchdog_cpu_percent']}%, over {m['seconds']} s -> {rss} MB {cpu}% "
            f"[{'met' if ok else 'MISSED'}: <= {GOAL_CPU_PERCENT:g}% and <= {GOAL_RSS_MB:g} MB]",
            flush=True,
        )
    return met


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
    parser.add_argument("--lab", action="store_true", help="measure in the namespace lab at default timing")
    args = parser.parse_args()
    bin_dir = require_bin_dir()
    if args.lab:
        from tests.support.e2e.lab import lab_unsupported_reason

        reason = lab_unsupported_reason()
        if reason is not None:
            print(f"the namespace lab cannot run here: {reason}; run without --lab", file=sys.stderr)
            return 2
        result = asyncio.run(measure_lab(bin_dir, args.seconds))
        report_lab(result)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
            print(f"written: {args.json}")
        return 0
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
