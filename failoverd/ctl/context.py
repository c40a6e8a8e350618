"""What every failoverctl command shares: the configuration, how to reach
the members' APIs, exit codes, and the one error type commands raise."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click

from failoverd.api.client import Answer, ApiClient, Unreachable, api_address, client_ssl_context, load_token
from failoverd.config.load import Config, ConfigError, load_config
from failoverd.config.secrets import SecretError

DEFAULT_CONFIG = "/etc/failoverd/failoverd.toml"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_LOCAL, EXIT_UNREACHABLE, EXIT_AUTH = 0, 1, 2, 3, 4, 5
ADMIN_TIMEOUT_S = 60.0  # a switchover's leader checkpoints first
# Statuses that mean the request reached no core: another member may do better.
_NOT_DELIVERED = (502, 503)


class CtlError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class CtlContext:
    """The configuration and how to reach the cluster, shared by every command."""

    def __init__(
        self, config_path: Path, token_file: Path | None, timeout_s: float, tls: dict[str, Path | None]
    ) -> None:
        self.config_path, self._token_file, self.timeout_s, self._tls = config_path, token_file, timeout_s, tls
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as error:
                raise CtlError("\n".join(f"{error.source}: {p}" for p in error.problems), EXIT_LOCAL) from None
        return self._config

    def token(self, needed: bool) -> str | None:
        path = self._token_file or self.config.api.token_file
        if path is None:
            if needed:
                raise CtlError(
                    "no admin token: set [api] token_file in the configuration or pass --token-file", EXIT_LOCAL
                )
            return None
        try:
            return load_token(path)
        except SecretError as error:
            if needed:
                raise CtlError(str(error), EXIT_LOCAL) from None
            return None

    def client(self, admin: bool) -> ApiClient:
        try:
            context = client_ssl_context(self.config.api, **self._tls)
        except OSError as error:
            raise CtlError(f"TLS: {error}", EXIT_LOCAL) from None
        needed = admin or self.config.api.health_auth
        return ApiClient(token=self.token(needed), ssl_context=context, timeout_s=self.timeout_s)

    def members(self) -> list[tuple[str, Any]]:
        return [(n.name, api_address(self.config, n)) for n in self.config.nodes]

    async def ask(
        self,
        client: ApiClient,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout_s: float | None = None,
        prefer: str | None = None,
    ) -> tuple[str, Answer]:
        """The first member's answer, trying members in turn (`prefer` first) while
        the request cannot have reached any core (no connection, 502, 503)."""
        failures: list[str] = []
        members = sorted(self.members(), key=lambda m: m[0] != prefer)
        last: tuple[str, Answer] | None = None
        for name, address in members:
            try:
                answer = await client.call(address, method, path, body=body, timeout_s=timeout_s)
            except Unreachable as error:
                if method != "GET" and error.delivered:
                    raise CtlError(
                        f"{name} ({address}) gave no answer: {error.reason}; the request may have "
                        "been carried out: check with failoverctl list",
                        EXIT_UNREACHABLE,
                    ) from None
                failures.append(f"{name} ({address}): {error.reason}")
                continue
            if answer.status in (401, 403):
                raise CtlError(f"{name}: {answer.error}", EXIT_AUTH)
            if method != "GET" and answer.status in _NOT_DELIVERED:
                failures.append(f"{name}: {answer.error}")
                last = (name, answer)
                continue
            return name, answer
        if last is not None:
            raise CtlError("no member could carry out the request:\n  " + "\n  ".join(failures), EXIT_REFUSED)
        raise CtlError("no member answered:\n  " + "\n  ".join(failures), EXIT_UNREACHABLE)

    async def cluster(self, client: ApiClient, prefer: str | None = None) -> dict[str, Any]:
        name, answer = await self.ask(client, "GET", "/cluster", prefer=prefer)
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise CtlError(f"{name}: {answer.error}", EXIT_REFUSED)
        return answer.body

    async def admin(self, client: ApiClient, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """An admin request; CtlError(EXIT_REFUSED) with the cluster's reason if refused."""
        _, answer = await self.ask(client, method, path, body, timeout_s=ADMIN_TIMEOUT_S)
        if answer.status >= 300 or not isinstance(answer.body, dict):
            raise CtlError(f"refused: {answer.error}", EXIT_REFUSED)
        return answer.body


pass_ctl = click.make_pass_decorator(CtlContext)


def run(coroutine_fn: Callable[[], Coroutine[Any, Any, int | None]]) -> NoReturn:
    try:
        code = asyncio.run(coroutine_fn())
    except CtlError as error:
        click.echo(f"failoverctl: {error}", err=True)
        sys.exit(error.code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or EXIT_OK)


def confirm(force: bool, question: str) -> None:
    if force:
        return
    if not sys.stdin.isatty():
        raise CtlError(f"{question[0].upper()}{question[1:]} Not confirmed: no terminal; pass --force", EXIT_USAGE)
    if not click.confirm(question[0].upper() + question[1:], default=False):
        raise CtlError("aborted", EXIT_REFUSED)
