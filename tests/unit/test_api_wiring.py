"""The API wired to the rest: in front of real Supervisors (fake PostgreSQL,
from test_supervisor) whose status and counters it reports, over TLS with
client certificates, and started and stopped by the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from test_api_server import AUTH, NAMES, TOKEN, Cluster, config_text, three

from failoverd.api.client import ApiClient, Unreachable, client_ssl_context
from failoverd.api.server import ApiServer
from failoverd.config.load import parse_config
from failoverd.core.actions import ReplyCode
from failoverd.core.requests import Pause, Reinit
from failoverd.core.state import PgRole, Role
from tests.support import free_port, wait_for

# ------------------------------------------- in front of real supervisors


async def test_real_supervisors_report_status_and_count_a_failover() -> None:
    from test_supervisor import Cluster as SupervisorCluster
    from test_supervisor import _ready

    started_at, started_wall = time.monotonic(), time.time()
    async with SupervisorCluster() as c:
        await c.wait_for(lambda: _ready(c))
        old = c.primaries()[0]
        st = c.sups[old].status()
        assert st.role is Role.LEADER and st.leader_live and st.primary_ready and st.writable
        assert st.primary_position == c.sups[old].node.pg.position and st.history[-1].reason == "bootstrap"
        assert st.last_failover is None  # the bootstrap replaced no primary
        counters = c.sups[old].counters
        assert counters.elected == {"bootstrap": 1} and counters.promotions == {"bootstrap": 1}
        assert counters.failovers == 0
        assert counters.events["promoted"] == 1
        follower = next(n for n in c.sups if n != old)
        # The follower reports streaming from its own next probe, which may
        # come after the heartbeat that told it the primary's position.
        await c.wait_for(
            lambda: (
                c.sups[follower].status().primary_position is not None and c.sups[follower].status().streaming_standby
            )
        )
        fst = c.sups[follower].status()
        assert fst.leader == old and fst.leader_live and fst.role is Role.FOLLOWER and fst.streaming_standby

        c.pgs[old].role = PgRole.STOPPED  # the postmaster died
        await c.wait_for(lambda: len(c.primaries()) == 1 and c.primaries()[0] != old)
        new = c.primaries()[0]
        await c.wait_for(lambda: c.sups[new].counters.failovers == 1)
        seen_at, seen_wall = time.monotonic(), time.time()
        failover = c.sups[new].status().last_failover
        assert failover is not None and failover.term == c.sups[new].node.term and failover.reason != "bootstrap"
        # Measured from the last heartbeat heard from the old leader to the
        # promotion seen: an interval inside the one this test watched (the
        # cluster started after started_at; the promotion was seen by
        # seen_at), whatever the speed of the machine. And labelled with the
        # wall time of the promotion, inside the same span.
        assert failover.outage_s is not None
        assert 0 < failover.outage_s <= seen_at - started_at
        assert failover.wall_time is not None and started_wall <= failover.wall_time <= seen_wall
        assert c.sups[new].counters.promotions.get("bootstrap") is None

        ports = {n: free_port() for n in NAMES}
        config = parse_config(config_text(ports), source="unit.toml")
        servers = [
            ApiServer(config, node, c.sups[node.name], host="127.0.0.1", port=ports[node.name], token=TOKEN)
            for node in config.nodes
        ]
        for server in servers:
            await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                codes = {}
                for n in NAMES:
                    async with session.get(f"http://127.0.0.1:{ports[n]}/primary") as resp:
                        codes[n] = resp.status
                assert codes == {n: 200 if n == new else 503 for n in NAMES}
                async with session.get(f"http://127.0.0.1:{ports[new]}/metrics") as resp:
                    text = await resp.text()
                assert f'failoverd_failovers_total{{member="{new}"}} 1' in text
                assert f'failoverd_last_failover_duration_seconds{{member="{new}"}} {failover.outage_s!r}' in text
                async with session.get(f"http://127.0.0.1:{ports[new]}/health") as resp:
                    health = await resp.json()
                assert health["last_failover"]["term"] == failover.term
                assert health["last_failover"]["duration_s"] == failover.outage_s
        finally:
            for server in servers:
                await server.close()


async def test_admin_requests_through_the_api_reach_the_leaders_core() -> None:
    from test_supervisor import Cluster as SupervisorCluster
    from test_supervisor import _ready

    async with SupervisorCluster() as c:
        await c.wait_for(lambda: _ready(c))
        leader = c.leader()
        follower = next(n for n in c.sups if n != leader)
        await c.wait_for(lambda: c.sups[follower].status().leader_live)
        ports = {n: free_port() for n in NAMES}
        config = parse_config(config_text(ports), source="unit.toml")
        servers = [
            ApiServer(config, node, c.sups[node.name], host="127.0.0.1", port=ports[node.name], token=TOKEN)
            for node in config.nodes
        ]
        for server in servers:
            await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                # The follower's core redirects; its API forwards to the leader's.
                # The fakes' lease is 0.12 s, so a loaded machine may briefly
                # leave the follower without a live leader: 503, "retry
                # shortly", which is what a client then does.
                deadline = time.monotonic() + 5.0
                while True:
                    async with session.post(f"http://127.0.0.1:{ports[follower]}/pause", headers=AUTH) as resp:
                        body = await resp.json()
                    if resp.status != 503 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                leader = c.leader()
                assert resp.status == 200 and body == {
                    "ok": True,
                    "message": "paused",
                    "member": leader,
                    "forwarded_by": follower,
                }
                assert c.sups[leader].status().paused
                # A reinit goes to the member it names, whose core refuses a primary's.
                async with session.post(
                    f"http://127.0.0.1:{ports[follower]}/reinit", json={"node": leader}, headers=AUTH
                ) as resp:
                    body = await resp.json()
                assert resp.status == 409 and body["member"] == leader and "only a follower" in body["error"]
        finally:
            for server in servers:
                await server.close()


async def test_real_supervisor_reinit_runs_in_the_postgres_worker() -> None:
    from test_supervisor import Cluster as SupervisorCluster
    from test_supervisor import _ready

    c = SupervisorCluster()
    async with c:
        await c.wait_for(lambda: _ready(c))
        leader = c.primaries()[0]
        follower = next(n for n in c.sups if n != leader)
        await c.wait_for(lambda: c.sups[follower].status().leader_live)
        reply = await c.sups[leader].request(Reinit(1, leader))
        assert reply.code is ReplyCode.CONFLICT and "only a follower" in reply.message
        reply = await c.sups[leader].request(Reinit(2, follower))
        assert (reply.code, reply.redirect) == (ReplyCode.REDIRECT, follower)
        gate = c.pgs[follower].gates["reinit"] = asyncio.Event()
        reply = await c.sups[follower].request(Reinit(3, follower))
        assert reply.ok and reply.message == f"rebuilding {follower} from {leader}"
        reply = await c.sups[follower].request(Reinit(4, follower))
        assert reply.code is ReplyCode.CONFLICT and "already running" in reply.message
        assert c.sups[follower].status().rebuild.running
        gate.set()
        await c.wait_for(lambda: not c.sups[follower].status().rebuild.running)
        rebuild = c.sups[follower].status().rebuild
        assert rebuild.leader == leader and rebuild.error is None and rebuild.finished_at is not None
        assert [(w, d) for w, k, d in c.journal.entries if k == "reinit"] == [(follower, leader)]
        await c.wait_for(lambda: c.sups[follower].status().streaming_standby)


# --------------------------------------------------------------------- TLS


async def test_tls_with_client_certificates(tls_files: tuple[Path, Path]) -> None:
    async with Cluster(three(), tls=tls_files) as c:
        node = c.config.nodes[1]
        async with ApiClient(ssl_context=client_ssl_context(c.config.api)) as client:
            answer = await client.call(node.api, "GET", "/health")
            assert answer.status == 200 and answer.body["name"] == "b"
            # Forwarding and the fan-out go over TLS too, with the member's own certificate.
            answer = await client.call(node.api, "GET", "/cluster")
            assert all(m["reachable"] for m in answer.body["members"])
        without_cert = ssl.create_default_context(cafile=str(tls_files[0]))
        async with ApiClient(token=TOKEN, ssl_context=without_cert) as client:
            # Refused in the handshake (with TLS 1.3 the client only learns so
            # after sending, so it cannot call the request undelivered).
            with pytest.raises(Unreachable):
                await client.call(node.api, "POST", "/pause")
        assert c.fakes["a"].calls == []
        async with ApiClient(token=TOKEN, ssl_context=client_ssl_context(c.config.api)) as client:
            answer = await client.call(node.api, "POST", "/pause")
        assert answer.status == 200 and answer.body["forwarded_by"] == "b"
        assert [type(r) for r in c.fakes["a"].requests()] == [Pause]
        assert [type(r) for r in c.fakes["b"].requests()] == [Pause]  # b's core redirected it to a
        # Plain HTTP to a TLS member: no answer, and nothing reaches the core.
        async with ApiClient(token=TOKEN) as client:
            with pytest.raises(Unreachable):
                await client.call(node.api, "POST", "/pause")
        assert len(c.fakes["a"].requests()) == 1


# ---------------------------------------------------------- daemon wiring


def _witness_config(tmp_path: Path, api_port: int, token_mode: int = 0o600):
    secret, token = tmp_path / "secret", tmp_path / "token"
    secret.write_text("unit-test-secret-0123456789")
    token.write_text(TOKEN)
    secret.chmod(0o600)
    token.chmod(token_mode)
    text = config_text({"a": free_port(), "b": free_port(), "c": api_port}, witness="c")
    text = text.replace("/nonexistent/secret", str(secret)).replace("/nonexistent/token", str(token))
    text = text.replace('peer = "127.0.0.1:7402"', f'peer = "127.0.0.1:{free_port()}"')
    text = text.replace("[cluster]\n", f'[cluster]\nstate_dir = "{tmp_path / "state"}"\n')
    return parse_config(text, source="unit.toml", node="c")


async def test_daemon_serves_the_api_and_stops_it() -> None:
    from failoverd.daemon import run_daemon

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        task = asyncio.create_task(run_daemon(_witness_config(Path(tmp), port)))
        try:
            async with aiohttp.ClientSession() as session:

                async def health() -> tuple[int, dict] | None:
                    assert not task.done(), task  # the daemon must not have stopped (or failed)
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                            return resp.status, await resp.json()
                    except aiohttp.ClientConnectionError:
                        return None  # not listening yet

                status, body = await wait_for("the daemon's API answering", health, 10)
                assert status == 200 and body["name"] == "c" and body["kind"] == "witness"
                async with session.post(f"http://127.0.0.1:{port}/pause", headers=AUTH) as resp:
                    assert resp.status == 503  # no leader: a and b are not running
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # closed on shutdown


async def test_daemon_start_up_errors_are_one_line(tmp_path: Path) -> None:
    from failoverd.daemon import StartupError, run_daemon

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "one").mkdir()
        with pytest.raises(StartupError) as caught:
            await run_daemon(_witness_config(tmp_path / "one", port))
        text = str(caught.value)
        assert text.startswith(f"API address 127.0.0.1:{port} ([api] listen / nodes.api): ")
        assert "address already in use" in text.lower() and "\n" not in text
    (tmp_path / "two").mkdir()
    with pytest.raises(StartupError, match=r"token file .* chmod 600"):
        await run_daemon(_witness_config(tmp_path / "two", free_port(), token_mode=0o640))
