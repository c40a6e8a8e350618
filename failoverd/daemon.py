"""`failoverd run`: build the adapters from the configuration and run the supervisor.

Start-up refuses, with one clear line, anything that would make the member
unsafe: no local member, an unreadable or loosely protected secret, a corrupt
state file, a second supervisor on the same state directory, a watchdog that
does not start, an API address that cannot be bound. Shutdown on
SIGTERM/SIGINT runs in a fixed order: hand over leadership (fencing), stop the
loops, close the API server, the peer server and client, then disarm and close
the watchdog.

SIGHUP reloads the configuration file: what `failoverd.runtime.reload` allows
(timing, hooks, logging) is applied at once, the rest is logged as needing a
restart, and a file with errors changes nothing. Under systemd the daemon
reports READY once its loops, peer server and API run, STATUS on changes,
WATCHDOG pings from the event loop while the ticker keeps ticking, RELOADING
around a reload and STOPPING at shutdown (see failoverd.runtime.sdnotify).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from failoverd.adapters import programs
from failoverd.adapters.peers import PeerClient, PeerMetrics, PeerServer
from failoverd.adapters.postgres.adapter import PostgresAdapter
from failoverd.adapters.statefile import StateFile, StateFileError
from failoverd.adapters.watchdog import WatchdogError, WatchdogHandle
from failoverd.api.client import ApiClient, bind_address, client_ssl_context, load_token, server_ssl_context
from failoverd.api.server import ApiServer
from failoverd.config.load import Config, ConfigError, load_config
from failoverd.config.secrets import SecretError, load_secret
from failoverd.core.node import Node
from failoverd.runtime import sdnotify
from failoverd.runtime.hooks import HookRunner
from failoverd.runtime.ports import ProgramResult
from failoverd.runtime.reload import plan_reload
from failoverd.runtime.supervisor import Supervisor, new_rng


def _peer_timeout_s(config: Config) -> float:
    """How long one peer message may take. A timeout closes the connection,
    so it must sit well above a slow network's round trip; an answer later
    than the lease is useless anyway."""
    timing = config.spec.timing
    return max(0.3, timing.lease_s, 3 * timing.heartbeat_interval_s)


def _ticking(supervisor: Supervisor, interval_s: float | None) -> bool:
    """Healthy for systemd's watchdog: no loop died and the ticker ran lately
    (a ticker stuck on the lock stops the pings too)."""
    if supervisor.failed.is_set():
        return False
    last = supervisor.last_tick_at
    limit = max(2 * (interval_s or 0.0), 5.0)
    return last is not None and time.monotonic() - last < limit


class StartupError(Exception):
    """The member cannot start safely; the message says why and what to do."""


async def _run_hook(argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str]) -> ProgramResult:
    """The hooks' `ProgramRunner`: `programs.run` as the daemon's own user, no
    capabilities; a non-zero exit is returned, a timeout raises CommandFailed
    with `timed_out` set."""
    return await programs.run(argv, user=None, timeout_s=timeout_s, env=env, check=False)


def configure_logging(config: Config) -> None:
    level = getattr(logging, config.logging.level.upper())
    fmt = config.logging.format
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Not cached, so that a reload's new level and format reach loggers
        # that were bound before it.
        cache_logger_on_first_use=False,
    )


def _lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock for our lifetime: two supervisors sharing a state
    file could each believe their own vote was the persisted one."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise StartupError(f"state directory {state_dir}: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"state directory {state_dir} is in use by another failoverd process") from None
    return fd


async def run_daemon(config: Config) -> None:
    # Before any child starts: the watchdog process and hooks must not
    # inherit $NOTIFY_SOCKET and report in our name.
    notifier = sdnotify.Notifier.from_environment(unset=True)
    try:
        await _run_daemon(config, notifier)
    except StartupError as error:
        notifier.status(f"cannot start: {error}")
        raise
    finally:
        notifier.close()


async def _run_daemon(config: Config, notifier: sdnotify.Notifier) -> None:
    local = config.local
    if local is None:
        raise StartupError("no local member: pass --node NAME or name a member like this host")
    log = structlog.get_logger("failoverd").bind(node=local.name)
    try:
        secret = load_secret(config.cluster.secret_file)
        token = None if config.api.token_file is None else load_token(config.api.token_file)
    except SecretError as error:
        raise StartupError(str(error)) from None
    # One directory per member, so that several members can share a state_dir
    # (a local test or demo cluster) without sharing a vote.
    state_dir = config.cluster.state_dir / local.name
    lock_fd = _lock_state_dir(state_dir)
    try:
        await _run(config, local, secret, token, StateFile(state_dir / "state.json"), log, notifier)
    finally:
        os.close(lock_fd)


class Reloader:
    """SIGHUP and `POST /reload`: re-read the configuration file, apply what
    may change live, keep the old values of the rest, and say what happened."""

    def __init__(
        self,
        config: Config,
        supervisor: Supervisor,
        hooks: HookRunner,
        notifier: sdnotify.Notifier,
        postgres: PostgresAdapter | None,
        log: Any,
    ) -> None:
        self.config = config
        self.supervisor, self.hooks, self.notifier, self.postgres, self.log = supervisor, hooks, notifier, postgres, log
        self._lock = asyncio.Lock()  # one reload at a time

    async def reload(self) -> dict[str, Any]:
        async with self._lock:
            self.notifier.reloading()
            try:
                return await self._reload()
            finally:
                self.notifier.ready(sdnotify.status_line(self.supervisor.status()))

    async def _reload(self) -> dict[str, Any]:
        config, supervisor, log = self.config, self.supervisor, self.log
        term = supervisor.node.term
        local = config.local
        assert local is not None  # _run_daemon does not start without one, and a reload keeps it
        try:
            new = load_config(config.source, node=local.name)
        except ConfigError as bad:
            log.error("config_reload_failed", term=term, problems=bad.problems[:20])
            return {"ok": False, "error": "the file has problems; nothing changed", "problems": bad.problems[:20]}
        except OSError as unreadable:
            log.error("config_reload_failed", term=term, problems=[str(unreadable)])
            return {"ok": False, "error": f"cannot read {config.source}: {unreadable}"}
        plan = plan_reload(config, new)
        applied: list[str] = []
        pending: tuple[str, ...] = () if self.postgres is None else self.postgres.pending_restart
        error: str | None = None
        if plan.timing is not None:
            await supervisor.retime(plan.timing)
            applied.append("timing")
        if plan.hooks is not None:
            self.hooks.update(plan.hooks)
            applied.append("hooks")
        if plan.logging is not None:
            configure_logging(new)
            applied.append("logging")
        pg_settings = config.pg_settings
        if plan.pg_settings is not None and self.postgres is not None:
            try:
                pending = await self.postgres.apply_settings(plan.pg_settings)
                pg_settings = plan.pg_settings
                applied.append("postgres settings")
            except Exception as exc:  # noqa: BLE001 - reported; the server runs with the settings it had
                error = f"PostgreSQL settings not applied: {exc}"[:500]
        elif plan.pg_settings is not None:
            pg_settings = plan.pg_settings  # a witness: nothing to apply
        log.info(
            "config_reloaded",
            term=term,
            applied=applied,
            needs_restart=list(plan.needs_restart),
            refused=list(plan.refused),
            pending_restart=list(pending),
            error=error,
        )
        # Keep the old values of what was not applied, so a later reload
        # still compares against what is really running.
        self.config = dataclasses.replace(
            config,
            spec=dataclasses.replace(config.spec, timing=plan.timing or config.spec.timing),
            hooks=plan.hooks or config.hooks,
            logging=plan.logging or config.logging,
            pg_settings=pg_settings,
        )
        return {
            "ok": error is None,
            "applied": applied,
            "failoverd_needs_restart": list(plan.needs_restart),
            "refused": list(plan.refused),
            "pending_restart": list(pending),
            "error": error,
        }


def _peer_tls(config: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """Mutual TLS for the supervisors' RPC, or (None, None). The HMAC
    signature stays on either way; TLS adds confidentiality and hides the
    cluster's traffic from the network."""
    cluster = config.cluster
    cert = cluster.tls_cert
    if cert is None:  # not cluster.tls
        return None, None
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cluster.tls_ca)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        server.load_cert_chain(cert, cluster.tls_key)
        server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.create_default_context(cafile=cluster.tls_ca)
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        client.load_cert_chain(cert, cluster.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise StartupError(f"peer TLS ([cluster] tls_*): {error}") from None
    return server, client


def _api_tls(config: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    try:
        return server_ssl_context(config.api), client_ssl_context(config.api)
    except (OSError, ssl.SSLError) as error:
        raise StartupError(f"API TLS ([api] tls_*): {error}") from None


async def _run(
    config: Config, local, secret: bytes, token: str | None, statefile: StateFile, log, notifier: sdnotify.Notifier
) -> None:
    try:
        persisted = statefile.load()
    except StateFileError as error:
        raise StartupError(str(error)) from None
    server_tls, client_tls = _api_tls(config)
    peer_server_tls, peer_client_tls = _peer_tls(config)
    node = Node(config.spec, local.name, persisted, time.monotonic(), new_rng())
    postgres = watchdog = vip = None
    if local.postgres is not None and config.vip is not None:
        from failoverd.adapters.vip import VipError, VirtualIp

        try:
            vip = VirtualIp(config.vip, log=log)
            # A member starts as a follower: a VIP still on this host from an
            # earlier life is not ours to hold.
            await vip.release()
        except VipError as error:
            raise StartupError(f"virtual IP: {error}") from None
    if local.postgres is not None:
        postgres = PostgresAdapter(config, local, secret, keep_probe_connection=True)
        watchdog = WatchdogHandle(
            local.postgres.data_dir,
            local.postgres.bin_dir,
            vip_release_command=None if vip is None else vip.release_command(),
        )
        try:
            await watchdog.start()
        except WatchdogError as error:
            raise StartupError(f"fencing watchdog: {error}") from None
    others = {n.name: n.peer for n in config.nodes if n.name != local.name}
    peer_metrics = PeerMetrics()
    client = PeerClient(
        config.spec.name,
        secret,
        others,
        member=local.name,
        timeout_s=_peer_timeout_s(config),
        metrics=peer_metrics,
        ssl_context=peer_client_tls,
    )
    hooks = HookRunner(
        config.hooks,
        cluster=config.spec.name,
        node=local.name,
        run=_run_hook,
        vip=None if config.vip is None else str(config.vip.address),
        log=log,
    )
    supervisor = Supervisor(
        node,
        hooks=hooks,
        state=statefile,
        peers=client,
        postgres=postgres,
        watchdog=watchdog,
        vip=vip,
        members={n.name: n for n in config.nodes},
        log=log,
    )
    server = PeerServer(
        config.spec.name,
        secret,
        supervisor.on_message,
        member=local.name,
        host=local.peer.host,
        port=local.peer.port,
        metrics=peer_metrics,
        ssl_context=peer_server_tls,
    )
    listen = bind_address(config, local)
    reloader = Reloader(config, supervisor, hooks, notifier, postgres, log)
    api = ApiServer(
        config,
        local,
        supervisor,
        host=listen.host,
        port=listen.port,
        token=token,
        peer_metrics=peer_metrics,
        ssl_context=server_tls,
        client=ApiClient(token=token, ssl_context=client_tls),
        reload=reloader.reload,
    )
    stop = asyncio.Event()
    reload_asked = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_asked.set)
    pinger: asyncio.Task | None = None
    try:
        await supervisor.start()
        try:
            await server.start()
        except OSError as error:
            raise StartupError(f"peer address {local.peer}: {error.strerror or error}") from None
        try:
            await api.start()
        except OSError as error:
            raise StartupError(f"API address {listen} ([api] listen / nodes.api): {error.strerror or error}") from None
        log.info("running", term=node.term, role=node.role.value, members=sorted(others))
        # READY once we serve peers and operators, not once a leader is known:
        # a rolling start (one member at a time) would otherwise deadlock.
        notifier.ready(sdnotify.status_line(supervisor.status()))
        if notifier.enabled:
            interval = notifier.watchdog_interval_s
            pinger = asyncio.create_task(
                sdnotify.watchdog_pinger(
                    notifier,
                    interval,
                    healthy=lambda: _ticking(supervisor, interval),
                    status=lambda: sdnotify.status_line(supervisor.status()),
                ),
                name="sd_watchdog",
            )
        while True:
            waiters = [
                asyncio.create_task(stop.wait()),
                asyncio.create_task(supervisor.failed.wait()),
                asyncio.create_task(reload_asked.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            if stop.is_set() or supervisor.failed.is_set():
                break
            reload_asked.clear()
            await reloader.reload()
        log.info("shutting_down", term=node.term, role=node.role.value, failed=supervisor.failed.is_set())
        notifier.stopping("handing over leadership" if node.role.value == "leader" else "stopping")
    finally:
        await supervisor.stop()
        await api.close()
        await api.client.close()
        await server.close()
        await client.close()
        if watchdog is not None:
            with contextlib.suppress(WatchdogError):
                if not node.watchdog_armed:
                    await watchdog.disarm()
            await watchdog.close()
        if vip is not None:
            await vip.close()
        if postgres is not None:
            postgres.close()
        await hooks.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if pinger is not None:  # last: systemd hears from us through a long shutdown
            pinger.cancel()
            await asyncio.wait({pinger})
    if supervisor.failed.is_set():
        raise StartupError(f"a supervisor loop failed: {supervisor.failure!r}"[:500])
