"""The REST API over real sockets on 127.0.0.1, each server in front of a
small fake supervisor: health checks, the cluster view, metrics, admin
requests with their authentication, forwarding to the leader, and every
malformed input answered 4xx with a reason (never a traceback).

test_api_wiring.py puts the API in front of real supervisors, over TLS, and
inside the daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from failoverd.api import server as api_module
from failoverd.api.server import ApiServer
from failoverd.api.client import ApiClient, client_ssl_context, server_ssl_context
from failoverd.config.load import parse_config
from failoverd.core.actions import Reply, ReplyCode
from failoverd.core.requests import CancelSwitchover, Failover, Pause, RecordEvent, Resume, Switchover
from failoverd.core.state import HistoryEntry, PgObservation, PgRole, Position, StateStamp
from failoverd.adapters.peers import PeerMetrics
from failoverd.runtime.supervisor import ReinitRefused, SupervisorCounters, SupervisorStatus

TOKEN = "unit-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAMES = ("a", "b", "c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(ports: dict[str, int], *, health_auth: bool = False, witness: str | None = None,
                tls: tuple[Path, Path] | None = None) -> str:
    nodes = ""
    for i, name in enumerate(NAMES):
        if name == witness:
            nodes += f'[[nodes]]\nname = "{name}"\nkind = "witness"\npeer = "127.0.0.1:{7400 + i}"\n'
            nodes += f'api = "127.0.0.1:{ports[name]}"\n'
            continue
        nodes += f'[[nodes]]\nname = "{name}"\npeer = "127.0.0.1:{7400 + i}"\napi = "127.0.0.1:{ports[name]}"\n'
        nodes += f'[nodes.postgres]\nport = {5500 + i}\ndata_dir = "/nonexistent/{name}"\n'
    return f"""
[cluster]
name = "unit"
secret_file = "/nonexistent/secret"
[api]
token_file = "/nonexistent/token"
health_auth = {str(health_auth).lower()}
{"" if tls is None else f'tls_cert = "{tls[0]}"{chr(10)}tls_key = "{tls[1]}"{chr(10)}tls_ca = "{tls[0]}"'
                        f'{chr(10)}tls_client_ca = "{tls[0]}"'}
[vip]
address = "198.18.0.100/24"
interface = "eth0"
{nodes}"""


def status(name: str, *, role: str = "follower", leader: str | None = "a", leader_live: bool = True,
           pg_role: PgRole | None = PgRole.STANDBY, position: Position | None = Position(1, 1000),
           following: str | None = "a", lease: float | None = None, primary_ready: bool = False,
           primary_position: Position | None = Position(1, 1000), **more: Any) -> SupervisorStatus:
    pg = None if pg_role is None else PgObservation(pg_role, 0.0, position, following)
    base = dict(name=name, role=role, term=3, leader=leader, pg=pg, lease_remaining_s=lease,
                primary_ready=primary_ready, vip_held=False, paused=False, leader_live=leader_live,
                primary_position=primary_position, pg_age_s=0.05, state_stamp=StateStamp(3, 7))
    return SupervisorStatus(**{**base, **more})


def leader_status(name: str = "a", **more: Any) -> SupervisorStatus:
    values = dict(role="leader", leader=name, pg_role=PgRole.PRIMARY, following=None, lease=0.6,
                  primary_ready=True, position=Position(1, 5000), primary_position=Position(1, 5000), vip_held=True)
    return status(name, **{**values, **more})


class FakeSupervisor:
    def __init__(self, st: SupervisorStatus) -> None:
        self.st = st
        self.counters = SupervisorCounters()
        self.calls: list[tuple[str, Any]] = []
        self.reply = (ReplyCode.OK, "done")
        self.checkpoint_error: Exception | None = None
        self.reinit_refusal: str | None = None
        self.on_request: Any = None  # called with each request after it is recorded

    def status(self) -> SupervisorStatus:
        return dataclasses.replace(self.st)

    async def request(self, req: Any) -> Reply:
        self.calls.append(("request", req))
        if self.on_request is not None:
            self.on_request(req)
        return Reply(req.request_id, *self.reply)

    async def checkpoint(self, timeout_s: float) -> None:
        self.calls.append(("checkpoint", timeout_s))
        if self.checkpoint_error is not None:
            raise self.checkpoint_error

    async def reinit(self) -> str:
        self.calls.append(("reinit", None))
        if self.reinit_refusal is not None:
            raise ReinitRefused(self.reinit_refusal)
        return f"rebuilding {self.st.name} from a"

    def requests(self) -> list[Any]:
        return [detail for what, detail in self.calls if what == "request"]


class Cluster:
    """ApiServers for some members (the others are down), in front of fakes."""

    def __init__(self, statuses: dict[str, SupervisorStatus], *, token: str | None = TOKEN,
                 health_auth: bool = False, witness: str | None = None, down: tuple[str, ...] = (),
                 tls: tuple[Path, Path] | None = None) -> None:
        self.ports = {n: free_port() for n in NAMES}
        self.config_text = config_text(self.ports, health_auth=health_auth, witness=witness, tls=tls)
        self.config = parse_config(self.config_text, source="unit.toml")
        self.fakes = {n: FakeSupervisor(st) for n, st in statuses.items()}
        self.peer_metrics = PeerMetrics()
        self._token, self._down = token, down
        self.servers: dict[str, ApiServer] = {}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Cluster:
        # Built on the loop that serves them (aiohttp binds sessions to it).
        client_tls = client_ssl_context(self.config.api)
        for n, fake in self.fakes.items():
            if n in self._down:
                continue
            node = next(x for x in self.config.nodes if x.name == n)
            self.servers[n] = server = ApiServer(
                self.config, node, fake, host="127.0.0.1", port=self.ports[n], token=self._token,
                peer_metrics=self.peer_metrics, ssl_context=server_ssl_context(self.config.api),
                client=ApiClient(token=self._token, ssl_context=client_tls))
            await server.start()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.session.close()
        for server in self.servers.values():
            await server.close()
            await server.client.close()

    async def call(self, member: str, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, aiohttp.ClientResponse]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        url = f"http://127.0.0.1:{self.ports[member]}{path}"
        async with self.session.request(method, url, data=data, headers=headers or {}) as resp:
            text = await resp.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, parsed, resp


def three(**leader_more: Any) -> dict[str, SupervisorStatus]:
    return {"a": leader_status(**leader_more),
            "b": status("b", position=Position(1, 4000), primary_position=Position(1, 5000)),
            "c": status("c", position=Position(1, 3000), primary_position=Position(1, 5000))}


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster(three()) as c:
        yield c


# ------------------------------------------------------------------ health


async def test_health_reports_the_member(cluster: Cluster) -> None:
    code, body, _ = await cluster.call("b", "GET", "/health")
    assert code == 200
    assert body["name"] == "b" and body["role"] == "follower" and body["leader"] == "a" and body["term"] == 3
    assert body["postgres"] == {
        "host": "127.0.0.1", "port": 5501, "state": "standby", "timeline": 1, "lsn": "0/FA0", "lsn_bytes": 4000,
        "following": "a", "streaming": True, "observed_s_ago": 0.05,
    }
    assert body["lag_bytes"] == 1000 and body["paused"] is False and body["writable"] is False
    assert body["state_version"] == [3, 7] and body["api"] == f"127.0.0.1:{cluster.ports['b']}"


async def test_health_is_503_when_postgres_is_not_running() -> None:
    statuses = three()
    statuses["c"] = status("c", pg_role=PgRole.STOPPED, following=None)
    async with Cluster(statuses) as c:
        code, body, _ = await c.call("c", "GET", "/health")
        assert code == 503 and body["postgres"]["state"] == "stopped"


async def test_health_shows_paused_and_a_scheduled_switchover() -> None:
    statuses = three(paused=True, switchover_to="b", switchover_at=1_900_000_000.0)
    async with Cluster(statuses) as c:
        code, body, _ = await c.call("a", "GET", "/health")
    assert code == 200 and body["paused"] is True
    assert body["switchover"] == {"to": "b", "at": 1_900_000_000.0, "at_iso": "2030-03-17T17:46:40Z"}


async def test_witness_health_has_no_postgres() -> None:
    statuses = three()
    statuses["c"] = status("c", pg_role=None, position=None, following=None)
    async with Cluster(statuses, witness="c") as c:
        code, body, _ = await c.call("c", "GET", "/health")
    assert code == 200 and body["kind"] == "witness" and body["postgres"] is None


async def test_primary_only_on_the_writable_leader(cluster: Cluster) -> None:
    assert (await cluster.call("a", "GET", "/primary"))[0] == 200
    assert (await cluster.call("b", "GET", "/primary"))[0] == 503
    async with Cluster(three(lease=0.0)) as expired:
        assert (await expired.call("a", "GET", "/primary"))[0] == 503
    async with Cluster(three(primary_ready=False)) as promoting:
        assert (await promoting.call("a", "GET", "/primary"))[0] == 503
    async with Cluster(three(pg_role=PgRole.STOPPED)) as fenced:
        assert (await fenced.call("a", "GET", "/primary"))[0] == 503


async def test_head_works_for_health_checks(cluster: Cluster) -> None:
    assert (await cluster.call("a", "HEAD", "/primary"))[0] == 200
    assert (await cluster.call("b", "HEAD", "/primary"))[0] == 503


async def test_replica_and_its_lag_bound(cluster: Cluster) -> None:
    assert (await cluster.call("b", "GET", "/replica"))[0] == 200
    assert (await cluster.call("a", "GET", "/replica"))[0] == 503
    # c has 2000 bytes to go: 1/5000 is the primary position its heartbeats carry.
    async with Cluster(three()) as c:
        assert (await c.call("c", "GET", "/replica?lag=2000"))[0] == 200
        assert (await c.call("c", "GET", "/replica?lag=1999"))[0] == 503
        assert (await c.call("c", "GET", "/replica?lag=1kB"))[0] == 503
        assert (await c.call("c", "GET", "/replica?lag=16MB"))[0] == 200
        code, body, _ = await c.call("c", "GET", "/replica?lag=lots")
        assert code == 400 and "lag" in body["error"]


async def test_replica_needs_streaming_and_a_known_lag() -> None:
    statuses = three()
    statuses["b"] = status("b", following=None)  # in recovery, receiver not streaming
    statuses["c"] = status("c", primary_position=None)  # no live primary known
    async with Cluster(statuses) as c:
        assert (await c.call("b", "GET", "/replica"))[0] == 503
        assert (await c.call("c", "GET", "/replica"))[0] == 200
        assert (await c.call("c", "GET", "/replica?lag=100000"))[0] == 503


async def test_read_only_on_primary_and_standbys() -> None:
    statuses = three()
    statuses["c"] = status("c", pg_role=PgRole.STOPPED, following=None)
    async with Cluster(statuses) as c:
        assert [(await c.call(n, "GET", "/read-only"))[0] for n in NAMES] == [200, 200, 503]


async def test_cluster_fans_out_and_marks_the_unreachable() -> None:
    async with Cluster(three(), down=("c",)) as c:
        code, body, _ = await c.call("b", "GET", "/cluster")
    assert code == 200
    assert (body["cluster"], body["answered_by"], body["leader"], body["primary"]) == ("unit", "b", "a", "a")
    assert body["term"] == 3 and body["paused"] is False and body["switchover"] is None
    assert body["vip"] == {"address": "198.18.0.100/24", "holders": ["a"]}
    members = {m["name"]: m for m in body["members"]}
    assert members["a"]["reachable"] and members["a"]["lag_bytes"] == 0 and members["a"]["writable"]
    assert members["b"]["reachable"] and members["b"]["lag_bytes"] == 1000  # 5000 - 4000
    assert members["c"]["reachable"] is False and members["c"]["error"]
    assert members["c"]["postgres"] == {"host": "127.0.0.1", "port": 5502}


async def test_cluster_lag_is_unknown_on_another_timeline() -> None:
    statuses = three(position=Position(2, 100))
    async with Cluster(statuses) as c:
        _, body, _ = await c.call("a", "GET", "/cluster")
    assert {m["name"]: m["lag_bytes"] for m in body["members"]} == {"a": 0, "b": None, "c": None}


async def test_history() -> None:
    entries = (HistoryEntry(1, None, "a", "bootstrap", None, 1_700_000_000.0),
               HistoryEntry(2, "a", "b", "switchover", Position(1, 0x3000060), 1_700_000_100.5))
    async with Cluster(three(history=entries)) as c:
        code, body, _ = await c.call("a", "GET", "/history")
    assert code == 200 and body["member"] == "a" and body["state_version"] == [3, 7]
    assert body["history"] == [
        {"term": 1, "from": None, "to": "a", "reason": "bootstrap", "position": None,
         "wall_time": 1_700_000_000.0, "time": "2023-11-14T22:13:20Z"},
        {"term": 2, "from": "a", "to": "b", "reason": "switchover", "position": "1/0/3000060",
         "wall_time": 1_700_000_100.5, "time": "2023-11-14T22:15:00Z"},
    ]


_SAMPLE = re.compile(r'failoverd_[a-z_]+\{member="[a-z]+"(,[a-z_]+="[^"\\\n]*")*\} (-?[0-9.e+]+|NaN|\+Inf)')


async def test_metrics_are_prometheus_text(cluster: Cluster) -> None:
    fake = cluster.fakes["a"]
    fake.counters.events.update({"election_started": 2, "fence": 1, "vote_granted": 4})
    fake.counters.elected["election"] += 1
    fake.counters.promotions["election"] += 1
    fake.counters.failovers = 1
    fake.counters.last_failover_duration_s = 0.75
    fake.counters.last_failover_wall_time = 1_700_000_000.5
    cluster.peer_metrics.received = 42
    cluster.peer_metrics.rejected["unauthenticated"] += 3
    await cluster.call("a", "POST", "/pause")  # a 401, counted
    code, text, resp = await cluster.call("a", "GET", "/metrics")
    assert code == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP failoverd_[a-z_]+ .+|TYPE failoverd_[a-z_]+ (gauge|counter))", line), line
            continue
        assert _SAMPLE.fullmatch(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['failoverd_role{member="a",role="leader"}'] == 1
    assert samples['failoverd_role{member="a",role="follower"}'] == 0
    assert samples['failoverd_primary{member="a"}'] == 1 and samples['failoverd_term{member="a"}'] == 3
    assert samples['failoverd_lease_remaining_seconds{member="a"}'] == 0.6
    assert samples['failoverd_postgres_state{member="a",state="primary"}'] == 1
    assert samples['failoverd_elections_started_total{member="a"}'] == 2
    assert samples['failoverd_elections_won_total{member="a"}'] == 1
    assert samples['failoverd_failovers_total{member="a"}'] == 1
    assert samples['failoverd_last_failover_duration_seconds{member="a"}'] == 0.75
    assert samples['failoverd_last_failover_timestamp_seconds{member="a"}'] == 1_700_000_000.5
    assert samples['failoverd_fences_total{member="a"}'] == 1
    assert samples['failoverd_peer_messages_received_total{member="a"}'] == 42
    assert samples['failoverd_peer_messages_rejected_total{member="a",reason="unauthenticated"}'] == 3
    assert samples['failoverd_api_requests_rejected_total{member="a",reason="unauthenticated"}'] == 1
    _, text_b, _ = await cluster.call("b", "GET", "/metrics")
    assert 'failoverd_replication_lag_bytes{member="b"} 1000' in text_b


# -------------------------------------------------------------------- auth


async def test_admin_needs_a_bearer_token(cluster: Cluster) -> None:
    code, body, resp = await cluster.call("a", "POST", "/pause")
    assert code == 401 and "Bearer" in body["error"] and resp.headers["WWW-Authenticate"].startswith("Bearer")
    code, body, _ = await cluster.call("a", "POST", "/pause", headers={"Authorization": f"Basic {TOKEN}"})
    assert code == 401
    code, body, _ = await cluster.call("a", "POST", "/pause", headers={"Authorization": "Bearer wrong-token"})
    assert code == 403 and body == {"error": "the token is not valid"}
    assert cluster.fakes["a"].calls == []


async def test_admin_disabled_without_a_token_file() -> None:
    async with Cluster(three(), token=None) as c:
        code, body, _ = await c.call("a", "POST", "/pause", headers=AUTH)
        assert code == 403 and "token_file" in body["error"]
        assert (await c.call("a", "GET", "/health"))[0] == 200  # reads stay open
        assert c.fakes["a"].calls == []


async def test_health_auth_locks_the_read_endpoints() -> None:
    async with Cluster(three(), health_auth=True) as c:
        for path in ("/health", "/primary", "/replica", "/read-only", "/cluster", "/history", "/metrics"):
            assert (await c.call("a", "GET", path))[0] == 401, path
            assert (await c.call("a", "GET", path, headers={"Authorization": "Bearer nope"}))[0] == 403, path
        assert (await c.call("a", "GET", "/primary", headers=AUTH))[0] == 200
        # The fan-out carries the member's own token to the others.
        _, body, _ = await c.call("a", "GET", "/cluster", headers=AUTH)
        assert all(m["reachable"] for m in body["members"])


# --------------------------------------------------------------- malformed

MALFORMED = [
    ("POST", "/switchover", b"{not json", "not valid JSON"),
    ("POST", "/switchover", b"[1, 2]", "JSON object"),
    ("POST", "/switchover", b'{"to": "b", "when": 5}', "unknown field 'when'"),
    ("POST", "/switchover", b'{"to": 5}', "to: not a string"),
    ("POST", "/switchover", b'{"to": "zz"}', "to: 'zz' is not a member"),
    ("POST", "/switchover", b'{"at": "yesterday"}', "not an ISO 8601 time"),
    ("POST", "/switchover", b'{"at": "2031-01-01T00:00:00"}', "give a time zone"),
    ("POST", "/switchover", b'{"at": 1000}', "is in the past"),
    ("POST", "/switchover", b'{"at": 1e300}', "days ahead"),
    ("POST", "/switchover", b'{"at": true}', "at: not"),
    ("POST", "/failover", b"{}", "to: missing"),
    ("POST", "/failover", b'{"to": "b", "allow_data_loss": "yes"}', "allow_data_loss: not true or false"),
    ("POST", "/failover", b'{"to": "b", "allow_data_loss": 1}', "allow_data_loss: not true or false"),
    ("POST", "/reinit", b'{"node": null}', "node: missing"),
    ("POST", "/history", b'{"reason": ""}', "1 to 200 characters"),
    ("POST", "/history", b'{"reason": "' + b"x" * 201 + b'"}', "1 to 200 characters"),
    ("POST", "/pause", b'{"force": true}', "unknown field 'force'"),
    ("POST", "/pause?now=1", b"", "unknown query parameter 'now'"),
    ("GET", "/health?verbose=1", b"", "unknown query parameter 'verbose'"),
    ("POST", "/switchover", b"[" * 100_000, "not valid JSON"),
]


@pytest.mark.parametrize(("method", "path", "raw", "reason"), MALFORMED, ids=[f"{m[1]}:{m[3]}" for m in MALFORMED])
async def test_malformed_requests_get_400_with_a_reason(cluster: Cluster, method: str, path: str, raw: bytes,
                                                        reason: str) -> None:
    if len(raw) > api_module.BODY_BYTES_MAX:
        raw = raw[: api_module.BODY_BYTES_MAX]
    code, body, _ = await cluster.call("a", method, path, raw=raw, headers=AUTH)
    assert code == 400 and reason in body["error"], body
    assert cluster.fakes["a"].requests() == []


async def test_unknown_paths_methods_and_huge_bodies(cluster: Cluster) -> None:
    code, body, _ = await cluster.call("a", "GET", "/nope")
    assert code == 404 and "no such endpoint" in body["error"]
    code, body, resp = await cluster.call("a", "GET", "/pause", headers=AUTH)
    assert code == 405 and "POST" in resp.headers["Allow"] and "not allowed" in body["error"]
    code, body, _ = await cluster.call("a", "POST", "/pause", raw=b" " * (api_module.BODY_BYTES_MAX + 1), headers=AUTH)
    assert code == 413 and "exceeds" in body["error"]


async def test_a_failing_handler_answers_500_without_a_traceback(cluster: Cluster) -> None:
    def broken() -> SupervisorStatus:
        raise RuntimeError("secret internals")

    cluster.fakes["a"].status = broken  # type: ignore[method-assign]
    code, body, _ = await cluster.call("a", "GET", "/health")
    assert code == 500 and body == {"error": "internal error"}
    assert (await cluster.call("b", "GET", "/health"))[0] == 200  # the server keeps serving


# ----------------------------------------------------------- admin requests


async def test_pause_resume_and_notes_on_the_leader(cluster: Cluster) -> None:
    fake = cluster.fakes["a"]
    code, body, _ = await cluster.call("a", "POST", "/pause", headers=AUTH)
    assert code == 200 and body == {"ok": True, "message": "done", "member": "a"}
    await cluster.call("a", "POST", "/resume", headers=AUTH)
    await cluster.call("a", "DELETE", "/switchover", headers=AUTH)
    await cluster.call("a", "POST", "/history", body={"reason": "drill ok"}, headers=AUTH)
    kinds = [type(r) for r in fake.requests()]
    assert kinds == [Pause, Resume, CancelSwitchover, RecordEvent]
    assert fake.requests()[-1].reason == "drill ok"
    assert len({r.request_id for r in fake.requests()}) == 4


async def test_a_refusal_by_the_core_is_409_with_its_reason(cluster: Cluster) -> None:
    cluster.fakes["a"].reply = (ReplyCode.CONFLICT, "b lags by 99999 bytes (limit 16777216)")
    code, body, _ = await cluster.call("a", "POST", "/switchover", body={"to": "b"}, headers=AUTH)
    assert code == 409 and body == {"ok": False, "error": "b lags by 99999 bytes (limit 16777216)", "member": "a"}


async def test_switchover_now_checkpoints_first(cluster: Cluster) -> None:
    fake = cluster.fakes["a"]
    code, _, _ = await cluster.call("a", "POST", "/switchover", body={"to": "b"}, headers=AUTH)
    assert code == 200
    assert [what for what, _ in fake.calls] == ["checkpoint", "request"]
    req = fake.requests()[0]
    assert isinstance(req, Switchover) and (req.target, req.at) == ("b", None)


async def test_a_failed_checkpoint_does_not_stop_the_switchover(cluster: Cluster, _captured_logs) -> None:
    fake = cluster.fakes["a"]
    fake.checkpoint_error = TimeoutError()
    code, _, _ = await cluster.call("a", "POST", "/switchover", body={}, headers=AUTH)
    assert code == 200 and isinstance(fake.requests()[0], Switchover) and fake.requests()[0].target is None
    assert any(e["event"] == "pg_checkpoint_failed" for e in _captured_logs)


async def test_no_checkpoint_when_paused_or_scheduled() -> None:
    async with Cluster(three(paused=True)) as c:
        await c.call("a", "POST", "/switchover", body={"to": "b"}, headers=AUTH)
        assert [what for what, _ in c.fakes["a"].calls] == ["request"]
    async with Cluster(three()) as c:
        at = time.time() + 3600
        await c.call("a", "POST", "/switchover", body={"to": "b", "at": at}, headers=AUTH)
        code, _, _ = await c.call("a", "POST", "/switchover", body={"at": "2099-01-01T00:00:00Z"}, headers=AUTH)
        assert code == 400  # more than 30 days ahead
        await c.call("a", "POST", "/switchover", body={"at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00",
                                                                            time.gmtime(at))}, headers=AUTH)
        reqs = c.fakes["a"].requests()
        assert [what for what, _ in c.fakes["a"].calls] == ["request", "request"]
        assert reqs[0].at == at and reqs[1].at == float(int(at))


async def test_scheduled_switchover_gets_a_checkpoint_shortly_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_module, "SCHEDULE_POLL_S", 0.02)
    async with Cluster(three(switchover_to="b", switchover_at=time.time() + 60)) as c:
        await asyncio.sleep(0.2)
        assert c.fakes["a"].calls == []  # not yet: 60 s to go
        c.fakes["a"].st = dataclasses.replace(c.fakes["a"].st, switchover_at=time.time() + 5)
        await asyncio.sleep(0.2)
        assert [what for what, _ in c.fakes["a"].calls] == ["checkpoint"]  # once, not at every poll


async def test_followers_forward_admin_requests_to_the_leader(cluster: Cluster) -> None:
    code, body, _ = await cluster.call("c", "POST", "/pause", headers=AUTH)
    assert code == 200 and body["member"] == "a" and body["forwarded_by"] == "c"
    assert [type(r) for r in cluster.fakes["a"].requests()] == [Pause]
    assert cluster.fakes["c"].calls == []
    # The caller's credentials travel with it: a wrong token is refused (by c, before forwarding).
    code, _, _ = await cluster.call("c", "POST", "/pause", headers={"Authorization": "Bearer bad"})
    assert code == 403 and len(cluster.fakes["a"].requests()) == 1


async def test_forwarding_when_the_leader_is_down_or_unknown() -> None:
    async with Cluster(three(), down=("a",)) as c:
        code, body, _ = await c.call("b", "POST", "/pause", headers=AUTH)
        assert code == 502 and "cannot reach a" in body["error"]
    statuses = three()
    statuses["b"] = status("b", leader=None, leader_live=False)
    async with Cluster(statuses) as c:
        code, body, _ = await c.call("b", "POST", "/resume", headers=AUTH)
        assert code == 503 and "no live leader" in body["error"]


async def test_a_forwarded_request_is_never_forwarded_again(cluster: Cluster) -> None:
    headers = {**AUTH, "X-Failoverd-Forwarded-By": "c"}
    code, body, _ = await cluster.call("b", "POST", "/pause", headers=headers)
    assert code == 503 and "b is not the leader" in body["error"]
    assert all(f.calls == [] for f in cluster.fakes.values())


async def test_failover_goes_to_the_leader_when_one_is_alive(cluster: Cluster) -> None:
    code, body, _ = await cluster.call("b", "POST", "/failover", body={"to": "c"}, headers=AUTH)
    assert code == 200 and body["member"] == "a"
    req = cluster.fakes["a"].requests()[0]
    assert isinstance(req, Failover) and (req.target, req.allow_data_loss) == ("c", False)


async def test_failover_without_a_live_leader_goes_to_the_target() -> None:
    orphaned = {n: status(n, leader=None, leader_live=False, primary_position=None) for n in NAMES}
    async with Cluster(orphaned, down=()) as c:
        code, body, _ = await c.call("a", "POST", "/failover", body={"to": "c", "allow_data_loss": True},
                                     headers=AUTH)
        assert code == 200 and body["member"] == "c" and body["forwarded_by"] == "a"
        req = c.fakes["c"].requests()[0]
        assert isinstance(req, Failover) and (req.target, req.allow_data_loss) == ("c", True)
        code, body, _ = await c.call("b", "POST", "/failover", body={"to": "b"}, headers=AUTH)
        assert code == 200 and body["member"] == "b" and "forwarded_by" not in body
        assert c.fakes["a"].calls == []


async def test_reinit_goes_to_the_named_member(cluster: Cluster) -> None:
    code, body, _ = await cluster.call("a", "POST", "/reinit", body={"node": "c"}, headers=AUTH)
    assert code == 202 and body["member"] == "c" and body["message"] == "rebuilding c from a"
    assert cluster.fakes["c"].calls == [("reinit", None)] and cluster.fakes["a"].calls == []
    cluster.fakes["b"].reinit_refusal = "b's PostgreSQL is a primary"
    code, body, _ = await cluster.call("b", "POST", "/reinit", body={"node": "b"}, headers=AUTH)
    assert code == 409 and body["error"] == "b's PostgreSQL is a primary"
    code, body, _ = await cluster.call("b", "POST", "/reinit", body={"node": "c"},
                                       headers={**AUTH, "X-Failoverd-Forwarded-By": "a"})
    assert code == 409 and "not c" in body["error"]
