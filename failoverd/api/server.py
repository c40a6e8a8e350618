"""The REST API of one supervisor (aiohttp): health checks for load balancers,
the cluster view, metrics, and admin requests. docs/api.md is the reference.

* Read endpoints (GET) are open unless `[api] health_auth` is set; admin
  endpoints always need `Authorization: Bearer <token>` (the token in
  `[api] token_file`; without one they answer 403 saying how to enable them).
  401: no usable credentials; 403: wrong token or admin disabled. Tokens are
  compared in constant time and never logged.
* Every error is JSON `{"error": "..."}`: 400 for a malformed request (with
  the reason), never a traceback (500 says only "internal error" and logs).
* Admin requests go to this member's core, which answers, or names the
  member that must (REDIRECT: the leader; a failover's target when no leader
  is alive; the member a reinit rebuilds). The API forwards such a request
  there once, with the caller's credentials (all members share the
  configuration and the token); a forwarded request is never forwarded
  again. It decides nothing itself: reply codes map to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
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
from failoverd.core.actions import ReplyCode
from failoverd.core.requests import (
    AdminRequest,
    CancelSwitchover,
    Failover,
    Pause,
    RecordEvent,
    Reinit,
    Restart,
    Resume,
    Switchover,
)
from failoverd.core.status import MemberStatus
from failoverd.runtime.supervisor import REPLY_TIMEOUT_S, SupervisorCounters

BODY_BYTES_MAX = 64 * 1024
FORWARD_TIMEOUT_S = REPLY_TIMEOUT_S + 5.0  # the leader answers a switchover after its checkpoint
FAN_OUT_TIMEOUT_S = 1.0
log = structlog.get_logger("failoverd.api")


class PeerCounts(Protocol):
    """The peer server's counters (failoverd.adapters.peers.PeerMetrics), for /metrics."""

    received: int
    rejected: collections.Counter[str]


@dataclasses.dataclass
class _NoPeers:
    received: int = 0
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


class SupervisorLike(Protocol):
    """What the API needs of the supervisor (failoverd.runtime.supervisor.Supervisor)."""

    counters: SupervisorCounters

    def status(self) -> MemberStatus: ...
    def pending_restart(self) -> tuple[str, ...]: ...
    async def request(self, req: AdminRequest) -> act.Reply: ...


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
        peer_metrics: PeerCounts | None = None,
        ssl_context: Any = None,
        client: ApiClient | None = None,
        wall_clock: Callable[[], float] = time.time,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.config = config
        self.member = member
        self.supervisor = supervisor
        self.host, self._port = host, port
        self._token = None if token is None else token.encode()
        self.peer_metrics: PeerCounts = peer_metrics or _NoPeers()
        self._ssl_context = ssl_context
        # Calls to other members carry our own token: with health_auth their read endpoints need it too.
        self.client = client or ApiClient(token=token)
        self._own_client = client is None
        self._wall_clock = wall_clock
        self._reload_config = reload  # the daemon's: re-read the file and apply what may change live
        self.rejected: collections.Counter[str] = collections.Counter()
        self._nodes = {n.name: n for n in config.nodes}
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the API server is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        app = web.Application(client_max_size=BODY_BYTES_MAX, middlewares=[self._errors])
        reads = {
            "/health": self._health,
            "/primary": self._primary,
            "/replica": self._replica,
            "/read-only": self._read_only,
            "/cluster": self._cluster,
            "/history": self._history,
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
        app.router.add_post("/restart", self._restart)
        app.router.add_post("/reload", self._reload)
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
        log.info(
            "api_listening",
            node=self.member.name,
            host=self.host,
            port=self.port,
            tls=self._ssl_context is not None,
            admin=self._token is not None,
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_client:
            await self.client.close()

    # ------------------------------------------------------------ plumbing

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Refused as refused:
            self.rejected[refused.reason] += 1
            if refused.status in (401, 403):
                log.warning(
                    "api_request_refused",
                    node=self.member.name,
                    status=refused.status,
                    reason=refused.reason,
                    method=request.method,
                    path=request.path,
                    remote=request.remote,
                )
            return _error(refused.status, refused.text, headers=refused.headers)
        except BadRequest as error:
            self.rejected["malformed"] += 1
            return _error(400, str(error))
        except web.HTTPException as error:  # aiohttp's own: 404, 405, 413
            self.rejected[f"http_{error.status}"] += 1
            return _error(
                error.status,
                _http_error_text(error, request),
                headers={"Allow": error.headers["Allow"]} if "Allow" in error.headers else None,
            )
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
            raise _Refused(
                403,
                "admin_disabled",
                "admin requests are disabled on this member: set [api] token_file "
                "to a file (mode 0600) holding a token and restart failoverd (docs/api.md)",
            )
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
            raise BadRequest(
                f"unknown query parameter {unknown[0][:40]!r}"
                + (f" (allowed: {', '.join(allowed)})" if allowed else "")
            )
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

    def _view(self, status: MemberStatus) -> dict[str, Any]:
        return views.member_view(
            status,
            self.member,
            str(api_address(self.config, self.member)),
            pending_restart=self.supervisor.pending_restart(),
        )

    def _me(self) -> dict[str, Any]:
        return self._view(self.supervisor.status())

    # ------------------------------------------------------- read endpoints

    async def _health(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        self._query(request)
        status = self.supervisor.status()
        body = self._view(status)
        healthy = self.member.postgres is None or (status.pg is not None and status.pg.running)
        return web.json_response(body, status=200 if healthy else 503)

    async def _primary(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        self._query(request)
        status = self.supervisor.status()
        return self._check(status, status.writable)

    async def _replica(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        lag_max = self._lag_bound(request)
        status = self.supervisor.status()
        return self._check(status, self._replica_ok(status, lag_max))

    async def _read_only(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        lag_max = self._lag_bound(request)
        status = self.supervisor.status()
        return self._check(status, status.writable or self._replica_ok(status, lag_max))

    def _lag_bound(self, request: web.Request) -> int | None:
        query = self._query(request, ("lag",))
        return None if "lag" not in query else views.parse_lag(query["lag"])

    @staticmethod
    def _replica_ok(status: MemberStatus, lag_max: int | None) -> bool:
        pg = status.pg
        if pg is None or not status.streaming_standby:  # a streaming standby has a probe
            return False
        if lag_max is None:
            return True
        lag = views.lag_bytes(status.primary_position, pg.position)
        return lag is not None and lag <= lag_max

    def _check(self, status: MemberStatus, ok: bool) -> web.Response:
        body = self._view(status)
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
        return web.json_response(
            {
                "member": status.name,
                "state_version": [status.state_stamp.written_term, status.state_stamp.version],
                "history": views.history_view(status.history),
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        self._authorize(request, admin=False)
        self._query(request)
        text = views.metrics_text(
            self.supervisor.status(),
            self.supervisor.counters,
            node=self.member,
            peer_received=self.peer_metrics.received,
            peer_rejected=self.peer_metrics.rejected,
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
        at = None if args["at"] is None else views.parse_time(args["at"], self._wall_clock())
        return await self._submit(request, raw, Switchover(next(_request_ids), to, at))

    async def _cancel_switchover(self, request: web.Request) -> web.Response:
        _, raw = await self._admin_body(request)
        return await self._submit(request, raw, CancelSwitchover(next(_request_ids)))

    async def _pause(self, request: web.Request) -> web.Response:
        _, raw = await self._admin_body(request)
        return await self._submit(request, raw, Pause(next(_request_ids)))

    async def _resume(self, request: web.Request) -> web.Response:
        _, raw = await self._admin_body(request)
        return await self._submit(request, raw, Resume(next(_request_ids)))

    async def _note(self, request: web.Request) -> web.Response:
        args, raw = await self._admin_body(request, required={"reason": str})
        reason = args["reason"]
        if not 1 <= len(reason) <= 200:
            raise BadRequest("reason: 1 to 200 characters")
        return await self._submit(request, raw, RecordEvent(next(_request_ids), reason))

    async def _failover(self, request: web.Request) -> web.Response:
        args, raw = await self._admin_body(request, required={"to": str}, optional={"allow_data_loss": bool})
        to = views.member_name(self.config, args["to"], "to")
        return await self._submit(request, raw, Failover(next(_request_ids), to, bool(args["allow_data_loss"])))

    async def _reinit(self, request: web.Request) -> web.Response:
        args, raw = await self._admin_body(request, required={"node": str})
        name = views.member_name(self.config, args["node"], "node")
        return await self._submit(request, raw, Reinit(next(_request_ids), name), accepted=202)

    async def _restart(self, request: web.Request) -> web.Response:
        args, raw = await self._admin_body(request, required={"node": str})
        name = views.member_name(self.config, args["node"], "node")
        return await self._submit(request, raw, Restart(next(_request_ids), name), accepted=202)

    async def _reload(self, request: web.Request) -> web.Response:
        """Re-read this member's configuration file, as SIGHUP does, and say
        what was applied and what waits for a restart. Every member reloads
        its own file: `failoverctl reload` asks each; nothing is forwarded."""
        await self._admin_body(request)
        if self._reload_config is None:
            raise _Refused(409, "no_reload", f"{self.member.name} cannot reload its configuration here")
        report = await self._reload_config()
        return web.json_response({"member": self.member.name, **report}, status=200 if report.get("ok") else 409)

    # -------------------------------------------------------------- routing

    async def _submit(self, request: web.Request, raw: bytes, req: AdminRequest, accepted: int = 200) -> web.Response:
        """Hand the request to our core and say what it answered; when the
        core names another member to ask (REDIRECT), forward it there once."""
        try:
            reply = await self.supervisor.request(req)
        except TimeoutError:
            return _error(504, f"{self.member.name} did not answer in time; the request may have been carried out")
        if reply.code is ReplyCode.REDIRECT and reply.redirect is not None:
            if FORWARDED_HEADER in request.headers:
                raise _Refused(
                    503, "misrouted", f"{self.member.name}: {reply.message} (not forwarded twice); retry shortly"
                )
            return await self._forward(request, reply.redirect, raw)
        if reply.code is ReplyCode.UNAVAILABLE:
            raise _Refused(503, "no_leader", reply.message)
        if reply.ok:
            return web.json_response(
                {"ok": True, "message": reply.message, "member": self.member.name}, status=accepted
            )
        return web.json_response({"ok": False, "error": reply.message, "member": self.member.name}, status=409)

    async def _forward(self, request: web.Request, target: str, raw: bytes) -> web.Response:
        node = self._nodes[target]
        address = api_address(self.config, node)
        try:
            answer = await self.client.call(
                address,
                request.method,
                request.path,
                body=raw,
                timeout_s=FORWARD_TIMEOUT_S,
                headers={FORWARDED_HEADER: self.member.name},
                authorization=request.headers.get("Authorization"),
            )
        except Unreachable as error:
            if error.delivered:
                return _error(
                    504, f"{target} ({address}) did not answer: {error.reason}; the request may have been carried out"
                )
            return _error(502, f"cannot reach {target} at {address}: {error.reason}")
        if not isinstance(answer.body, dict):
            return _error(502, f"{target} answered HTTP {answer.status} without JSON")
        return web.json_response({**answer.body, "forwarded_by": self.member.name}, status=answer.status)


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
    return {
        "name": node.name,
        "kind": node.kind.value,
        "api": address,
        "reachable": False,
        "error": reason,
        "postgres": None if node.postgres is None else {"host": node.postgres.host, "port": node.postgres.port},
    }
