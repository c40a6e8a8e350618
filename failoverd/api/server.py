"""The REST API of one supervisor (aiohttp): health checks for load balancers,
the cluster view, metrics, and admin requests. docs/api.md is the reference.

* Read endpoints (GET) are open unless `[api] health_auth` is set; admin
  endpoints always need `Authorization: Bearer <token>` (the token in
  `[api] token_file`; without one they answer 403 saying how to enable them).
  401: no usable credentials; 403: wrong token or admin disabled. Tokens are
  compared in constant time and never logged.
* Every error is JSON `{"error": "..."}`: 400 for a malformed request (with
  the reason), never a traceback (500 says only "internal error" and logs).
* Admin requests are carried out by the leader's core. Any member accepts
  them and forwards them to the leader's API with the caller's credentials
  (all members share the configuration and the token); a forwarded request is
  never forwarded again. A failover with no live leader goes to its target,
  which campaigns; a reinit goes to the member to rebuild.
* A switchover due now is preceded, on the leader, by a CHECKPOINT, so that
  the shutdown checkpoint during which writes wait has little left to do. A
  scheduled one gets its CHECKPOINT shortly before it is due.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from failoverd.api import views
from failoverd.api.client import FORWARDED_HEADER, ApiClient, Unreachable, api_address
from failoverd.api.views import BadRequest
from failoverd.config.load import Config, NodeConfig
from failoverd.core import actions as act
from failoverd.core.requests import CancelSwitchover, Failover, Pause, RecordEvent, Resume, Switchover
from failoverd.adapters.peers import PeerMetrics
from failoverd.runtime.supervisor import ReinitRefused, SupervisorCounters, SupervisorStatus

BODY_BYTES_MAX = 64 * 1024
CHECKPOINT_TIMEOUT_S = 30.0
FORWARD_TIMEOUT_S = CHECKPOINT_TIMEOUT_S + 15.0  # the leader may checkpoint before it answers
FAN_OUT_TIMEOUT_S = 1.0
SCHEDULED_CHECKPOINT_AHEAD_S = 10.0
SCHEDULE_POLL_S = 1.0
log = structlog.get_logger("failoverd.api.server")


class SupervisorLike(Protocol):
    """What the API needs of the supervisor (failoverd.runtime.supervisor.Supervisor)."""

    counters: SupervisorCounters

    def status(self) -> SupervisorStatus: ...
    async def request(self, req: Any) -> act.Reply: ...
    async def checkpoint(self, timeout_s: float) -> None: ...
    async def reinit(self) -> str: ...


class _Refused(Exception):
    def __init__(self, status: int, reason: str, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.reason, self.text, self.headers = status, reason, text, headers


_request_ids = itertools.count(random.SystemRandom().randrange(1 << 40))


class ApiServer:
    """Serves this member's API. `start()` binds (OSError when it cannot);
    `port` is then the bound port (useful with port 0)."""

    def __init__(
        self,
        config: Config,
        member: NodeConfig,
        supervisor: SupervisorLike,
        *,
        host: str,
        port: int,
        token: str | None,
        peer_metrics: PeerMetrics | None = None,
        ssl_context: Any = None,
        client: ApiClient | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.member = member
        self.supervisor = supervisor
        self.host, self._port = host, port
        self._token = None if token is None else token.encode()
        self.peer_metrics = peer_metrics or PeerMetrics()
        self._ssl_context = ssl_context
        # Calls to other members carry our own token: with health_auth their read endpoints need it too.
        self.client = client or ApiClient(token=token)
        self._own_client = client is None
        self._wall_clock = wall_clock
        self.rejected: collections.Counter[str] = collections.Counter()
        self._nodes = {n.name: n for n in config.nodes}
        self._runner: web.AppRunner | None = None
        self._scheduler: asyncio.Task | None = None
        self._checkpointed_for: float | None = None

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the API server is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        app = web.Application(client_max_size=BODY_BYTES_MAX, middlewares=[self._errors])
        reads = {
            "/health": self._health, "/primary": self._primary, "/replica": self._replica,
            "/read-only": self._read_only, "/cluster": self._cluster, "/history": self._history,
            "/metrics": self._metrics,
        }
        for path, handler in reads.items():
            app.router.add_get(path, handler)
        app.router.add_post("/switchover", self._switchover)
        app.router.add_delete("/switchover", self._cancel_switchover)
        app.router.add_post("/failover", self._failover)
        app.router.add_post("/pause", self._pause)
        app.router.add_post("/resume", self._resume)
        app.router.add_post("/reinit", self._reinit)
        app.router.add_post("/history", self._note)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self._scheduler = asyncio.create_task(self._scheduled_checkpoints(), name="api-scheduled-checkpoint")
        log.info("api_listening", node=self.member.name, host=self.host, port=self.port,
                 tls=self._ssl_context is not None, admin=self._token is not None)

    async def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_client:
            await self.client.close()

    # ------------------------------------------------------------ plumbing

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Refused as refused:
            self.rejected[refused.reason] += 1
            if refused.status in (401, 403):
                log.warning("api_request_refused", node=self.member.name, status=refused.status,
                            reason=refused.reason, method=request.method, path=request.path, remote=request.remote)
            return _error(refused.status, refused.text, headers=refused.headers)
        except BadRequest as error:
            self.rejected["malformed"] += 1
            return _error(400, str(error))
        except web.HTTPException as error:  # aiohttp's own: 404, 405, 413
            self.rejected[f"http_{error.status}"] += 1
            return _error(error.status, _http_error_text(error, request),
                          headers={"Allow": error.headers["Allow"]} if "Allow" in error.headers else None)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.rejected["error"] += 1
            log.exception("api_handler_failed", node=self.member.name, method=request.method, path=request.path)
            return _error(500, "internal error")

    def _authorize(self, request: web.Request, *, admin: bool) -> None:
        if not admin and not self.config.api.health_auth:
            return
        if self._token is None:
            raise _Refused(403, "admin_disabled", "admin requests are disabled on this member: set [api] token_file "
                           "to a file (mode 0600) holding a token and restart failoverd (docs/api.md)")
        header = request.headers.get("Authorization")
        challenge = {"WWW-Authenticate": 'Bearer realm="failoverd"'}
        if header is None:
            raise _Refused(401, "unauthenticated", "missing Authorization: Bearer <token>", challenge)
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _Refused(401, "unauthenticated", "Authorization must be 'Bearer <token>'", challenge)
        if not hmac.compare_digest(value.strip().encode("utf-8", "replace"), self._token):
            raise _Refused(403, "bad_token", "the token is not valid")

    @staticmethod
    def _query(request: web.Request, allowed: tuple[str, ...] = ()) -> dict[str, str]:
        unknown = sorted(set(request.query) - set(allowed))
        if unknown:
            raise BadRequest(f"unknown query parameter {unknown[0][:40]!r}"
                             + (f" (allowed: {', '.join(allowed)})" if allowed else ""))
        return {k: request.query[k] for k in allowed if k in request.query}

    @staticmethod
    async def _body(request: web.Request) -> tuple[Any, bytes]:
        raw = await request.read()  # aiohttp answers 413 past BODY_BYTES_MAX
        if not raw.strip():
            return {}, b"{}"
        try:
            return json.loads(raw), raw
        except (ValueError, RecursionError):
            raise BadRequest("the body is not valid JSON") from None

    def _me(self) -> dict[str, Any]:
        return views.member_view(self.supervisor.status(), self.member, str(api_address(self.config, self.member)))

    # ------------------------------------------------------- read endpoints

    async def _health(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        self._query(request)
        status = self.supervisor.status()
        body = views.member_view(status, self.member, str(api_address(self.config, self.member)))
        healthy = self.member.postgres is None or (status.pg is not None and status.pg.running)
        return web.json_response(body, status=200 if healthy else 503)

    async def _primary(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        self._query(request)
        status = self.supervisor.status()
        return self._check(status, views.writable(status))

    async def _replica(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        lag_max = self._lag_bound(request)
        status = self.supervisor.status()
        return self._check(status, self._replica_ok(status, lag_max))

    async def _read_only(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        lag_max = self._lag_bound(request)
        status = self.supervisor.status()
        return self._check(status, views.writable(status) or self._replica_ok(status, lag_max))

    def _lag_bound(self, request: web.Request) -> int | None:
        query = self._query(request, ("lag",))
        return None if "lag" not in query else views.parse_lag(query["lag"])

    @staticmethod
    def _replica_ok(status: SupervisorStatus, lag_max: int | None) -> bool:
        if not views.streaming_standby(status):
            return False
        if lag_max is None:
            return True
        lag = views.lag_bytes(status.primary_position, status.pg.position)
        return lag is not None and lag <= lag_max

    def _check(self, status: SupervisorStatus, ok: bool) -> web.Response:
        body = views.member_view(status, self.member, str(api_address(self.config, self.member)))
        return web.json_response(body, status=200 if ok else 503)

    async def _cluster(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        self._query(request)
        members = await asyncio.gather(*(self._member(n) for n in self.config.nodes))
        return web.json_response(views.cluster_view(self.config, list(members), self.member.name))

    async def _member(self, node: NodeConfig) -> dict[str, Any]:
        if node.name == self.member.name:
            return {**self._me(), "reachable": True}
        address = api_address(self.config, node)
        try:
            answer = await self.client.call(address, "GET", "/health", timeout_s=FAN_OUT_TIMEOUT_S)
        except Unreachable as error:
            return _unreachable(node, str(address), error.reason)
        body = answer.body
        if answer.status not in (200, 503) or not isinstance(body, dict) or body.get("name") != node.name:
            return _unreachable(node, str(address), f"HTTP {answer.status}: {answer.error}")
        return {**body, "reachable": True}

    async def _history(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        self._query(request)
        status = self.supervisor.status()
        return web.json_response({
            "member": status.name,
            "state_version": [status.state_stamp.written_term, status.state_stamp.version],
            "history": views.history_view(status.history),
        })

    async def _metrics(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        self._query(request)
        text = views.metrics_text(
            self.supervisor.status(), self.supervisor.counters, node=self.member,
            peer_received=self.peer_metrics.received, peer_rejected=self.peer_metrics.rejected,
            api_rejected=self.rejected,
        )
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # ------------------------------------------------------ admin endpoints

    async def _admin_body(self, request: web.Request, **spec: Any) -> tuple[dict[str, Any], bytes]:
        self._authorize(request, admin=True)
        self._query(request)
        body, raw = await self._body(request)
        return views.fields(body, **spec), raw

    async def _switchover(self, request: web.Request) -> web.Response:
        args, raw = await self._admin_body(request, optional={"to": str, "at": (int, float, str)})
        to = None if args["to"] is None else views.member_name(self.config, args["to"], "to")
        now = self._wall_clock()
        at = None if args["at"] is None else views.parse_time(args["at"], now)
        due_now = at is None or at <= now
        return await self._on_leader(request, raw, lambda rid: Switchover(rid, to, at),
                                     before=self._checkpoint_first if due_now else None)

    async def _cancel_switchover(self, request: web.Request) -> web.Response:
        _, raw = await self._admin_body(request)
        return await self._on_leader(request, raw, CancelSwitchover)

    async def _pause(self, request: web.Request) -> web.Response:
        _, raw = await self._admin_body(request)
        return await self._on_leader(request, raw, Pause)

    async def _resume(self, request: web.Request) -> web.Response:
        _, raw = await self._admin_body(request)
        return await self._on_leader(request, raw, Resume)

    async def _note(self, request: web.Request) -> web.Response:
        args, raw = await self._admin_body(request, required={"reason": str})
        reason = args["reason"]
        if not 1 <= len(reason) <= 200:
            raise BadRequest("reason: 1 to 200 characters")
        return await self._on_leader(request, raw, lambda rid: RecordEvent(rid, reason))

    async def _failover(self, request: web.Request) -> web.Response:
        args, raw = await self._admin_body(request, required={"to": str}, optional={"allow_data_loss": bool})
        to = views.member_name(self.config, args["to"], "to")
        make = lambda rid: Failover(rid, to, bool(args["allow_data_loss"]))  # noqa: E731
        status = self.supervisor.status()
        forwarded = FORWARDED_HEADER in request.headers
        if status.role == "leader" or (status.leader_live and status.leader is not None and not forwarded):
            return await self._on_leader(request, raw, make)
        if to == self.member.name:
            return await self._submit(make)  # no live leader: we are asked to campaign
        if forwarded:
            raise _Refused(503, "no_leader", f"{self.member.name} knows no live leader and is not {to}")
        return await self._forward(request, to, raw)

    async def _reinit(self, request: web.Request) -> web.Response:
        args, raw = await self._admin_body(request, required={"node": str})
        name = views.member_name(self.config, args["node"], "node")
        if name != self.member.name:
            if FORWARDED_HEADER in request.headers:
                raise _Refused(409, "misrouted", f"this is {self.member.name}, not {name}")
            return await self._forward(request, name, raw)
        try:
            message = await self.supervisor.reinit()
        except ReinitRefused as refused:
            return web.json_response({"ok": False, "error": str(refused), "member": self.member.name}, status=409)
        return web.json_response({"ok": True, "message": message, "member": self.member.name}, status=202)

    # -------------------------------------------------------------- routing

    async def _on_leader(self, request: web.Request, raw: bytes, make: Callable[[int], Any],
                         before: Callable[[SupervisorStatus], Awaitable[None]] | None = None) -> web.Response:
        status = self.supervisor.status()
        if status.role == "leader":
            if before is not None:
                await before(status)
            return await self._submit(make)
        if FORWARDED_HEADER in request.headers:
            raise _Refused(503, "not_leader", f"{self.member.name} is not the leader (leader: {status.leader})")
        if status.leader is None or not status.leader_live:
            raise _Refused(503, "no_leader", f"{self.member.name} knows no live leader; retry shortly")
        return await self._forward(request, status.leader, raw)

    async def _submit(self, make: Callable[[int], Any]) -> web.Response:
        reply = await self.supervisor.request(make(next(_request_ids)))
        if reply.ok:
            return web.json_response({"ok": True, "message": reply.message, "member": self.member.name})
        # Lost the leadership between the check and the request: the caller may retry.
        code = 503 if self.supervisor.status().role != "leader" and "not the leader" in reply.message else 409
        return web.json_response({"ok": False, "error": reply.message, "member": self.member.name}, status=code)

    async def _forward(self, request: web.Request, target: str, raw: bytes) -> web.Response:
        node = self._nodes[target]
        address = api_address(self.config, node)
        try:
            answer = await self.client.call(
                address, request.method, request.path, body=raw, timeout_s=FORWARD_TIMEOUT_S,
                headers={FORWARDED_HEADER: self.member.name}, authorization=request.headers.get("Authorization"),
            )
        except Unreachable as error:
            if error.delivered:
                return _error(504, f"{target} ({address}) did not answer: {error.reason}; "
                              "the request may have been carried out")
            return _error(502, f"cannot reach {target} at {address}: {error.reason}")
        if not isinstance(answer.body, dict):
            return _error(502, f"{target} answered HTTP {answer.status} without JSON")
        return web.json_response({**answer.body, "forwarded_by": self.member.name}, status=answer.status)

    # ---------------------------------------------------------- checkpoints

    async def _checkpoint_first(self, status: SupervisorStatus) -> None:
        if status.paused or not status.primary_ready:
            return  # the core refuses this switchover; no point in the I/O
        await self._checkpoint("switchover")

    async def _checkpoint(self, why: str) -> None:
        try:
            await self.supervisor.checkpoint(CHECKPOINT_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - the switchover goes on; its shutdown checkpoint does the work
            log.warning("pg_checkpoint_failed", node=self.member.name, term=self.supervisor.status().term,
                        why=why, error=f"{type(error).__name__}: {error}"[:300])

    async def _scheduled_checkpoints(self) -> None:
        """On the leader, CHECKPOINT once shortly before a scheduled switchover is due."""
        while True:
            await asyncio.sleep(SCHEDULE_POLL_S)
            try:
                status = self.supervisor.status()
            except Exception:  # a bug elsewhere; the API goes on serving
                log.exception("api_schedule_check_failed", node=self.member.name)
                continue
            at = status.switchover_at
            if at is None or status.role != "leader" or not status.primary_ready or at == self._checkpointed_for:
                continue
            if 0 <= at - self._wall_clock() <= SCHEDULED_CHECKPOINT_AHEAD_S:
                self._checkpointed_for = at
                await self._checkpoint("scheduled switchover")


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": text}, status=status, headers=headers)


def _http_error_text(error: web.HTTPException, request: web.Request) -> str:
    if error.status == 404:
        return f"no such endpoint: {request.path[:100]} (see docs/api.md)"
    if error.status == 405:
        return f"{request.method} is not allowed on {request.path[:100]} (allowed: {error.headers.get('Allow', '')})"
    if error.status == 413:
        return f"the body exceeds {BODY_BYTES_MAX} bytes"
    return error.reason


def _unreachable(node: NodeConfig, address: str, reason: str) -> dict[str, Any]:
    return {"name": node.name, "kind": node.kind.value, "api": address, "reachable": False, "error": reason,
            "postgres": None if node.postgres is None else {"host": node.postgres.host, "port": node.postgres.port}}
