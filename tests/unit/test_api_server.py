"""The REST API over real sockets on 127.0.0.1, each server in front of a
small fake supervisor: health checks, the cluster view, metrics, admin
requests with their authentication, the core's reply codes as HTTP statuses,
forwarding where the core redirects, and every malformed input answered 4xx
with a reason (never a traceback).

test_api_wiring.py puts the API in front of real supervisors, over TLS, and
inside the daemon."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from failoverd.adapters.peers import PeerMetrics
from failoverd.api import server as api_module
from failoverd.api.client import ApiClient, client_ssl_context, server_ssl_context
from failoverd.api.server import ApiServer
from failoverd.config.load import parse_config
from failoverd.core import events as ev
from failoverd.core.actions import Reply, ReplyCode
from failoverd.core.requests import (
    AdminRequest,
    CancelSwitchover,
    Failover,
    Pause,
    RecordEvent,
    Reinit,
    Resume,
    Switchover,
)
from failoverd.core.state import HistoryEntry, PgObservation, PgRole, Position, Role, StateStamp
from failoverd.core.status import FailoverRecord, MemberStatus, RebuildStatus
from failoverd.runtime.supervisor import SupervisorCounters
from tests.support import free_port, wait_for

TOKEN = "unit-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FORWARDED = "X-Failoverd-Forwarded-By"
NAMES = ("a", "b", "c")


def config_text(
    ports: dict[str, int],
    *,
    health_auth: bool = False,
    witness: str | None = None,
    tls: tuple[Path, Path] | None = None,
) -> str:
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
{
        ""
        if tls is None
        else f'tls_cert = "{tls[0]}"{chr(10)}tls_key = "{tls[1]}"{chr(10)}tls_ca = "{tls[0]}"'
        f'{chr(10)}tls_client_ca = "{tls[0]}"'
    }
[vip]
address = "198.18.0.100/24"
interface = "eth0"
{nodes}"""


def status(
    name: str,
    *,
    role: str = "follower",
    leader: str | None = "a",
    leader_live: bool = True,
    pg_role: PgRole | None = PgRole.STANDBY,
    position: Position | None = Position(1, 1000),
    following: str | None = "a",
    lease: float | None = None,
    primary_ready: bool = False,
    primary_position: Position | None = Position(1, 1000),
    **more: Any,
) -> MemberStatus:
    """A member's status as its core would report it (core.status.MemberStatus)."""
    pg = None if pg_role is None else PgObservation(pg_role, 0.0, position, following)
    base = dict(
        name=name,
        role=Role(role),
        term=3,
        leader=leader,
        leader_live=leader_live,
        pg=pg,
        pg_age_s=0.05,
        lease_remaining_s=lease,
        promise_s=1.0,
        primary_ready=primary_ready,
        vip_held=False,
        vip_error=None,
        paused=False,
        primary_position=primary_position,
        switchover_to=None,
        switchover_at=None,
        state_stamp=StateStamp(3, 7),
        history=(),
        rebuild=None,
        last_failover=None,
    )
    return MemberStatus(**{**base, **more})


def leader_status(name: str = "a", **more: Any) -> MemberStatus:
    values = dict(
        role="leader",
        leader=name,
        pg_role=PgRole.PRIMARY,
        following=None,
        lease=0.6,
        primary_ready=True,
        position=Position(1, 5000),
        primary_position=Position(1, 5000),
        vip_held=True,
    )
    return status(name, **{**values, **more})


# What a fake core answers: (code, message), or (ReplyCode.REDIRECT, message, member).
Answer = tuple[Any, ...]


def routed(st: MemberStatus, req: AdminRequest) -> Answer:
    """How a core in status `st` routes `req` (failoverd.core.admin), for fakes
    whose test does not say otherwise: a reinit goes to the member it names;
    the leader carries a request out; a follower of a live leader redirects
    to it; with no live leader a failover goes to its target; else nobody can
    answer now."""
    if isinstance(req, Reinit):
        if req.member != st.name:
            return ReplyCode.REDIRECT, f"{req.member} rebuilds itself", req.member
        return ReplyCode.OK, f"rebuilding {st.name} from {st.leader}"
    if st.role is Role.LEADER:
        return ReplyCode.OK, "done"
    if st.leader is not None and st.leader_live:
        return ReplyCode.REDIRECT, f"{st.name} is not the leader; {st.leader} is", st.leader
    if isinstance(req, Failover):
        if req.target == st.name:
            return ReplyCode.OK, f"{st.name} campaigns"
        return ReplyCode.REDIRECT, f"no live leader: the failover goes to {req.target}", req.target
    return ReplyCode.UNAVAILABLE, f"{st.name} knows no live leader; retry shortly"


class FakeSupervisor:
    """Stands in for a supervisor (api.server.SupervisorLike): reports `st`
    and records every request. It answers with `reply` when the test sets one
    (an Answer, or a function of the request returning one), else as a core
    in `st` would route the request (`routed`). With `hold` set, the answer
    waits until the test sets that event, as a leader's core holds a
    switchover's answer until its CHECKPOINT is done."""

    def __init__(self, st: MemberStatus) -> None:
        self.st = st
        self.counters = SupervisorCounters()
        self.calls: list[tuple[str, Any]] = []
        self.reply: Answer | Callable[[AdminRequest], Answer] | None = None
        self.hold: asyncio.Event | None = None
        self.on_request: Any = None  # called with each request after it is recorded
        self.pending: tuple[str, ...] = ()  # settings that wait for a restart

    def status(self) -> MemberStatus:
        return self.st

    def pending_restart(self) -> tuple[str, ...]:
        return self.pending

    async def request(self, req: AdminRequest) -> Reply:
        self.calls.append(("request", req))
        if self.on_request is not None:
            self.on_request(req)
        if self.hold is not None:
            await self.hold.wait()
        answer = self.reply(req) if callable(self.reply) else self.reply
        return Reply(req.request_id, *(answer or routed(self.st, req)))

    def requests(self) -> list[Any]:
        return [detail for what, detail in self.calls if what == "request"]


class Cluster:
    """ApiServers for some members (the others are down), in front of fakes."""

    def __init__(
        self,
        statuses: dict[str, MemberStatus],
        *,
        token: str | None = TOKEN,
        health_auth: bool = False,
        witness: str | None = None,
        down: tuple[str, ...] = (),
        tls: tuple[Path, Path] | None = None,
    ) -> None:
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
                self.config,
                node,
                fake,
                host="127.0.0.1",
                port=self.ports[n],
                token=self._token,
                peer_metrics=self.peer_metrics,
                ssl_context=server_ssl_context(self.config.api),
                client=ApiClient(token=self._token, ssl_context=client_tls),
            )
            await server.start()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.session.close()
        for server in self.servers.values():
            await server.close()
            await server.client.close()

    async def call(
        self,
        member: str,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        url = f"http://127.0.0.1:{self.ports[member]}{path}"
        async with self.session.request(method, url, data=data, headers=headers or {}) as resp:
            text = await resp.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, parsed, resp


def three(**leader_more: Any) -> dict[str, MemberStatus]:
    return {
        "a": leader_status(**leader_more),
        "b": status("b", position=Position(1, 4000), primary_position=Position(1, 5000)),
        "c": status("c", position=Position(1, 3000), primary_position=Position(1, 5000)),
    }


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
        "host": "127.0.0.1",
        "port": 5501,
        "state": "standby",
        "timeline": 1,
        "lsn": "0/FA0",
        "lsn_bytes": 4000,
        "following": "a",
        "streaming": True,
        "observed_s_ago": 0.05,
        "pending_restart": [],
        "restarting": False,
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


async def test_health_shows_vip_trouble_the_last_failover_and_a_rebuild() -> None:
    failover = FailoverRecord(term=4, reason="election", outage_s=1.25, wall_time=1_700_000_000.0)
    statuses = three(vip_error="198.18.0.100 answers from another host", last_failover=failover)
    statuses["c"] = status("c", rebuild=RebuildStatus("a", started_at=1_700_000_000.0))
    async with Cluster(statuses) as c:
        _, body, _ = await c.call("a", "GET", "/health")
        _, other, _ = await c.call("b", "GET", "/health")
        _, rebuilding, _ = await c.call("c", "GET", "/health")
    assert body["vip_held"] is True and body["vip_error"] == "198.18.0.100 answers from another host"
    assert body["last_failover"] == {
        "term": 4,
        "reason": "election",
        "duration_s": 1.25,
        "wall_time": 1_700_000_000.0,
        "time": "2023-11-14T22:13:20Z",
    }
    assert other["vip_error"] is None and other["last_failover"] is None and other["reinit"] is None
    assert rebuilding["reinit"] == {
        "from": "a",
        "started": "2023-11-14T22:13:20Z",
        "finished": None,
        "running": True,
        "error": None,
    }


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
    entries = (
        HistoryEntry(1, None, "a", "bootstrap", None, 1_700_000_000.0),
        HistoryEntry(2, "a", "b", "switchover", Position(1, 0x3000060), 1_700_000_100.5),
    )
    async with Cluster(three(history=entries)) as c:
        code, body, _ = await c.call("a", "GET", "/history")
    assert code == 200 and body["member"] == "a" and body["state_version"] == [3, 7]
    assert body["history"] == [
        {
            "term": 1,
            "from": None,
            "to": "a",
            "reason": "bootstrap",
            "position": None,
            "wall_time": 1_700_000_000.0,
            "time": "2023-11-14T22:13:20Z",
        },
        {
            "term": 2,
            "from": "a",
            "to": "b",
            "reason": "switchover",
            "position": "1/0/3000060",
            "wall_time": 1_700_000_100.5,
            "time": "2023-11-14T22:15:00Z",
        },
    ]


_SAMPLE = re.compile(r'failoverd_[a-z_]+\{member="[a-z]+"(,[a-z_]+="[^"\\\n]*")*\} (-?[0-9.e+]+|NaN|\+Inf)')


async def test_metrics_are_prometheus_text() -> None:
    failover = FailoverRecord(term=3, reason="election", outage_s=0.75, wall_time=1_700_000_000.5)
    async with Cluster(three(last_failover=failover)) as cluster:
        fake = cluster.fakes["a"]
        fake.counters.events.update({"election_started": 2, "fence": 1, "vote_granted": 4})
        # Elected and promoted by an election: one failover, counted from the core's typed events.
        fake.counters.count(ev.RoleChanged(node="a", term=3, role="leader", previous="candidate", reason="election"))
        fake.counters.count(ev.Promoted(node="a", term=3, position=Position(1, 5000), reason="election", outage_s=0.75))
        cluster.peer_metrics.received = 42
        cluster.peer_metrics.rejected["unauthenticated"] += 3
        await cluster.call("a", "POST", "/pause")  # a 401, counted
        code, text, resp = await cluster.call("a", "GET", "/metrics")
        _, text_b, _ = await cluster.call("b", "GET", "/metrics")
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
    assert samples['failoverd_promise_seconds{member="a"}'] == 1.0
    assert samples['failoverd_postgres_state{member="a",state="primary"}'] == 1
    assert samples['failoverd_elections_started_total{member="a"}'] == 2
    assert samples['failoverd_elections_won_total{member="a"}'] == 1
    assert samples['failoverd_promotions_total{member="a",reason="election"}'] == 1
    assert samples['failoverd_failovers_total{member="a"}'] == 1
    assert samples['failoverd_last_failover_duration_seconds{member="a"}'] == 0.75
    assert samples['failoverd_last_failover_timestamp_seconds{member="a"}'] == 1_700_000_000.5
    assert samples['failoverd_fences_total{member="a"}'] == 1
    assert samples['failoverd_core_events_total{member="a",event="promoted"}'] == 1
    assert samples['failoverd_peer_messages_received_total{member="a"}'] == 42
    assert samples['failoverd_peer_messages_rejected_total{member="a",reason="unauthenticated"}'] == 3
    assert samples['failoverd_api_requests_rejected_total{member="a",reason="unauthenticated"}'] == 1
    assert 'failoverd_replication_lag_bytes{member="b"} 1000' in text_b
    # No failover known to b: its gauges are absent, not zero.
    assert "failoverd_last_failover_duration_seconds" not in text_b


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
async def test_malformed_requests_get_400_with_a_reason(
    cluster: Cluster, method: str, path: str, raw: bytes, reason: str
) -> None:
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
    def broken() -> MemberStatus:
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


REPLY_STATUSES = [
    (ReplyCode.OK, "POST", "/pause", None, 200),
    (ReplyCode.OK, "POST", "/reinit", {"node": "a"}, 202),
    (ReplyCode.CONFLICT, "POST", "/reinit", {"node": "a"}, 409),
    (ReplyCode.INVALID, "POST", "/failover", {"to": "a"}, 409),
    (ReplyCode.CONFLICT, "DELETE", "/switchover", None, 409),
    (ReplyCode.UNAVAILABLE, "POST", "/resume", None, 503),
    (ReplyCode.UNAVAILABLE, "POST", "/reinit", {"node": "a"}, 503),
]


@pytest.mark.parametrize(
    ("code", "method", "path", "body", "expected"),
    REPLY_STATUSES,
    ids=[f"{r[0].name}:{r[1]} {r[2]}" for r in REPLY_STATUSES],
)
async def test_reply_codes_map_to_http_statuses(
    cluster: Cluster, code: ReplyCode, method: str, path: str, body: Any, expected: int
) -> None:
    cluster.fakes["a"].reply = (code, f"the core says {code.value}")
    status_, answer, _ = await cluster.call("a", method, path, body=body, headers=AUTH)
    assert status_ == expected, answer
    if code is ReplyCode.OK:
        assert answer == {"ok": True, "message": "the core says ok", "member": "a"}
    elif code is ReplyCode.UNAVAILABLE:
        assert answer == {"error": "the core says unavailable"}  # reached no core that could act: retry
    else:
        assert answer == {"ok": False, "error": f"the core says {code.value}", "member": "a"}
    assert len(cluster.fakes["a"].requests()) == 1
    assert all(f.calls == [] for n, f in cluster.fakes.items() if n != "a")


async def test_the_api_hands_a_switchover_to_the_core_and_checkpoints_nothing(cluster: Cluster) -> None:
    # The CHECKPOINT before a switchover is the leader's core's (Checkpoint
    # action); the API only submits the request: no other supervisor call.
    fake = cluster.fakes["a"]
    code, body, _ = await cluster.call("a", "POST", "/switchover", body={"to": "b"}, headers=AUTH)
    assert code == 200 and body["member"] == "a"
    assert [what for what, _ in fake.calls] == ["request"]
    req = fake.requests()[0]
    assert isinstance(req, Switchover) and (req.target, req.at) == ("b", None)
    code, _, _ = await cluster.call("a", "POST", "/switchover", body={}, headers=AUTH)
    assert code == 200 and fake.requests()[1].target is None


async def test_a_switchover_is_answered_when_the_core_answers(cluster: Cluster) -> None:
    # The leader's core answers a switchover once its CHECKPOINT is done: the
    # HTTP answer waits for it, and says what the core said.
    fake = cluster.fakes["a"]
    fake.hold = asyncio.Event()
    fake.reply = (ReplyCode.OK, "switchover to b started")
    call = asyncio.create_task(cluster.call("a", "POST", "/switchover", body={"to": "b"}, headers=AUTH))
    await wait_for("the request at the core", fake.requests, interval_s=0.005)
    await asyncio.sleep(0.05)
    assert not call.done()
    fake.hold.set()
    code, body, _ = await call
    assert code == 200 and body == {"ok": True, "message": "switchover to b started", "member": "a"}
    assert len(fake.requests()) == 1


async def test_a_scheduled_switchover_goes_to_the_core_with_its_time() -> None:
    async with Cluster(three()) as c:
        at = time.time() + 3600
        await c.call("a", "POST", "/switchover", body={"to": "b", "at": at}, headers=AUTH)
        code, _, _ = await c.call("a", "POST", "/switchover", body={"at": "2099-01-01T00:00:00Z"}, headers=AUTH)
        assert code == 400  # more than 30 days ahead
        await c.call(
            "a",
            "POST",
            "/switchover",
            body={"at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(at))},
            headers=AUTH,
        )
        reqs = c.fakes["a"].requests()
        assert [what for what, _ in c.fakes["a"].calls] == ["request", "request"]
        assert reqs[0].at == at and reqs[1].at == float(int(at))


async def test_the_api_schedules_nothing_before_a_scheduled_switchover() -> None:
    # The CHECKPOINT shortly before a scheduled switchover is the core's (from
    # the leader's tick): the API only reports the schedule.
    async with Cluster(three(switchover_to="b", switchover_at=time.time() + 5)) as c:
        await asyncio.sleep(0.3)
        code, body, _ = await c.call("a", "GET", "/health")
        assert code == 200 and body["switchover"]["to"] == "b"
        assert all(f.calls == [] for f in c.fakes.values())


async def test_a_redirect_is_forwarded_to_the_member_it_names(cluster: Cluster) -> None:
    cluster.fakes["c"].reply = (ReplyCode.REDIRECT, "c is not the leader; a is", "a")
    code, body, _ = await cluster.call("c", "POST", "/pause", headers=AUTH)
    assert code == 200 and body == {"ok": True, "message": "done", "member": "a", "forwarded_by": "c"}
    assert [type(r) for r in cluster.fakes["a"].requests()] == [Pause]
    assert [type(r) for r in cluster.fakes["c"].requests()] == [Pause]  # c's core redirected it
    assert cluster.fakes["b"].calls == []
    # The caller's credentials travel with it: a wrong token is refused (by c, before its core is asked).
    code, _, _ = await cluster.call("c", "POST", "/pause", headers={"Authorization": "Bearer bad"})
    assert code == 403 and len(cluster.fakes["a"].requests()) == 1 and len(cluster.fakes["c"].requests()) == 1


async def test_the_forwarded_answer_is_the_targets_whatever_it_is(cluster: Cluster) -> None:
    cluster.fakes["a"].reply = (ReplyCode.CONFLICT, "the cluster is paused")
    code, body, _ = await cluster.call("b", "POST", "/switchover", body={"to": "c"}, headers=AUTH)
    assert code == 409 and body == {"ok": False, "error": "the cluster is paused", "member": "a", "forwarded_by": "b"}
    cluster.fakes["a"].reply = (ReplyCode.UNAVAILABLE, "a is stepping down; retry shortly")
    code, body, _ = await cluster.call("b", "POST", "/pause", headers=AUTH)
    assert code == 503 and body == {"error": "a is stepping down; retry shortly", "forwarded_by": "b"}


async def test_forwarding_when_the_leader_is_down_or_unknown() -> None:
    async with Cluster(three(), down=("a",)) as c:
        code, body, _ = await c.call("b", "POST", "/pause", headers=AUTH)
        assert code == 502 and "cannot reach a" in body["error"]
    statuses = three()
    statuses["b"] = status("b", leader=None, leader_live=False)
    async with Cluster(statuses) as c:
        c.fakes["b"].reply = (ReplyCode.UNAVAILABLE, "b knows no live leader; retry shortly")
        code, body, _ = await c.call("b", "POST", "/resume", headers=AUTH)
        assert code == 503 and body == {"error": "b knows no live leader; retry shortly"}
        assert c.fakes["a"].calls == [] and c.fakes["c"].calls == []


async def test_a_forwarded_request_is_never_forwarded_again(cluster: Cluster) -> None:
    cluster.fakes["b"].reply = (ReplyCode.REDIRECT, "b is not the leader; a is", "a")
    code, body, _ = await cluster.call("b", "POST", "/pause", headers={**AUTH, FORWARDED: "c"})
    assert code == 503 and "b is not the leader; a is" in body["error"] and "not forwarded twice" in body["error"]
    assert [type(r) for r in cluster.fakes["b"].requests()] == [Pause]
    assert cluster.fakes["a"].calls == [] and cluster.fakes["c"].calls == []


async def test_a_redirect_met_after_forwarding_is_503(cluster: Cluster) -> None:
    # c's view says b leads, b's says a does (leadership just moved): c
    # forwards once, b does not forward again, and the caller may retry.
    cluster.fakes["c"].reply = (ReplyCode.REDIRECT, "c is not the leader; b is", "b")
    cluster.fakes["b"].reply = (ReplyCode.REDIRECT, "b is not the leader; a is", "a")
    code, body, _ = await cluster.call("c", "POST", "/pause", headers=AUTH)
    assert code == 503 and body["forwarded_by"] == "c" and "not forwarded twice" in body["error"]
    assert len(cluster.fakes["c"].requests()) == 1 and len(cluster.fakes["b"].requests()) == 1
    assert cluster.fakes["a"].calls == []


async def test_failover_goes_to_the_leader_when_one_is_alive(cluster: Cluster) -> None:
    code, body, _ = await cluster.call("b", "POST", "/failover", body={"to": "c"}, headers=AUTH)
    assert code == 200 and body["member"] == "a" and body["forwarded_by"] == "b"
    req = cluster.fakes["a"].requests()[0]
    assert isinstance(req, Failover) and (req.target, req.allow_data_loss) == ("c", False)
    assert cluster.fakes["c"].calls == []


async def test_failover_without_a_live_leader_goes_to_the_target() -> None:
    orphaned = {n: status(n, leader=None, leader_live=False, primary_position=None) for n in NAMES}
    async with Cluster(orphaned) as c:
        c.fakes["a"].reply = (ReplyCode.REDIRECT, "no live leader: the failover goes to c", "c")
        c.fakes["c"].reply = (ReplyCode.OK, "c campaigns")
        code, body, _ = await c.call("a", "POST", "/failover", body={"to": "c", "allow_data_loss": True}, headers=AUTH)
        assert code == 200 and body == {"ok": True, "message": "c campaigns", "member": "c", "forwarded_by": "a"}
        req = c.fakes["c"].requests()[0]
        assert isinstance(req, Failover) and (req.target, req.allow_data_loss) == ("c", True)
        c.fakes["b"].reply = (ReplyCode.OK, "b campaigns")
        code, body, _ = await c.call("b", "POST", "/failover", body={"to": "b"}, headers=AUTH)
        assert code == 200 and body["member"] == "b" and "forwarded_by" not in body
        assert len(c.fakes["a"].requests()) == 1 and len(c.fakes["c"].requests()) == 1


async def test_reinit_goes_to_the_named_member(cluster: Cluster) -> None:
    cluster.fakes["a"].reply = (ReplyCode.REDIRECT, "c rebuilds itself", "c")
    cluster.fakes["c"].reply = (ReplyCode.OK, "rebuilding c from a")
    code, body, _ = await cluster.call("a", "POST", "/reinit", body={"node": "c"}, headers=AUTH)
    assert code == 202 and body == {"ok": True, "message": "rebuilding c from a", "member": "c", "forwarded_by": "a"}
    (req,) = cluster.fakes["c"].requests()
    assert isinstance(req, Reinit) and req.member == "c"
    assert [type(r) for r in cluster.fakes["a"].requests()] == [Reinit]
    cluster.fakes["b"].reply = (ReplyCode.CONFLICT, "b's PostgreSQL is a primary")
    code, body, _ = await cluster.call("b", "POST", "/reinit", body={"node": "b"}, headers=AUTH)
    assert code == 409 and body["error"] == "b's PostgreSQL is a primary"
    cluster.fakes["b"].reply = (ReplyCode.REDIRECT, "c rebuilds itself", "c")
    code, body, _ = await cluster.call("b", "POST", "/reinit", body={"node": "c"}, headers={**AUTH, FORWARDED: "a"})
    assert code == 503 and "c rebuilds itself" in body["error"]
    assert len(cluster.fakes["c"].requests()) == 1
