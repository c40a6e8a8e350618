"""The installed `failoverctl` against three `failoverd run` supervisors on
real PostgreSQL: list, history, dsn (connected to), pause/resume (no
automatic failover while paused), a switchover under writes (nothing
acknowledged lost, the old primary rejoins as a standby without pg_rewind),
failover --to with and without a live leader, reinit of a standby, and all
of it with one member down."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time

import asyncpg
from test_cluster import _finish, _host_down, _new_primary, _started

from failoverd.core.state import PgRole
from tests.support import wait_for
from tests.support.cluster import DualPrimarySampler, LocalCluster, Writer


async def _ctl_ok(cluster: LocalCluster, *args: str) -> str:
    done = await cluster.actl(*args)
    assert done.returncode == 0, f"failoverctl {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


async def _listed(cluster: LocalCluster) -> dict:
    return json.loads(await _ctl_ok(cluster, "list", "--json"))


def _listed_primary(cluster: LocalCluster, expect: str):
    async def check() -> bool:
        done = await cluster.actl("list", "--json")
        return done.returncode == 0 and json.loads(done.stdout)["primary"] == expect

    return check


async def _no_other_primary_for(cluster: LocalCluster, seconds: float, old: str) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        roles = await cluster.roles()
        promoted = [n for n, r in roles.items() if r is PgRole.PRIMARY and n != old]
        assert promoted == [], f"{promoted} promoted while paused\n{cluster.logs()}"
        await asyncio.sleep(0.2)


async def test_list_history_dsn_and_everything_with_one_member_down(make_cluster):
    cluster = make_cluster()
    primary, writer, sampler = await _started(cluster)
    await cluster.wait_for("failoverctl seeing the primary", _listed_primary(cluster, primary), 30)

    table = (await _ctl_ok(cluster, "list")).splitlines()
    assert table[0].startswith(f"cluster itest, leader {primary}, term ")
    rows = {line.split()[0]: line.split() for line in table[2:5]}
    assert rows[primary][2:4] == ["primary", "running"]
    assert all(rows[n][2:6] == ["standby", "streaming", "from", primary] for n in rows if n != primary)
    history = (await _ctl_ok(cluster, "history")).splitlines()
    assert history[1].split()[2:5] == ["-", primary, "bootstrap"]
    assert json.loads(await _ctl_ok(cluster, "history", "--json"))["history"][0]["to"] == primary

    dsn = (await _ctl_ok(cluster, "dsn", "--user", "app")).strip()
    assert dsn.endswith("/postgres?target_session_attrs=read-write") and dsn.count(",") == 2
    admin = await asyncpg.connect(
        host=str(cluster.adapters[primary].socket_dir),
        port=cluster.pg_ports[primary],
        user="postgres",
        database="postgres",
    )
    try:
        await admin.execute("CREATE ROLE app LOGIN PASSWORD 'app-password-123'")
    finally:
        await admin.close()

    async def via_dsn() -> tuple[bool, int]:
        conn = await asyncpg.connect(dsn, password="app-password-123", timeout=5)
        try:
            return (
                await conn.fetchval("SELECT pg_is_in_recovery()"),
                int(await conn.fetchval("SELECT current_setting('port')")),
            )
        finally:
            await conn.close()

    assert await via_dsn() == (False, cluster.pg_ports[primary])

    # The first member in the configuration goes down, whole host; if it was
    # the primary, the others fail over. failoverctl must not care.
    down = cluster.data_names[0]
    await asyncio.to_thread(_host_down, cluster, down)  # it waits for the process: not on the loop
    if down == primary:
        primary = await cluster.wait_for("a new primary", _new_primary(cluster, down), 30)
    await cluster.wait_for("failoverctl seeing the primary", _listed_primary(cluster, primary), 30)
    view = await _listed(cluster)
    assert [m["name"] for m in view["members"] if not m["reachable"]] == [down]
    table = await _ctl_ok(cluster, "list")
    assert any(
        line.split()[:4] == [down, f"127.0.0.1:{cluster.pg_ports[down]}", "?", "unreachable"]
        for line in table.splitlines()
    )
    assert (await _ctl_ok(cluster, "pause")).strip() == "paused"
    assert (await _listed(cluster))["paused"] is True
    assert (await _ctl_ok(cluster, "resume")).strip() == "resumed"
    assert len(json.loads(await _ctl_ok(cluster, "history", "--json"))["history"]) >= 1
    assert await via_dsn() == (False, cluster.pg_ports[primary])
    await _finish(cluster, writer, sampler)


async def test_switchover_under_writes_and_old_primary_rejoins_without_rewind(make_cluster):
    cluster = make_cluster()
    old, writer, sampler = await _started(cluster)
    await cluster.wait_for("failoverctl seeing the primary", _listed_primary(cluster, old), 30)
    target = next(n for n in cluster.data_names if n != old)

    # A target that is not a member: refused, nothing changes.
    done = await cluster.actl("switchover", "--to", "db9", "--force")
    assert done.returncode == 1 and "'db9' is not a member" in done.stderr
    # Without --force and without a terminal: not confirmed, nothing sent.
    done = await cluster.actl("switchover", "--to", target)
    assert done.returncode == 2 and "--force" in done.stderr

    started = time.monotonic()
    out = await _ctl_ok(cluster, "switchover", "--to", target, "--force")
    assert out.splitlines()[0] == f"switchover to {target} started" and f"{target} is the primary" in out
    assert await cluster.primary() == target
    await _finish(cluster, writer, sampler, expect_primary_not=old)
    await cluster.wait_for("the old primary streaming from the new one", lambda: cluster.healthy(target), 60)

    # The write outage: the longest gap between acknowledged writes around the switchover.
    times = [t for t in writer.acked_at if t >= started - 1]
    outage = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
    print(f"switchover write gap {outage:.3f} s")
    events = [e for e in cluster.supervisors[old].log_events() if e.get("event")]
    names = [(e["event"], e.get("action")) for e in events]
    assert names.index(("pg_action_done", "Checkpoint")) < names.index(("switchover_started", None))
    later = events[names.index(("switchover_started", None)) :]
    stops = [e for e in later if e["event"] == "pg_stopped"]
    assert stops and stops[0]["mode"] == "fast"  # a clean stop, not a fence
    for forbidden in ("pg_rewind_done", "pg_rewind_failed", "pg_data_dir_moved_aside", "pg_clone_done"):
        assert forbidden not in [e["event"] for e in later], f"{forbidden} on {old} after the switchover"
    # Restarted as a standby (at once with the new primary as upstream, or
    # with none and then re-pointed by a reload), never rewound or re-cloned.
    assert [e["standby"] for e in later if e["event"] == "pg_started"] == [True], later
    assert any(e["event"] in ("pg_started", "pg_retargeted") and e.get("upstream") == target for e in later), later
    history = json.loads(await _ctl_ok(cluster, "history", "--json"))["history"]
    assert (history[-1]["from"], history[-1]["to"], history[-1]["reason"]) == (old, target, "transfer")


async def test_pause_stops_automatic_failover_until_resumed(make_cluster):
    cluster = make_cluster()
    cluster.start_all()
    old = await cluster.wait_for("a primary with every standby streaming", cluster.healthy, timeout_s=90)
    await cluster.wait_for("failoverctl seeing the primary", _listed_primary(cluster, old), 30)
    sampler = DualPrimarySampler(cluster)
    sampler.start()
    try:
        assert (await _ctl_ok(cluster, "pause")).strip() == "paused"
        assert "PAUSED" in (await _ctl_ok(cluster, "list")).splitlines()[0]
        os.kill(cluster.postmaster_pid(old), signal.SIGKILL)
        # Several election timeouts (1.0-1.4 s) and promote timeouts pass: nobody takes over.
        await _no_other_primary_for(cluster, 8.0, old)
        done = await cluster.actl("switchover", "--force")
        assert done.returncode == 1 and "paused" in done.stderr
        assert (await _ctl_ok(cluster, "resume")).strip() == "resumed"
        new = await cluster.wait_for("a new primary after the resume", _new_primary(cluster, old), 30)
        await cluster.wait_for("the old primary rejoining", lambda: cluster.healthy(new), 90)
    finally:
        await sampler.stop()
    assert sampler.dual == [], sampler.dual[:5]


async def test_failover_to_with_a_live_leader_and_without_one(make_cluster):
    cluster = make_cluster()
    first, writer, sampler = await _started(cluster)
    await cluster.wait_for("failoverctl seeing the primary", _listed_primary(cluster, first), 30)
    target = next(n for n in reversed(cluster.data_names) if n != first)
    out = await _ctl_ok(cluster, "failover", "--to", target, "--force")
    assert f"{target} is the primary" in out
    await _finish(cluster, writer, sampler, expect_primary_not=first)
    await cluster.wait_for("everyone streaming from the new primary", lambda: cluster.healthy(target), 60)

    # No live leader: paused, and the primary's host is gone. Nobody takes over
    # by itself; failover --to makes the named member campaign.
    assert (await _ctl_ok(cluster, "pause")).strip() == "paused"
    await cluster.wait_for("the pause replicated", _all_paused(cluster), 10)
    await asyncio.to_thread(_host_down, cluster, target)
    await _no_other_primary_for(cluster, 4.0, target)
    survivor = next(n for n in cluster.data_names if n != target)
    out = await _ctl_ok(cluster, "failover", "--to", survivor, "--force")
    assert f"{survivor} is the primary" in out, out
    assert await cluster.primary() == survivor
    assert (await _ctl_ok(cluster, "resume")).strip() == "resumed"
    cluster.start(target)
    await cluster.wait_for("the old host rejoining", lambda: cluster.healthy(survivor), 90)
    history = json.loads(await _ctl_ok(cluster, "history", "--json"))["history"]
    assert history[-1]["to"] == survivor and history[-1]["reason"] == "operator failover"


def _all_paused(cluster: LocalCluster):
    async def check() -> bool:
        for name in cluster.data_names:
            _, body = await cluster.api(name, "GET", "/health", token=None)
            if not (isinstance(body, dict) and body["paused"]):
                return False
        return True

    return check


async def test_reinit_rebuilds_a_standby(make_cluster):
    cluster = make_cluster()
    primary, writer, sampler = await _started(cluster)
    await cluster.wait_for("failoverctl seeing the primary", _listed_primary(cluster, primary), 30)
    standby = next(n for n in cluster.data_names if n != primary)

    done = await cluster.actl("reinit", primary, "--force")
    assert done.returncode == 1 and "only a follower" in done.stderr, done.stderr
    out = await _ctl_ok(cluster, "reinit", standby, "--force")
    assert out.splitlines()[0] == f"rebuilding {standby} from {primary}" and f"{standby} is streaming again" in out
    aside = [p.name for p in (cluster.base / standby).iterdir() if p.name.startswith("data.failed-")]
    assert len(aside) == 1, aside  # the old directory is kept, never deleted
    names = [e.get("event") for e in cluster.supervisors[standby].log_events()]
    assert "pg_clone_done" in names and "pg_reinit_done" in names
    await _finish(cluster, writer, sampler)
    await cluster.wait_for("the rebuilt standby streaming", lambda: cluster.healthy(primary), 60)
    await _caught_up(writer, standby)


async def _caught_up(writer: Writer, name: str) -> None:
    """Wait until every acknowledged write is on `name` (its replay may lag a little)."""
    missing: list[int] = []

    async def nothing_missing() -> bool:
        nonlocal missing
        missing = await writer.missing_on(name)
        return not missing

    await wait_for(
        f"every acknowledged write on the rebuilt {name}",
        nothing_missing,
        30,
        interval_s=0.5,
        detail=lambda: f"acknowledged writes missing on the rebuilt {name}: {missing[:10]}",
    )
