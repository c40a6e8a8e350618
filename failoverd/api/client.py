"""Talking to members' REST APIs: used by the API itself (the /cluster fan-out,
forwarding admin requests to the leader) and by failoverctl.

Where a member's API is (docs/api.md, "Addresses"):

* clients reach a member at its `nodes[].api`, or, when that is not set, at
  its peer host with the port of `[api] listen`;
* a member binds `[api] listen`, unless its `api` names another port, in
  which case it binds its `api` address (several members on one host).

Errors are told apart by whether the request can have reached the other
side: a refused or timed-out *connection* never did (safe to try another
member), a timeout after sending may have been carried out (never retried).
"""

from __future__ import annotations

import dataclasses
import json
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from failoverd.config.load import ApiConfig, Config, HostPort, NodeConfig
from failoverd.config.secrets import SecretError, load_secret

FORWARDED_HEADER = "X-Failoverd-Forwarded-By"
ANSWER_BYTES_MAX = 1 << 20
CONNECT_TIMEOUT_S = 1.0
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # what an HTTP header value can carry unchanged


def api_address(config: Config, node: NodeConfig) -> HostPort:
    """Where clients reach `node`'s API."""
    return node.api if node.api is not None else HostPort(node.peer.host, config.api.listen.port)


def bind_address(config: Config, node: NodeConfig) -> HostPort:
    """Where `node`'s API server listens."""
    if node.api is None or node.api.port == config.api.listen.port:
        return config.api.listen
    return node.api


def load_token(path: str | Path) -> str:
    """The admin token in `path` (SecretError names the file and the problem)."""
    try:
        raw = load_secret(path)
    except SecretError as error:  # its checks are the ones we want; its noun is not
        raise SecretError(str(error).replace("secret file", "token file", 1)) from None
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        token = ""
    if not _TOKEN_RE.fullmatch(token):
        raise SecretError(f"token file {path}: the token must be printable ASCII without spaces")
    return token


def server_ssl_context(api: ApiConfig) -> ssl.SSLContext | None:
    if api.tls_cert is None or api.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(api.tls_cert, api.tls_key)
    if api.tls_client_ca is not None:
        context.load_verify_locations(api.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(
    api: ApiConfig, *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext | None:
    """None when the cluster's APIs serve plain HTTP. `ca`, `cert` and `key`
    override [api] tls_ca, tls_cert and tls_key (failoverctl's options)."""
    if not api.tls:
        return None
    context = ssl.create_default_context(cafile=ca or api.tls_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = cert or api.tls_cert, key or api.tls_key
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


class Unreachable(Exception):
    """No answer from a member. `delivered` is False only when the request
    certainly never arrived (no connection was made)."""

    def __init__(self, address: HostPort, reason: str, *, delivered: bool) -> None:
        super().__init__(f"{address}: {reason}")
        self.address, self.reason, self.delivered = address, reason, delivered


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any  # the decoded JSON, or None when the answer was not JSON
    text: str

    @property
    def error(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), str):
            return self.body["error"]
        return self.text.strip()[:300] or f"HTTP {self.status}"


class ApiClient:
    """One aiohttp session for calls to any member; close it when done."""

    def __init__(
        self, *, token: str | None = None, ssl_context: ssl.SSLContext | None = None, timeout_s: float = 2.0
    ) -> None:
        self.token = token
        self._ssl = ssl_context
        self._scheme = "https" if ssl_context is not None else "http"
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def call(
        self,
        address: HostPort,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        authorization: str | None = None,
    ) -> Answer:
        """One request; `body` is JSON-encoded unless it is bytes already.
        `authorization` replaces the header made from our own token."""
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True, limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
        all_headers = dict(headers or {})
        if authorization is not None:
            all_headers["Authorization"] = authorization
        elif self.token is not None:
            all_headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        total = self.timeout_s if timeout_s is None else timeout_s
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=min(total, CONNECT_TIMEOUT_S))
        url = f"{self._scheme}://{address}{path}"
        try:
            async with self._session.request(method, url, data=data, headers=all_headers, timeout=timeout) as resp:
                raw = await resp.content.read(ANSWER_BYTES_MAX)
                status = resp.status
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as error:
            raise Unreachable(address, _describe(error), delivered=False) from None
        except TimeoutError:
            raise Unreachable(address, f"no answer within {total:g} s", delivered=True) from None
        except aiohttp.ClientError as error:
            raise Unreachable(address, _describe(error), delivered=True) from None
        text = raw.decode("utf-8", "replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return Answer(status, parsed, text)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError) and error.os_error is not None:
        return error.os_error.strerror or str(error.os_error)
    return f"{type(error).__name__}: {error}"[:300]
