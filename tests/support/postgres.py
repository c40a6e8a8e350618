"""Helpers for tests and benchmarks against real PostgreSQL servers on 127.0.0.1:
finding the server programs and the OS user to run them as, a configuration
of members with free ports, connections, and cleanup.

Servers are found and stopped by the PID in their postmaster.pid, and only
when that process really runs in a directory under the test's base directory:
never by name, never anything the test did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg

from failoverd.adapters.postgres.adapter import PostgresAdapter, socket_dir_for
from failoverd.adapters.processes import process_alive
from failoverd.config.load import Config, parse_config
from tests.support.ports import free_ports

SECRET = b"integration-test-secret"
LOOPBACK = "127.0.0.1"


def find_bin_dir() -> Path | None:
    """Where the PostgreSQL server programs are, as the adapter would find them."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    bin_dir = Path(out.stdout.strip())
    return bin_dir if (bin_dir / "postgres").exists() else None


def require_bin_dir() -> Path:
    """find_bin_dir() for the bench scripts: exits 2, saying why, when there is none."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit(
            "PostgreSQL server programs not found (pg_config --bindir); "
            "as root: apt-get install postgresql (or make postgres-server)"
        )
    return bin_dir


def pg_os_user() -> tuple[str, tuple[int, int] | None]:
    """(OS user to run PostgreSQL as, (uid, gid) to own its directories):
    `postgres` when we are root, since PostgreSQL refuses root; ourselves,
    owning nothing, otherwise."""
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        return "postgres", (entry.pw_uid, entry.pw_gid)
    return pwd.getpwuid(os.geteuid()).pw_name, None


def terminate(proc: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM a child we started (by its PID), SIGKILL it after `grace_s`; its exit status."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def config_text(
    base: Path,
    names: list[str],
    pg_ports: list[int],
    peer_ports: list[int],
    *,
    bin_dir: Path,
    os_user: str,
    extra_postgres: str = "",
) -> str:
    nodes = "".join(
        f"""
[[nodes]]
name = "{name}"
peer = "{LOOPBACK}:{peer}"

  [nodes.postgres]
  host = "{LOOPBACK}"
  port = {pg}
  data_dir = "{base / name / "data"}"
"""
        for name, pg, peer in zip(names, pg_ports, peer_ports, strict=True)
    )
    return f"""
[cluster]
name = "itest"
secret_file = "{base / "secret"}"
state_dir = "{base / "state"}"

[postgres]
bin_dir = "{bin_dir}"
os_user = "{os_user}"
probe_timeout_s = 1.0
command_timeout_s = 60
{extra_postgres}
{nodes}"""


def make_config(
    base: Path, *, bin_dir: Path, os_user: str, names: tuple[str, ...] = ("db1", "db2", "db3"), extra_postgres: str = ""
) -> Config:
    ports = free_ports(2 * len(names))
    text = config_text(
        base,
        list(names),
        ports[: len(names)],
        ports[len(names) :],
        bin_dir=bin_dir,
        os_user=os_user,
        extra_postgres=extra_postgres,
    )
    return parse_config(text, source="integration-test", node=names[0])


def adapters(config: Config) -> dict[str, PostgresAdapter]:
    return {n.name: PostgresAdapter(config, n, SECRET) for n in config.nodes}


def prepare_node_dirs(config: Config, owner: tuple[int, int] | None) -> None:
    """Each member's parent directory, owned by the PostgreSQL OS user."""
    for node in config.nodes:
        assert node.postgres is not None
        parent = node.postgres.data_dir.parent
        parent.mkdir(mode=0o755)
        if owner is not None:
            os.chown(parent, *owner)


@contextlib.asynccontextmanager
async def connect(adapter: PostgresAdapter, **settings: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection over the member's private socket."""
    pg = adapter.pg
    conn = await asyncpg.connect(
        host=str(adapter.socket_dir),
        port=pg.port,
        user=pg.superuser,
        database=pg.database,
        timeout=10,
        server_settings=settings or None,
    )
    try:
        yield conn
    finally:
        await conn.close(timeout=5)


async def query(adapter: PostgresAdapter, sql: str, *args: Any) -> Any:
    async with connect(adapter) as conn:
        return await asyncio.wait_for(conn.fetchval(sql, *args), 30)


# --- cleanup: by PID, only our own servers -------------------------------------


def _postmasters_under(base: Path) -> Iterator[int]:
    root = os.path.realpath(base)
    for pidfile in base.glob("*/*/postmaster.pid"):
        try:
            pid = abs(int(pidfile.read_text().split("\n", 1)[0]))
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (OSError, ValueError):
            continue
        if pid > 1 and (cwd + "/").startswith(root + "/"):
            yield pid


def stop_servers_under(base: Path, grace_s: float = 5.0) -> list[int]:
    """Stop every postmaster running in a directory under `base`: SIGCONT (it
    may be a stopped test subject), SIGQUIT, then SIGKILL after `grace_s`."""
    pids = list(_postmasters_under(base))
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGQUIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + grace_s
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def socket_dirs(config: Config) -> list[Path]:
    return [socket_dir_for(config, n.postgres) for n in config.nodes if n.postgres is not None]
