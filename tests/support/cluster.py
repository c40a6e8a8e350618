"""A real cluster on this machine: `failoverd run` processes on loopback, each
managing a real PostgreSQL, plus a writer that records every acknowledged
insert and a sampler that looks for two servers out of recovery at once.

Supervisors run as the PostgreSQL OS user when the tests run as root. That
user may not be able to enter the checkout or its virtualenv (a clone under
/root), so the harness copies the package and its dependencies into a
"runtime bundle" under the test's temporary directory and runs the system
interpreter on it (the virtualenv is built from that same interpreter, so
compiled dependencies match). Every process is stopped by the PID recorded
when it was started, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Imported here, not on first use: importing aiohttp takes long enough to
# stall the event loop that the writer and the sampler run on.
import aiohttp
import asyncpg

import failoverd
from failoverd.adapters.postgres.adapter import PostgresAdapter, socket_dir_for
from failoverd.config.load import Config, parse_config
from failoverd.core.state import PgRole
from tests.support.ports import free_ports
from tests.support.postgres import stop_servers_under, terminate
from tests.support.waiting import wait_for

SECRET = b"integration-test-secret-0123456789"
API_TOKEN = "integration-test-api-token-0123456789"
LOOPBACK = "127.0.0.1"


def make_runtime_bundle(base: Path) -> Path:
    """The failoverd package and the libraries it needs at run time (its
    requirements, followed through theirs, without extras), readable by
    anyone. Only those: the virtualenv also holds the test and lint tools,
    ten times the size."""
    bundle = base / "bundle"
    bundle.mkdir()
    for dist in _runtime_distributions():
        for name in dist.files or ():
            source = Path(str(dist.locate_file(name))).resolve()
            relative = Path(str(name))
            if relative.is_absolute() or ".." in relative.parts or "__pycache__" in relative.parts:
                continue  # console scripts and the like, outside site-packages; caches
            if source.is_file():
                (bundle / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, bundle / relative)
    # failoverd itself from its sources (an editable install lists no files of them).
    shutil.rmtree(bundle / "failoverd", ignore_errors=True)
    shutil.copytree(
        Path(failoverd.__file__).resolve().parent, bundle / "failoverd", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(["chmod", "-R", "a+rX", str(bundle)], check=True)
    return bundle


def _runtime_distributions() -> list[importlib.metadata.Distribution]:
    """failoverd's installed distribution and those it requires at run time."""
    from packaging.requirements import Requirement

    found: dict[str, importlib.metadata.Distribution] = {}
    todo = ["failoverd"]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        for line in dist.requires or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


@contextlib.contextmanager
def readable_runtime(prefix: str = "failoverd-runtime-") -> Iterator[Path]:
    """A runtime bundle (make_runtime_bundle) in a fresh directory under /tmp
    that any user can enter, removed afterwards: for code run as another
    user, who may not reach the checkout or its virtualenv (a 0700 home)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        yield make_runtime_bundle(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def system_python() -> str:
    """The interpreter the virtualenv was built from (it runs for any user)."""
    return os.path.realpath(sys.executable)


@dataclass
class Supervisor:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def watchdog_pids(self) -> list[int]:
        return [e["pid"] for e in self.log_events() if e.get("event") == "watchdog_started" and "pid" in e]


@dataclass
class LocalCluster:
    base: Path
    bin_dir: Path
    os_user: str
    owner: tuple[int, int] | None
    data_names: tuple[str, ...] = ("db1", "db2", "db3")
    witness_names: tuple[str, ...] = ()
    timing: str = ""
    supervisors: dict[str, Supervisor] = field(default_factory=dict)
    extra_pids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bundle = make_runtime_bundle(self.base)
        names = self.data_names + self.witness_names
        ports = free_ports(3 * len(names))
        self.pg_ports = dict(zip(names, ports[: len(names)], strict=True))
        self.peer_ports = dict(zip(names, ports[len(names) : 2 * len(names)], strict=True))
        self.api_ports = dict(zip(names, ports[2 * len(names) :], strict=True))
        secret = self.base / "secret"
        secret.write_bytes(SECRET)
        os.chmod(secret, 0o600)
        self.token_path = self.base / "api-token"
        self.token_path.write_text(API_TOKEN + "\n")
        os.chmod(self.token_path, 0o600)
        for d in [self.base / "state", *(self.base / n for n in self.data_names)]:
            d.mkdir(mode=0o755, exist_ok=True)
        if self.owner is not None:
            for p in [secret, self.token_path, self.base / "state", *(self.base / n for n in self.data_names)]:
                os.chown(p, *self.owner)
        self.config_path = self.base / "cluster.toml"
        self.config_path.write_text(self._config_text())
        os.chmod(self.config_path, 0o644)
        self.config: Config = parse_config(
            self.config_path.read_text(), source=str(self.config_path), node=self.data_names[0]
        )
        self.adapters = {n.name: PostgresAdapter(self.config, n, SECRET) for n in self.config.nodes if n.postgres}

    def _config_text(self) -> str:
        nodes = ""
        for name in self.data_names:
            nodes += f"""
[[nodes]]
name = "{name}"
peer = "{LOOPBACK}:{self.peer_ports[name]}"
api = "{LOOPBACK}:{self.api_ports[name]}"
  [nodes.postgres]
  host = "{LOOPBACK}"
  port = {self.pg_ports[name]}
  data_dir = "{self.base / name / "data"}"
"""
        for name in self.witness_names:
            nodes += f"""
[[nodes]]
name = "{name}"
kind = "witness"
peer = "{LOOPBACK}:{self.peer_ports[name]}"
api = "{LOOPBACK}:{self.api_ports[name]}"
"""
        return f"""
[cluster]
name = "itest"
secret_file = "{self.base / "secret"}"
state_dir = "{self.base / "state"}"

[timing]
{self.timing}

[postgres]
bin_dir = "{self.bin_dir}"
os_user = "{self.os_user}"

[api]
token_file = "{self.token_path}"

[logging]
level = "info"
format = "json"
{nodes}"""

    # ------------------------------------------------------------ processes

    def start(self, name: str) -> Supervisor:
        argv = [system_python(), "-m", "failoverd", "run", "--config", str(self.config_path), "--node", name]
        if os.geteuid() == 0 and self.os_user != "root":
            argv = ["setpriv", f"--reuid={self.os_user}", f"--regid={self.os_user}", "--init-groups", *argv]
        log_path = self.base / f"{name}.supervisor.log"
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(self.bundle), "LANG": "C.UTF-8"}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True)
        log.close()
        sup = Supervisor(name, proc, log_path)
        self.supervisors[name] = sup
        return sup

    def start_all(self) -> None:
        for name in self.data_names + self.witness_names:
            self.start(name)

    def signal_supervisor(self, name: str, sig: int) -> None:
        self.supervisors[name].proc.send_signal(sig)

    def stop_supervisor(self, name: str, timeout_s: float = 15.0) -> int | None:
        sup = self.supervisors[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup.proc.pid, signal.SIGCONT)
        return terminate(sup.proc, timeout_s)

    def postmaster_pid(self, name: str) -> int | None:
        return self.adapters[name].postmaster_pid()

    def cleanup(self) -> None:
        watchdogs = [pid for s in self.supervisors.values() for pid in s.watchdog_pids()]
        for name, sup in self.supervisors.items():
            if sup.proc.poll() is None:
                self.stop_supervisor(name)
        for pid in watchdogs + self.extra_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_servers_under(self.base)

    def logs(self) -> str:
        return "\n".join(
            f"--- {n}\n" + s.log_path.read_text(errors="replace")[-6000:] for n, s in self.supervisors.items()
        )

    # --------------------------------------------------------------- probes

    async def roles(self) -> dict[str, PgRole]:
        now = time.monotonic()
        obs = await asyncio.gather(*(a.probe(now) for a in self.adapters.values()))
        return {name: o.role for name, o in zip(self.adapters, obs, strict=True)}

    async def primary(self) -> str | None:
        prim = [n for n, r in (await self.roles()).items() if r is PgRole.PRIMARY]
        return prim[0] if len(prim) == 1 else None

    async def wait_for(self, what: str, check, timeout_s: float = 60.0):
        """tests.support.wait_for, with the supervisors' logs in the failure."""
        return await wait_for(what, check, timeout_s, interval_s=0.2, detail=self.logs)

    async def healthy(self, primary: str | None = None) -> str | None:
        """The primary's name once there is one primary and every other running data member streams from it."""
        roles = await self.roles()
        prim = [n for n, r in roles.items() if r is PgRole.PRIMARY]
        if len(prim) != 1 or (primary is not None and prim[0] != primary):
            return None
        now = time.monotonic()
        for name, adapter in self.adapters.items():
            if name == prim[0]:
                continue
            o = await adapter.probe(now)
            if o.role is not PgRole.STANDBY or o.following != prim[0]:
                return None
        return prim[0]

    # ------------------------------------------------------------ REST API

    def api_url(self, name: str, path: str) -> str:
        return f"http://{LOOPBACK}:{self.api_ports[name]}{path}"

    async def api(
        self,
        name: str,
        method: str,
        path: str,
        *,
        body: object = None,
        token: str | None = API_TOKEN,
        timeout_s: float = 60.0,
    ) -> tuple[int, object]:
        """One call to a member's API: (status, decoded JSON or the text)."""
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.request(method, self.api_url(name, path), json=body, headers=headers) as resp,
        ):
            text = await resp.text()
            status = resp.status
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def ctl(self, *args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
        """Run the installed failoverctl on this cluster's configuration (in a
        thread, so the test's event loop keeps running its writer and sampler)."""
        argv = [str(Path(sys.executable).parent / "failoverctl"), "--config", str(self.config_path), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)

    async def actl(self, *args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(self.ctl, *args, timeout_s=timeout_s)

    def dsn_hosts(self) -> tuple[list[str], list[int]]:
        hosts = [str(socket_dir_for(self.config, n.postgres)) for n in self.config.nodes if n.postgres]
        ports = [n.postgres.port for n in self.config.nodes if n.postgres]
        return hosts, ports


class _Background:
    """A coroutine `_run` run as a task between `start()` and `stop()`."""

    _task: asyncio.Task | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._closed()

    def _closed(self) -> None:
        """Release what the task held."""


class DualPrimarySampler:
    """Asks every member `pg_is_in_recovery()` every `interval_s` over a kept
    connection and records instants at which two servers were out of recovery
    (tests/support/sampler_proc.py, in a process of its own: the test's interpreter also
    runs writers, fault injection and log parsing, and a sampler sharing its
    event loop, or only its GIL, fell behind under load). A member that does
    not answer within the interval counts as not primary for that sample (it
    cannot be taking writes from us either)."""

    def __init__(self, cluster: LocalCluster, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._targets = [f"{name}:{a.socket_dir}:{a.pg.port}" for name, a in cluster.adapters.items()]
        self.sample_times: list[float] = []
        self.dual: list[tuple[float, list[str]]] = []
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._junk: list[str] = []

    @property
    def running(self) -> bool:
        return self._proc is not None

    @property
    def samples(self) -> int:
        return len(self.sample_times)

    def max_gap_s(self) -> float:
        t = list(self.sample_times)
        return max((b - a for a, b in itertools.pairwise(t)), default=0.0)

    def start(self) -> None:
        argv = [sys.executable, str(Path(__file__).with_name("sampler_proc.py")), "--interval", str(self.interval_s)]
        for target in self._targets:
            argv += ["--target", target]
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, name="dual-primary-sampler-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            parts = line.split()
            if len(parts) != 3 or parts[0] != "S":
                self._junk.append(line)
                continue
            t = float(parts[1])
            self.sample_times.append(t)
            names = [] if parts[2] == "-" else parts[2].split(",")
            if len(names) > 1:
                self.dual.append((t, names))

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.stdin.close()  # its signal to stop; SIGTERM by PID if it does not
        try:
            code = await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            code = await asyncio.to_thread(proc.wait, 10)
        await asyncio.to_thread(self._reader.join, 10)
        proc.stdout.close()
        if code != 0 or self._junk:
            raise AssertionError(f"the dual-primary sampler failed (exit {code}): {''.join(self._junk)[-2000:]}")


class Writer(_Background):
    """Inserts ids through a multi-host connection that seeks the writable
    server; records each id whose COMMIT was acknowledged."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.acked: list[int] = []
        self.acked_at: list[float] = []
        self.errors = 0
        self._next = 1
        self.acked_by: list[str | None] = []
        self.pause_s = 0.01
        self._server_by_port = {n.postgres.port: n.name for n in cluster.config.nodes if n.postgres}
        self._conn: asyncpg.Connection | None = None

    async def _connect(self) -> asyncpg.Connection:
        hosts, ports = self.cluster.dsn_hosts()
        return await asyncpg.connect(
            host=hosts,
            port=ports,
            user="postgres",
            database="postgres",
            target_session_attrs="read-write",
            timeout=2,
            command_timeout=3,
        )

    async def setup(self) -> None:
        conn = await self._connect()
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY)")
        finally:
            await conn.close()

    async def _run(self) -> None:
        conn = None
        try:
            await self._write_forever(conn)
        finally:
            if self._conn is not None:
                self._conn.terminate()

    async def _write_forever(self, conn) -> None:
        server = None
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await self._connect()
                    self._conn = conn
                    port = int(await conn.fetchval("SELECT current_setting('port')"))
                    server = self._server_by_port.get(port)
                wid = self._next
                self._next += 1
                await conn.execute("INSERT INTO acked VALUES ($1)", wid)
                self.acked.append(wid)
                self.acked_at.append(time.monotonic())
                self.acked_by.append(server)
                await asyncio.sleep(self.pause_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
                conn = self._conn = None
                await asyncio.sleep(0.05)

    async def missing_on(self, name: str) -> list[int]:
        adapter = self.cluster.adapters[name]
        conn = await asyncpg.connect(
            host=str(adapter.socket_dir), port=adapter.pg.port, user="postgres", database="postgres", timeout=5
        )
        try:
            rows = await conn.fetch("SELECT id FROM acked")
        finally:
            await conn.close()
        present = {r["id"] for r in rows}
        return [w for w in self.acked if w not in present]


async def start_watched(
    cluster: LocalCluster, *, healthy_timeout_s: float, settle_s: float, writer_pause_s: float | None = None
) -> tuple[str, Writer, DualPrimarySampler]:
    """Start every member, wait for a primary with every standby streaming,
    then start a Writer and a DualPrimarySampler and let them run `settle_s`.
    Returns (primary, writer, sampler)."""
    cluster.start_all()
    primary = await cluster.wait_for("a primary with every standby streaming", cluster.healthy, healthy_timeout_s)
    writer = Writer(cluster)
    if writer_pause_s is not None:
        writer.pause_s = writer_pause_s
    await writer.setup()
    sampler = DualPrimarySampler(cluster)
    sampler.start()
    writer.start()
    await asyncio.sleep(settle_s)
    return primary, writer, sampler


async def first_write_not_by(writer: Writer, member: str, since: float, timeout_s: float) -> float | None:
    """When the writer's first write after `since` was acknowledged by a
    server other than `member`; None if none came within `timeout_s`."""
    deadline = since + timeout_s
    while True:
        first = next(
            (
                t
                for t, by in zip(writer.acked_at, writer.acked_by, strict=True)
                if t > since and by not in (None, member)
            ),
            None,
        )
        if first is not None or time.monotonic() >= deadline:
            return first
        await asyncio.sleep(0.01)
