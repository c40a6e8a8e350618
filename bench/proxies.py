#!/usr/bin/env python3
"""The write gap of a failover through HAProxy and PgBouncer, next to the VIP's.

    sudo .venv/bin/python bench/proxies.py [--runs 5] [--faults kill-postmaster,isolate-primary] [--json PATH]

Builds the e2e lab of tests/e2e (three `failoverd run` supervisors with
PostgreSQL in network namespaces, a real VIP, a client namespace), starts
HAProxy and two PgBouncers in the client namespace from deploy/haproxy.cfg
and deploy/pgbouncer.ini (tests/support/e2e/proxies.py), then runs each
fault --runs times on that one cluster. In every run four clients write at
once, each through one path:

    vip                 straight to the VIP
    haproxy             HAProxy's write port (GET /primary)
    pgbouncer-vip       PgBouncer (transaction pooling) -> the VIP
    pgbouncer-haproxy   PgBouncer -> HAProxy's write port

and the longest stretch without an acknowledged write from the fault until
writes flow again is taken per path. Prints median and range per fault and
path, and writes every run to --json (default bench/results/proxies.json).

Exits 1 if an acknowledged write was lost, two primaries were seen or a run
did not recover.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]  # tests.support: the helpers shared with the tests

from tests.support.postgres import require_bin_dir

DEFAULT_FAULTS = ("kill-postmaster", "isolate-primary")


async def bench(bin_dir: Path, faults: list[str], runs: int) -> dict:
    from tests.support.e2e.checker import VipMonitor
    from tests.support.e2e.lab import DATA, E2ELab, lab_dir
    from tests.support.e2e.proxies import Proxies, describe, run_paths
    from tests.support.e2e.scenarios import FAULTS

    out: dict = {"runs": [], "errors": []}
    with lab_dir("failoverd-bench-") as base:
        lab = E2ELab(base, bin_dir, modes=dict.fromkeys(DATA, "caps"))
        monitor = VipMonitor(lab)
        proxies = Proxies(lab)
        try:
            lab.build()
            lab.start_all()
            primary = await lab.wait_for("bootstrap", lab.healthy, 180)
            await lab.create_writer_role(primary)
            monitor.start()
            proxies.start()
            ids = iter(range(1_000_000, 10**12, 1_000_000))
            for i in range(runs):
                for name in faults:
                    started = time.monotonic()
                    try:
                        r = await run_paths(lab, monitor, proxies, FAULTS[name], next(ids))
                    except Exception as error:  # noqa: BLE001 - recorded; the cluster may be broken
                        kept = lab.save_logs()
                        out["errors"].append({"fault": name, "error": repr(error)[:2000], "logs": str(kept)})
                        print(f"  {name}: FAILED after {time.monotonic() - started:.0f} s (logs in {kept})", flush=True)
                        return out
                    out["runs"].append({"run": i, **r.as_dict()})
                    for line in describe(r):
                        print("  " + line, flush=True)
        except Exception as error:  # noqa: BLE001
            kept = lab.save_logs()
            out["errors"].append({"fault": "setup", "error": traceback.format_exc()[-3000:], "logs": str(kept)})
            print(f"  FAILED (logs kept in {kept}): {error!r}"[:600], flush=True)
        finally:
            proxies.stop()
            monitor.stop()
            lab.close()
    return out


def summarize(runs: list[dict]) -> dict:
    summary: dict = {}
    for r in runs:
        for path, p in r["paths"].items():
            s = summary.setdefault(r["fault"], {}).setdefault(path, {"gaps": [], "lost": 0})
            s["gaps"].append(p["gap_s"])
            s["lost"] += p["lost"]
    for paths in summary.values():
        for s in paths.values():
            gaps = sorted(g for g in s.pop("gaps") if g is not None)
            s.update(
                runs=len(gaps),
                gap_median_s=round(statistics.median(gaps), 3) if gaps else None,
                gap_min_s=gaps[0] if gaps else None,
                gap_max_s=gaps[-1] if gaps else None,
                gaps_s=gaps,
            )
    return summary


def main() -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each fault")
    parser.add_argument("--faults", default=",".join(DEFAULT_FAULTS), help="comma-separated faults of the e2e matrix")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "proxies.json")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    from tests.support.e2e.lab import lab_unsupported_reason
    from tests.support.e2e.proxies import proxies_unsupported_reason
    from tests.support.e2e.scenarios import FAULTS

    reason = lab_unsupported_reason() or proxies_unsupported_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    faults = args.faults.split(",")
    unknown = [f for f in faults if f not in FAULTS or not FAULTS[f].failover]
    if unknown:
        known = ", ".join(n for n, f in FAULTS.items() if f.failover)
        print(f"not a failover fault: {unknown}; these are: {known}", file=sys.stderr)
        return 2
    started = time.time()
    out = asyncio.run(bench(require_bin_dir(), faults, args.runs))
    summary = summarize(out["runs"])
    print()
    print(
        f"write gap through each path, {args.runs} runs per fault, default timing, 3 data members, quorum ANY 1 "
        f"({time.time() - started:.0f} s)"
    )
    print(f"  {'fault':18}{'path':20}{'runs':>5}{'median s':>10}{'min s':>8}{'max s':>8}{'lost':>6}")
    for fault, paths in summary.items():
        for path, s in paths.items():
            print(
                f"  {fault:18}{path:20}{s['runs']:>5}{s['gap_median_s']:>10.2f}{s['gap_min_s']:>8.2f}"
                f"{s['gap_max_s']:>8.2f}{s['lost']:>6}"
            )
    for e in out["errors"]:
        print(f"  run failed: {e['fault']}: {e['error'][:300]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "errors": out["errors"], "runs": out["runs"]}, indent=1))
    print(f"written: {args.json}")
    unsafe = any(
        r["dual_primary_samples"] or r["dual_vip"] or any(p["lost"] for p in r["paths"].values()) for r in out["runs"]
    )
    return 1 if unsafe or out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
