"""Three `failoverd run` supervisors on loopback turn empty data directories
into a replicated PostgreSQL cluster and keep it writable through failures.

After every scenario: no acknowledged write is missing on the final primary,
and no sample (every 50 ms) saw two servers out of recovery at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from failoverd.core.state import PgRole
from tests.support.cluster import DualPrimarySampler, LocalCluster, Writer, start_watched


async def _started(cluster: LocalCluster) -> tuple[str, Writer, DualPrimarySampler]:
    return await start_watched(cluster, healthy_timeout_s=90, settle_s=1.0)


async def _finish(
    cluster: LocalCluster, writer: Writer, sampler: DualPrimarySampler, expect_primary_not: str | None = None
):
    # Writes must flow again before we stop looking.
    count = len(writer.acked)
    await cluster.wait_for("acknowledged writes after the fault", lambda: len(writer.acked) > count + 20, 60)
    await writer.stop()
    await sampler.stop()
    final = await cluster.wait_for("one primary", cluster.primary, 30)
    if expect_primary_not is not None:
        assert final != expect_primary_not
    missing = await writer.missing_on(final)
    assert missing == [], f"acknowledged writes missing on {final}: {missing[:10]}\n{cluster.logs()}"
    assert sampler.dual == [], f"two primaries at once: {sampler.dual[:5]}\n{cluster.logs()}"
    assert sampler.samples > 10 and sampler.max_gap_s() < 0.1, (sampler.samples, sampler.max_gap_s())
    return final


async def test_bootstrap_from_empty_directories(make_cluster):
    cluster = make_cluster()
    primary, writer, sampler = await _started(cluster)
    sync = await _query(cluster, primary, "SHOW synchronous_standby_names")
    assert sync.startswith("ANY 1 ("), sync
    await _finish(cluster, writer, sampler)


async def test_postmaster_killed_new_primary_and_old_rejoins(make_cluster):
    cluster = make_cluster()
    old, writer, sampler = await _started(cluster)
    os.kill(cluster.postmaster_pid(old), signal.SIGKILL)
    killed_at = time.monotonic()
    new = await cluster.wait_for("a new primary", _new_primary(cluster, old), 30)
    await _finish(cluster, writer, sampler, expect_primary_not=old)
    await cluster.wait_for("the old primary rejoining as a standby", lambda: cluster.healthy(new), 90)
    assert writer.acked_at[-1] > killed_at


async def test_supervisor_killed_primary_is_fenced_before_another_promotion(make_cluster):
    cluster = make_cluster()
    old, writer, sampler = await _started(cluster)
    cluster.signal_supervisor(old, signal.SIGKILL)
    cluster.supervisors[old].proc.wait(10)
    # The watchdog fences at once when the supervisor's pipe closes.
    await cluster.wait_for("the orphaned primary fenced", _role_is(cluster, old, PgRole.STOPPED), 10)
    new = await cluster.wait_for("a new primary", _new_primary(cluster, old), 30)
    await _finish(cluster, writer, sampler, expect_primary_not=old)
    cluster.start(old)
    await cluster.wait_for("the old member rejoining as a standby", lambda: cluster.healthy(new), 90)


async def test_frozen_supervisor_is_fenced_and_never_leads_in_the_old_term(make_cluster):
    cluster = make_cluster()
    old, writer, sampler = await _started(cluster)
    sup = cluster.supervisors[old]
    sup.proc.send_signal(signal.SIGSTOP)
    try:
        await cluster.wait_for("the frozen member's primary fenced", _role_is(cluster, old, PgRole.STOPPED), 10)
        new = await cluster.wait_for("a new primary", _new_primary(cluster, old), 30)
        await asyncio.sleep(2 * 1.4)
    finally:
        sup.proc.send_signal(signal.SIGCONT)
    thawed_at = time.time()
    await _finish(cluster, writer, sampler, expect_primary_not=old)
    await cluster.wait_for("the thawed member following the new primary", lambda: cluster.healthy(new), 90)
    after = [e for e in sup.log_events() if _ts(e) >= thawed_at - 0.5]
    assert not [e for e in after if e.get("event") in ("promote", "vip_acquired")], after


async def _query(cluster: LocalCluster, name: str, sql: str):
    import asyncpg

    a = cluster.adapters[name]
    conn = await asyncpg.connect(host=str(a.socket_dir), port=a.pg.port, user="postgres", database="postgres")
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _new_primary(cluster: LocalCluster, old: str):
    async def check():
        p = await cluster.primary()
        return p if p is not None and p != old else None

    return check


def _role_is(cluster: LocalCluster, name: str, role: PgRole):
    async def check():
        return (await cluster.roles())[name] is role

    return check


def _not_primary(cluster: LocalCluster, name: str):
    async def check():
        return (await cluster.roles())[name] is not PgRole.PRIMARY

    return check


def _ts(event: dict) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return 0.0


def _host_down(cluster: LocalCluster, name: str) -> None:
    """The whole host dies: its supervisor and its postmaster, by PID.
    Blocking (it waits for the process): run it in a thread, so the writer
    and the two-primaries sampler on the event loop keep their pace."""
    pid = cluster.postmaster_pid(name)
    cluster.signal_supervisor(name, signal.SIGKILL)
    cluster.supervisors[name].proc.wait(10)
    for wd in cluster.supervisors[name].watchdog_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(wd, signal.SIGKILL)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_two_data_members_and_a_witness_fail_over(make_cluster):
    cluster = make_cluster(data_names=("db1", "db2"), witness_names=("w1",))
    old, writer, sampler = await _started(cluster)
    os.kill(cluster.postmaster_pid(old), signal.SIGKILL)
    new = await cluster.wait_for("the standby taking over", _new_primary(cluster, old), 30)
    # With ANY 1 and one standby, commits wait until the old primary rejoins.
    await cluster.wait_for("the old primary rejoining", lambda: cluster.healthy(new), 90)
    await _finish(cluster, writer, sampler, expect_primary_not=old)


async def test_one_standby_down_writes_continue_without_failover(make_cluster):
    cluster = make_cluster()
    primary, writer, sampler = await _started(cluster)
    standby = next(n for n in cluster.data_names if n != primary)
    await asyncio.to_thread(_host_down, cluster, standby)
    final = await _finish(cluster, writer, sampler)
    assert final == primary


async def test_both_standbys_down_primary_fences_itself_and_nothing_is_lost(make_cluster):
    cluster = make_cluster()
    primary, writer, sampler = await _started(cluster)
    standbys = [n for n in cluster.data_names if n != primary]
    for name in standbys:
        await asyncio.to_thread(_host_down, cluster, name)
    # docs/design.md §7: without a majority the leader cannot hold its lease,
    # so it fences itself rather than stay a primary nobody can vouch for.
    # (Right after the fence it restarts as a standby: "no longer primary" is the check.)
    await cluster.wait_for("the lone primary fencing itself", _not_primary(cluster, primary), 10)
    acked_while_alone = len(writer.acked)
    await asyncio.sleep(1.0)
    assert len(writer.acked) == acked_while_alone  # nothing acknowledged without a standby
    for name in standbys:
        cluster.start(name)
    await cluster.wait_for("the cluster back with one primary", cluster.healthy, 120)
    await _finish(cluster, writer, sampler)
