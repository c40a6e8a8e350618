#!/usr/bin/env python3
"""`make demo`: a three-node failoverd cluster on this machine, one failover,
its timeline, and everything removed again.

As root with network namespaces: the lab of tests/e2e (tests/support/e2e)
— three hosts (198.18.20.1-3), each running PostgreSQL and `failoverd run` as the postgres
user with only CAP_NET_ADMIN/CAP_NET_RAW (as under systemd), a VIP
198.18.20.100 on whichever host is primary, and a client host whose writers
connect to the VIP only. Otherwise: the three members on 127.0.0.1 and a
writer with a libpq-style multi-host DSN (no VIP).

    .venv/bin/python bench/demo.py [--fault kill-postmaster|isolate-primary] [--keep-logs]

Prints: failure injected, detected, new leader elected, promoted, VIP moved,
first acknowledged write, with the unavailability and the count of
acknowledged writes missing on the new primary (always expected to be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support, the helpers shared with the tests

from tests.support.postgres import pg_os_user, require_bin_dir

DETECTED = ("lease lost", "fence decided", "pre-vote", "election")


def say(text: str) -> None:
    print(text, flush=True)


def show_timeline(
    rows: list[tuple[str, float | None, str]],
    unavailable: float | None,
    lost: int,
    dual: int,
    dual_how: str = "sampled every 50 ms, and the VIP on two hosts",
) -> None:
    say("")
    say("timeline (seconds after the failure was injected)")
    for what, t, detail in rows:
        shown = "    -  " if t is None else f"{t:7.3f}"
        say(f"  {shown}  {what:22} {detail}")
    say("")
    say(f"unavailability (no acknowledged write): {unavailable} s")
    say(f"acknowledged writes missing on the new primary: {lost}")
    say(f"moments with two primaries ({dual_how}): {dual}")


# --- the namespace lab --------------------------------------------------------


async def lab_demo(bin_dir: Path, fault_name: str, keep: bool) -> int:
    from tests.support.e2e.checker import VipMonitor
    from tests.support.e2e.lab import DATA, E2ELab, lab_dir
    from tests.support.e2e.scenarios import FAULTS, run_fault

    if keep:
        os.environ["FAILOVERD_E2E_KEEP"] = "1"
    with lab_dir("failoverd-demo-") as base:
        lab = E2ELab(base, bin_dir, modes=dict.fromkeys(DATA, "caps"))
        monitor = VipMonitor(lab)
        try:
            say(f"building hosts as network namespaces ({', '.join(lab.net.ns(h) for h in lab.net.hosts)})")
            lab.build()
            say("starting failoverd on db1, db2, db3 (198.18.20.1-3) as the postgres user; bootstrapping")
            lab.start_all()
            primary = await lab.wait_for("a primary with two streaming standbys", lab.healthy, 180)
            say(f"primary: {primary}; VIP {lab.vip} on {', '.join(lab.vip_holders())}; term {lab.leadership()[1]}")
            await lab.create_writer_role(primary)
            monitor.start()
            fault = FAULTS[fault_name]
            say(f"client at {lab.address('client')} writing through the VIP only; injecting: {fault.what}")
            r = await run_fault(lab, monitor, fault, 1_000_000)
        finally:
            monitor.stop()
            say("removing the processes and namespaces")
            lab.close()
    rows = _lab_rows(r)
    show_timeline(rows, r.unavailable_s, r.lost, r.dual_primary_samples + r.dual_vip)
    say(f"new primary: {r.new_primary} (term {r.term_after}); the old primary {r.old_primary} rejoined as a standby")
    return 0 if r.lost == 0 and r.dual_primary_samples == 0 and r.dual_vip == 0 else 1


def _lab_rows(r) -> list[tuple[str, float | None, str]]:
    def first(match, after: float = 0.0):
        return next(((t, node, what) for t, node, what in r.timeline if t >= after and match(what)), None)

    rows = [("failure injected", 0.0, f"{r.fault} on {r.old_primary}")]
    detected = first(lambda w: w in DETECTED or w.startswith("stepped down"))
    elected = first(lambda w: w.startswith("elected"))
    after = elected[0] if elected else 0.0
    promoted = first(lambda w: w == "promoted", after)
    vip = first(lambda w: w == "kernel: vip up", after)
    for what, row in (("detected", detected), ("elected", elected), ("promoted", promoted), ("VIP moved", vip)):
        rows.append((what, None if row is None else row[0], "" if row is None else f"{row[1]}: {row[2]}"))
    rows.append(("first write", r.first_write_s, f"acknowledged by {r.new_primary} through the VIP"))
    return rows


# --- loopback -----------------------------------------------------------------


async def loopback_demo(bin_dir: Path, keep: bool) -> int:
    from tests.support.cluster import LocalCluster, first_write_not_by, start_watched
    from tests.support.e2e.lab import _wall

    os_user, owner = pg_os_user()
    base = Path(tempfile.mkdtemp(prefix="failoverd-demo-", dir="/tmp"))
    os.chmod(base, 0o755)
    cluster = LocalCluster(base, bin_dir, os_user, owner)
    try:
        say("starting failoverd db1, db2, db3 on 127.0.0.1; bootstrapping")
        old, writer, sampler = await start_watched(cluster, healthy_timeout_s=180, settle_s=2.0)
        say(
            f"primary: {old}; writer on a multi-host DSN (target_session_attrs=read-write); "
            f"SIGKILL of {old}'s postmaster"
        )
        kill_wall, kill_t = time.time(), time.monotonic()
        os.kill(cluster.postmaster_pid(old), signal.SIGKILL)
        first = await first_write_not_by(writer, old, kill_t, 60)
        await asyncio.sleep(1.0)
        await writer.stop()
        await sampler.stop()
        new = await cluster.wait_for("one primary", cluster.primary, 60)
        lost = len(await writer.missing_on(new))
        events = [dict(e, wall=_wall(e.get("timestamp"))) for s in cluster.supervisors.values() for e in s.log_events()]
        events = sorted((e for e in events if (e["wall"] or 0) >= kill_wall), key=lambda e: e["wall"])

        def at(match) -> tuple[float | None, str]:
            e = next((e for e in events if match(e)), None)
            if e is None:
                return None, ""
            what = f"leader of term {e.get('term')}" if e["event"] == "role_changed" else e["event"]
            return round(e["wall"] - kill_wall, 3), f"{e.get('node')}: {what}"

        rows = [("failure injected", 0.0, f"postmaster of {old} killed")]
        for what, match in (
            ("detected", lambda e: e["event"] in ("fence", "lease_lost", "pre_vote_started", "election_started")),
            ("elected", lambda e: e["event"] == "role_changed" and e.get("role") == "leader"),
            ("promoted", lambda e: e["event"] == "promoted"),
        ):
            t, detail = at(match)
            rows.append((what, t, detail))
        rows.append(("VIP moved", None, "no VIP on loopback: clients follow the multi-host DSN"))
        rows.append(("first write", None if first is None else round(first - kill_t, 3), f"acknowledged by {new}"))
        gaps = [
            b - a
            for a, b in zip(
                [kill_t, *[t for t in writer.acked_at if t > kill_t]], [t for t in writer.acked_at if t > kill_t]
            )
        ]
        show_timeline(rows, round(max(gaps), 3) if gaps else None, lost, len(sampler.dual), "sampled every 50 ms")
        return 0 if lost == 0 and not sampler.dual and first is not None else 1
    finally:
        say("stopping the processes")
        cluster.cleanup()
        if keep:
            say(f"logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=("kill-postmaster", "isolate-primary"), default="kill-postmaster")
    parser.add_argument("--keep-logs", action="store_true", help="keep the cluster's directory (logs) afterwards")
    parser.add_argument("--loopback", action="store_true", help="use loopback even where namespaces work")
    args = parser.parse_args()
    bin_dir = require_bin_dir()
    from tests.support.e2e.lab import lab_unsupported_reason

    reason = None if args.loopback else lab_unsupported_reason()
    if reason is None and not args.loopback:
        return asyncio.run(lab_demo(bin_dir, args.fault, args.keep_logs))
    say("the demo runs on loopback, without a VIP" + (f": network namespaces unavailable ({reason})" if reason else ""))
    return asyncio.run(loopback_demo(bin_dir, args.keep_logs))


if __name__ == "__main__":
    sys.exit(main())
