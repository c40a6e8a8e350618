"""`failoverd run`: build the adapters from the configuration and run the supervisor.

Start-up refuses, with one clear line, anything that would make the member
unsafe: no local member, an unreadable or loosely protected secret, a corrupt
state file, a second supervisor on the same state directory, a watchdog that
does not start, an API address that cannot be bound. Shutdown on
SIGTERM/SIGINT runs in a fixed order: hand over leadership (fencing), stop the
loops, close the API server, the peer server and client, then disarm and close
the watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path

import structlog

from failoverd.api import ApiServer
from failoverd.apiclient import ApiClient, bind_address, client_ssl_context, load_token, server_ssl_context
from failoverd.config import Config
from failoverd.core.node import Node
from failoverd.peers import PeerClient, PeerMetrics, PeerServer
from failoverd.secrets import SecretError, load_secret
from failoverd.statefile import StateFile, StateFileError
from failoverd.supervisor import Supervisor, new_rng
from failoverd.watchdog import WatchdogError, WatchdogHandle


class StartupError(Exception):
    """The member cannot start safely; the message says why and what to do."""


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
        cache_logger_on_first_use=True,
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
        await _run(config, local, secret, token, StateFile(state_dir / "state.json"), log)
    finally:
        os.close(lock_fd)


def _api_tls(config: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    try:
        return server_ssl_context(config.api), client_ssl_context(config.api)
    except (OSError, ssl.SSLError) as error:
        raise StartupError(f"API TLS ([api] tls_*): {error}") from None


async def _run(config: Config, local, secret: bytes, token: str | None, statefile: StateFile, log) -> None:
    try:
        persisted = statefile.load()
    except StateFileError as error:
        raise StartupError(str(error)) from None
    server_tls, client_tls = _api_tls(config)
    node = Node(config.spec, local.name, persisted, time.monotonic(), new_rng())
    postgres = watchdog = vip = None
    if local.postgres is not None and config.vip is not None:
        from failoverd.vip import VipError, VirtualIp

        try:
            vip = VirtualIp(config.vip, log=log)
            # A member starts as a follower: a VIP still on this host from an
            # earlier life is not ours to hold.
            await vip.release()
        except VipError as error:
            raise StartupError(f"virtual IP: {error}") from None
    if local.postgres is not None:
        from failoverd.postgres import PostgresAdapter

        postgres = PostgresAdapter(config, local, secret)
        watchdog = WatchdogHandle(local.postgres.data_dir, local.postgres.bin_dir,
                                  vip_release_command=None if vip is None else vip.release_command())
        try:
            await watchdog.start()
        except WatchdogError as error:
            raise StartupError(f"fencing watchdog: {error}") from None
    others = {n.name: n.peer for n in config.nodes if n.name != local.name}
    peer_metrics = PeerMetrics()
    client = PeerClient(config.spec.name, secret, others, timeout_s=max(0.2, config.spec.timing.heartbeat_interval_s * 3),
                        metrics=peer_metrics)
    supervisor = Supervisor(
        node,
        state=statefile,
        peers=client,
        postgres=postgres,
        watchdog=watchdog,
        vip=vip,
        members={n.name: n for n in config.nodes},
        probe_interval_s=config.spec.timing.heartbeat_interval_s,
        log=log,
    )
    server = PeerServer(config.spec.name, secret, supervisor.on_message, host=local.peer.host, port=local.peer.port,
                        metrics=peer_metrics)
    listen = bind_address(config, local)
    api = ApiServer(config, local, supervisor, host=listen.host, port=listen.port, token=token,
                    peer_metrics=peer_metrics, ssl_context=server_tls,
                    client=ApiClient(token=token, ssl_context=client_tls))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(supervisor.failed.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        log.info("shutting_down", term=node.term, role=node.role.value, failed=supervisor.failed.is_set())
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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if supervisor.failed.is_set():
        raise StartupError(f"a supervisor loop failed: {supervisor.failure!r}"[:500])
