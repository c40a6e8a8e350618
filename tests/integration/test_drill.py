"""`failoverctl drill` against three `failoverd run` supervisors on real
PostgreSQL: a drill to a named member and one to the best standby (JSON and
text output), each with its timeline, a write pause, no lost probe write and
a note in the replicated history; a drill the cluster refuses fails with
exit 1 and is recorded as failed. A sampler checks that two servers are
never out of recovery at once throughout."""

from __future__ import annotations

import json

import asyncpg
import pytest
from test_failoverctl import _listed_primary

from failoverd.ctl.drill import AFTER_ACKS, TABLE, WARM_UP_ACKS
from tests.support.cluster import DualPrimarySampler, LocalCluster


@pytest.fixture
def cluster(base_dir, bin_dir, os_user, owner):
    c = LocalCluster(base_dir, bin_dir, os_user, owner)
    yield c
    c.cleanup()


def _dsn(cluster: LocalCluster) -> str:
    """Every member over its Unix socket (where the superuser may log in), as
    an operator would pass the VIP or the members' addresses with --dsn."""
    hosts, ports = cluster.dsn_hosts()
    return f"postgresql:///postgres?host={','.join(hosts)}&port={','.join(map(str, ports))}&user=postgres"


async def _history(cluster: LocalCluster) -> list[dict]:
    done = await cluster.actl("history", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["history"]


async def _rows_by_run(cluster: LocalCluster, primary: str) -> dict[int, int]:
    adapter = cluster.adapters[primary]
    conn = await asyncpg.connect(
        host=str(adapter.socket_dir), port=adapter.pg.port, user="postgres", database="postgres", timeout=5
    )
    try:
        rows = await conn.fetch(f"SELECT run, count(*) AS n FROM {TABLE} GROUP BY run")
    finally:
        await conn.close()
    return {r["run"]: r["n"] for r in rows}


async def test_drill_switches_over_measures_and_records(cluster: LocalCluster) -> None:
    cluster.start_all()
    old = await cluster.wait_for("a primary with every standby streaming", cluster.healthy, timeout_s=90)
    await cluster.wait_for("failoverctl seeing the primary", _listed_primary(cluster, old), 30)
    target = next(n for n in cluster.data_names if n != old)
    sampler = DualPrimarySampler(cluster)
    sampler.start()
    try:
        # Without --force and without a terminal: not confirmed, nothing switched over.
        done = await cluster.actl("drill", "--to", target, "--dsn", _dsn(cluster))
        assert done.returncode == 2 and "--force" in done.stderr
        assert await cluster.primary() == old

        done = await cluster.actl("drill", "--to", target, "--force", "--json", "--dsn", _dsn(cluster))
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{cluster.logs()}"
        result = json.loads(done.stdout)
        assert result["ok"] is True and result["error"] is None and result["recorded"] is True
        assert (result["old_primary"], result["new_primary"]) == (old, target)
        assert result["lost"] == 0 and result["lost_ids"] == []
        assert result["acked"] >= WARM_UP_ACKS + AFTER_ACKS
        assert 0 < result["write_pause_s"] < 30
        phases = {p["what"]: p for p in result["phases"]}
        assert phases["switchover requested"]["at_s"] == 0.0
        assert phases[f"{target} caught up"]["at_s"] is None
        assert "not exposed by the API" in phases[f"{target} caught up"]["source"]
        assert (
            phases[f"VIP on {target}"]["at_s"] is None and phases[f"VIP on {target}"]["source"] == "no [vip] configured"
        )
        for what in (f"{target} elected", f"{target} promoted", f"last write on {old}", f"first write on {target}"):
            assert phases[what]["at_s"] is not None, (what, phases)
        assert "GET /history" in phases[f"{target} elected"]["source"]
        assert "GET /health last_failover" in phases[f"{target} promoted"]["source"]
        first, last = phases[f"first write on {target}"]["at_s"], phases[f"last write on {old}"]["at_s"]
        assert first - last == pytest.approx(result["write_pause_s"], abs=0.002)
        # What the servers say happened comes between the request and the first write.
        assert 0 < phases[f"{target} elected"]["at_s"] <= phases[f"{target} promoted"]["at_s"] < first + 0.1
        assert await cluster.primary() == target
        history = await _history(cluster)
        assert history[-1]["reason"] == result["note"] and result["note"].startswith(f"drill {old}->{target}: ok")
        assert len(result["note"]) <= 200

        # Back to the best standby, as text; the scratch table keeps only the latest drill's rows.
        await cluster.wait_for("the old primary streaming again", lambda: cluster.healthy(target), 60)
        done = await cluster.actl("drill", "--force", "--dsn", _dsn(cluster))
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"drill: switchover from {target} to ")
        assert any(line.startswith("write pause: ") for line in lines)
        assert any(" acknowledged, 0 lost " in line for line in lines if line.startswith("probe writes: "))
        third = await cluster.wait_for("a new primary", cluster.primary, 30)
        assert third != target
        assert len(await _rows_by_run(cluster, third)) == 1
        assert (await _history(cluster))[-1]["reason"].startswith(f"drill {target}->{third}: ok")

        # A drill the cluster refuses (no such member): exit 1, recorded as failed, nothing moved.
        done = await cluster.actl("drill", "--to", "db9", "--force", "--dsn", _dsn(cluster))
        assert done.returncode == 1 and "FAILED: refused:" in done.stdout, done.stdout
        assert (await _history(cluster))[-1]["reason"].startswith(f"drill from {third}: FAILED: refused:")
        assert await cluster.primary() == third
    finally:
        await sampler.stop()
    assert sampler.dual == [], f"two primaries at once: {sampler.dual[:5]}"
    assert sampler.samples > 10
