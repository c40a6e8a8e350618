"""PostgreSQL settings and restarts through failoverd, on three `failoverd run`
supervisors and real PostgreSQL, under a writer: a changed
[postgres.parameters] distributed to the members, `failoverctl reload`
(applied live where PostgreSQL can, reported as pending where it takes a
restart), then `failoverctl restart --rolling --pending-only` (standbys one
at a time, a switchover, the old primary last): nothing acknowledged lost,
never two primaries, every member running the new settings, none pending.
The write gap of the rolling restart is printed (bench/rolling_restart.py
measures it over several runs)."""

from __future__ import annotations

import itertools
import json
import time

import asyncpg
from test_cluster import _finish, _started

from tests.support.cluster import LocalCluster

RELOADED = ("work_mem", "8MB")  # applied by a reload
RESTARTED = ("max_locks_per_transaction", "128")  # only at a restart


def with_parameters(cluster: LocalCluster, parameters: dict[str, str]) -> None:
    """Rewrite the members' shared configuration file with a [postgres.parameters] table."""
    text = cluster.config_path.read_text()
    table = "[postgres.parameters]\n" + "".join(f'{k} = "{v}"\n' for k, v in parameters.items())
    text = text.replace("\n[api]\n", f"\n{table}\n[api]\n", 1)
    cluster.config_path.write_text(text)


async def setting(cluster: LocalCluster, name: str, parameter: str) -> str:
    conn = await asyncpg.connect(
        host=str(cluster.adapters[name].socket_dir),
        port=cluster.pg_ports[name],
        user="postgres",
        database="postgres",
        timeout=5,
    )
    try:
        return str(await conn.fetchval(f"SHOW {parameter}"))
    finally:
        await conn.close()


async def test_reload_then_rolling_restart_under_writes(make_cluster):
    cluster = make_cluster()
    old, writer, sampler = await _started(cluster)
    before = await setting(cluster, old, RESTARTED[0])
    assert before != RESTARTED[1]

    with_parameters(cluster, dict([RELOADED, RESTARTED]))
    done = await cluster.actl("reload", "--json")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    answers = {a["member"]: a for a in json.loads(done.stdout)["members"]}
    assert set(answers) == set(cluster.data_names)
    for name, answer in answers.items():
        assert answer["ok"] is True and answer["refused"] == [], answer
        assert RESTARTED[0] in answer["pending_restart"], answer
        assert await setting(cluster, name, RELOADED[0]) == RELOADED[1]
        assert await setting(cluster, name, RESTARTED[0]) == before  # not until a restart

    started = time.monotonic()
    done = await cluster.actl("restart", "--rolling", "--pending-only", "--force", timeout_s=300)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    lines = done.stdout.splitlines()
    restarted = [line.split()[1] for line in lines if line.startswith("restarting ")]
    # The standbys one at a time, then a switchover, whose stop and start of
    # the old primary as a standby is its restart.
    assert sorted(restarted) == sorted(n for n in cluster.data_names if n != old), lines
    assert lines[-3].startswith(f"switching over from {old} to "), lines
    assert lines[-2].startswith(f"{old} streams again, restarted by the switchover"), lines

    final = await _finish(cluster, writer, sampler, expect_primary_not=old)
    await cluster.wait_for("the cluster whole again", lambda: cluster.healthy(final), 60)
    for name in cluster.data_names:
        assert await setting(cluster, name, RESTARTED[0]) == RESTARTED[1], name
        assert await setting(cluster, name, RELOADED[0]) == RELOADED[1], name
    health = {name: await cluster.api(name, "GET", "/health") for name in cluster.data_names}
    for name, (code, body) in health.items():
        assert body["postgres"]["pending_restart"] == [], (name, code, body)

    times = [t for t in writer.acked_at if t >= started - 1]
    gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
    print(f"rolling restart: {len(restarted) + 1} members in {time.monotonic() - started:.1f} s, write gap {gap:.3f} s")
