"""The REST API of three `failoverd run` supervisors on real PostgreSQL:
health checks agree with what the servers really are, the cluster view,
history and metrics, authentication, and admin requests sent to any member
(forwarded to the leader): pause, a refused switchover, a switchover, a
scheduled one, cancelling one, history notes."""

from __future__ import annotations

import asyncio
import re
import time

from test_cluster import _finish, _started

from failoverd.core.state import PgRole
from tests.support.cluster import LocalCluster


async def _api_primary(cluster: LocalCluster, expect: str | None = None) -> str | None:
    """The member whose /primary answers 200, once exactly one does."""
    codes = {n: (await cluster.api(n, "GET", "/primary", token=None))[0] for n in cluster.data_names}
    ok = [n for n, c in codes.items() if c == 200]
    if len(ok) != 1 or (expect is not None and ok[0] != expect):
        return None
    return ok[0]


async def _all_streaming(cluster: LocalCluster) -> bool:
    status, view = await cluster.api(cluster.data_names[0], "GET", "/cluster", token=None)
    return (
        status == 200
        and view["primary"] is not None
        and all(m["reachable"] and (m["writable"] or m["postgres"]["streaming"]) for m in view["members"])
    )


async def test_read_endpoints_match_the_servers_and_auth_is_enforced(make_cluster):
    cluster = make_cluster()
    cluster.start_all()
    primary = await cluster.wait_for("a primary with every standby streaming", cluster.healthy, timeout_s=90)
    await cluster.wait_for("the API agreeing", lambda: _api_primary(cluster, primary), 30)
    await cluster.wait_for("every standby streaming, as the API sees it", lambda: _all_streaming(cluster), 30)
    standbys = [n for n in cluster.data_names if n != primary]
    roles = await cluster.roles()
    assert roles[primary] is PgRole.PRIMARY and all(roles[s] is PgRole.STANDBY for s in standbys)

    for name in cluster.data_names:
        status, body = await cluster.api(name, "GET", "/health", token=None)
        assert status == 200 and body["name"] == name and body["paused"] is False
        assert body["postgres"]["state"] == roles[name].value and body["postgres"]["timeline"] >= 1
        expected_replica = 503 if name == primary else 200
        assert (await cluster.api(name, "GET", "/replica", token=None))[0] == expected_replica
        assert (await cluster.api(name, "GET", "/replica?lag=1GB", token=None))[0] == expected_replica
        assert (await cluster.api(name, "GET", "/read-only", token=None))[0] == 200
    status, body = await cluster.api(standbys[0], "GET", "/replica?lag=a-lot", token=None)
    assert status == 400 and "lag" in body["error"]

    status, view = await cluster.api(standbys[0], "GET", "/cluster", token=None)
    assert status == 200 and view["answered_by"] == standbys[0]
    assert (view["cluster"], view["leader"], view["primary"], view["paused"]) == ("itest", primary, primary, False)
    members = {m["name"]: m for m in view["members"]}
    assert members[primary]["lag_bytes"] == 0 and members[primary]["lease_remaining_s"] > 0
    assert all(
        isinstance(members[s]["lag_bytes"], int) and members[s]["postgres"]["following"] == primary for s in standbys
    )

    status, body = await cluster.api(standbys[1], "GET", "/history", token=None)
    assert status == 200 and body["history"][0]["reason"] == "bootstrap" and body["history"][0]["to"] == primary

    status, text = await cluster.api(primary, "GET", "/metrics", token=None)
    assert status == 200
    assert f'failoverd_primary{{member="{primary}"}} 1' in text
    assert f'failoverd_promotions_total{{member="{primary}",reason="bootstrap"}} 1' in text
    received = re.search(rf'failoverd_peer_messages_received_total{{member="{primary}"}} (\d+)', text)
    assert received and int(received[1]) > 0

    # Admin: 401 without a token, 403 with a wrong one, 400 for nonsense; nothing changes.
    assert (await cluster.api(standbys[0], "POST", "/pause", token=None))[0] == 401
    assert (await cluster.api(standbys[0], "POST", "/pause", token="not-the-token"))[0] == 403
    status, body = await cluster.api(standbys[0], "POST", "/switchover", body={"to": "db9"})
    assert status == 400 and "not a member" in body["error"]
    status, body = await cluster.api(primary, "POST", "/failover", body={"to": standbys[0], "allow_data_loss": "y"})
    assert status == 400 and "allow_data_loss" in body["error"]
    assert (await cluster.api(primary, "GET", "/health"))[1]["paused"] is False
    assert await cluster.primary() == primary


async def test_admin_requests_through_any_member(make_cluster):
    cluster = make_cluster()
    primary, writer, sampler = await _started(cluster)
    await cluster.wait_for("the API agreeing", lambda: _api_primary(cluster, primary), 30)
    a, b = [n for n in cluster.data_names if n != primary]

    status, body = await cluster.api(a, "POST", "/pause")
    assert status == 200 and body["member"] == primary and body["forwarded_by"] == a
    await cluster.wait_for("every member seeing the pause", _every(cluster, lambda h: h["paused"]), 10)
    status, body = await cluster.api(b, "POST", "/switchover", body={"to": a})
    assert status == 409 and body["error"] == "the cluster is paused"
    assert (await cluster.api(b, "POST", "/resume"))[0] == 200
    await cluster.wait_for("every member seeing the resume", _every(cluster, lambda h: not h["paused"]), 10)

    # A scheduled switchover is kept in the replicated state and can be cancelled.
    status, body = await cluster.api(a, "POST", "/switchover", body={"to": b, "at": time.time() + 3600})
    assert status == 200, body
    await cluster.wait_for(
        "the schedule replicated", _every(cluster, lambda h: (h["switchover"] or {}).get("to") == b), 10
    )
    assert (await cluster.api(b, "DELETE", "/switchover"))[0] == 200
    await cluster.wait_for("the schedule gone", _every(cluster, lambda h: h["switchover"] is None), 10)
    status, body = await cluster.api(b, "DELETE", "/switchover")
    assert status == 409 and "no switchover is scheduled" in body["error"]

    status, body = await cluster.api(b, "POST", "/switchover", body={"to": a})
    assert status == 200 and body["member"] == primary, body
    await cluster.wait_for("the new primary", lambda: cluster.healthy(a), 60)
    await cluster.wait_for("the API agreeing", lambda: _api_primary(cluster, a), 30)
    await _finish(cluster, writer, sampler, expect_primary_not=primary)
    old_events = [(e.get("event"), e.get("action")) for e in cluster.supervisors[primary].log_events()]
    # The CHECKPOINT ran before the switchover began (writes waited only for the shutdown one).
    assert old_events.index(("pg_action_done", "Checkpoint")) < old_events.index(("switchover_started", None))

    status, text = await cluster.api(a, "GET", "/metrics", token=None)
    assert f'failoverd_failovers_total{{member="{a}"}} 1' in text
    duration = re.search(rf'failoverd_last_failover_duration_seconds{{member="{a}"}} ([0-9.e+-]+)', text)
    assert duration and 0 < float(duration[1]) < 30

    status, body = await cluster.api(b, "POST", "/history", body={"reason": "drill: all good"})
    assert status == 200 and body["member"] == a
    status, body = await cluster.api(a, "GET", "/history", token=None)
    reasons = [h["reason"] for h in body["history"]]
    assert reasons[-2:] == ["transfer", "drill: all good"], reasons

    # Due in two seconds: the leader starts it by itself, with its checkpoint first.
    status, body = await cluster.api(b, "POST", "/switchover", body={"to": primary, "at": time.time() + 2})
    assert status == 200, body
    await cluster.wait_for("the scheduled switchover", lambda: cluster.healthy(primary), 60)


def _every(cluster: LocalCluster, check):
    async def all_members() -> bool:
        answers = await asyncio.gather(*(cluster.api(n, "GET", "/health", token=None) for n in cluster.data_names))
        return all(isinstance(body, dict) and check(body) for _, body in answers)

    return all_members
