"""HAProxy and PgBouncer in the e2e lab, run from the files operators copy:
deploy/haproxy.cfg and deploy/pgbouncer.ini.

Both run in the lab's client namespace, as unprivileged users (haproxy as
`haproxy` where the package created it, pgbouncer as `postgres`; pgbouncer
refuses root), in the foreground, each recorded by its PID and stopped by it:

    127.0.0.1:5000  HAProxy write port (GET /primary on each member's API)
    127.0.0.1:5001  HAProxy read port (GET /replica?lag=16MB)
    127.0.0.1:6432  PgBouncer -> the VIP
    127.0.0.1:6433  PgBouncer -> HAProxy's write port

The files are rendered by replacing whole lines or the documented example
values (the members 198.18.0.11-13 and the VIP 198.18.0.100 of
configs/three-nodes-quorum.toml) with the lab's; every replacement must
match, so a change of the files that the rendering no longer fits fails
loudly instead of testing something else. What is replaced, and why:

* haproxy.cfg `global`: `chroot`, `user`, `group` and `daemon` go (the
  process already runs unprivileged, in the foreground, where the test can
  stop it by PID); the log goes to stdout (the lab's log file) instead of
  /dev/log, the stats socket into the lab's directory.
* pgbouncer.ini: the paths (socket directory, log, pid file, user list) go
  into the lab's directory; the second instance listens on 6433 and uses the
  file's commented HAProxy line instead of the VIP line.

A fault run (`run_paths`) writes through every path at once, next to a
client writing straight to the VIP, so the write gaps of one failover are
measured side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cluster import DualPrimarySampler
from tests.support.e2e.checker import FAST, Ack, ClientRun, VipMonitor, longest_gap
from tests.support.e2e.lab import CLIENT, DATA, PG_PORT, WRITER_PASSWORD, WRITER_USER, E2ELab
from tests.support.e2e.scenarios import (
    HEALTHY_TIMEOUT_S,
    HOLD_AFTER_FAILOVER_S,
    SAMPLE_INTERVAL_S,
    WRITES_AFTER_HEAL,
    Fault,
    timeline,
)
from tests.support.postgres import terminate
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[3]
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
PGBOUNCER_INI = REPO / "deploy" / "pgbouncer.ini"
EXAMPLE_MEMBERS = {"db1": "198.18.0.11", "db2": "198.18.0.12", "db3": "198.18.0.13"}
EXAMPLE_VIP = "198.18.0.100"
WRITE_PORT = 5000
READ_PORT = 5001
PGBOUNCER_VIP_PORT = 6432
PGBOUNCER_HAPROXY_PORT = 6433
WRITE_BACKEND = "pg_primary"
READ_BACKEND = "pg_replicas"
READ_LAG = "16MB"  # what deploy/haproxy.cfg's read check allows (checked when rendering)
READ_LAG_BYTES = 16 * 1024 * 1024
FIRST_WRITE_BOUND_S = 30.0  # writes must resume within this: liveness only, the gap is measured
_START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Route:
    """A way for a client to reach the primary, from the client namespace."""

    name: str
    host: str | None  # None: the VIP
    port: int
    pooled: bool = False


PATHS = (
    Route("vip", None, PG_PORT),
    Route("haproxy", "127.0.0.1", WRITE_PORT),
    Route("pgbouncer-vip", "127.0.0.1", PGBOUNCER_VIP_PORT, pooled=True),
    Route("pgbouncer-haproxy", "127.0.0.1", PGBOUNCER_HAPROXY_PORT, pooled=True),
)


def find_program(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def proxies_unsupported_reason() -> str | None:
    """Why HAProxy and PgBouncer cannot be run here, or None."""
    missing = [p for p in ("haproxy", "pgbouncer") if find_program(p) is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install haproxy pgbouncer; `make test` installs them)"
    return None


def _replace(text: str, old: str, new: str, what: str) -> str:
    if text.count(old) != 1:
        raise AssertionError(f"rendering {what}: expected {old!r} exactly once, found it {text.count(old)} times")
    return text.replace(old, new)


def render_haproxy(text: str, lab: E2ELab, run_dir: Path) -> str:
    """deploy/haproxy.cfg with the lab's members and the process settings of a
    foreground, unprivileged instance (module docstring)."""
    for line in ("    chroot /var/lib/haproxy\n", "    user haproxy\n", "    group haproxy\n", "    daemon\n"):
        text = _replace(text, line, "", "haproxy.cfg")
    text = _replace(text, "    log /dev/log local0\n", "    log stdout format short local0 info\n", "haproxy.cfg")
    text = _replace(
        text,
        "    stats socket /run/haproxy/admin.sock mode 660 level admin\n",
        f"    stats socket {run_dir / 'haproxy.sock'} mode 600 level admin\n",
        "haproxy.cfg",
    )
    if text.count(f"option httpchk GET /replica?lag={READ_LAG}\n") != 1:  # the bound the read test uses
        raise AssertionError(f"rendering haproxy.cfg: the read check is not /replica?lag={READ_LAG}")
    for name, example in EXAMPLE_MEMBERS.items():
        old = f"    server {name} {example}:{PG_PORT}\n"
        if text.count(old) != 2:  # one line in each backend
            raise AssertionError(f"rendering haproxy.cfg: expected {old!r} twice")
        text = text.replace(old, f"    server {name} {lab.address(name)}:{PG_PORT}\n")
    return text


def render_pgbouncer(text: str, lab: E2ELab, run_dir: Path, *, port: int, via_haproxy: bool) -> str:
    """deploy/pgbouncer.ini with the lab's VIP (or HAProxy's line), port and paths."""
    vip_line = f"* = host={EXAMPLE_VIP} port={PG_PORT}\n"
    haproxy_line = f";* = host=127.0.0.1 port={WRITE_PORT}\n"
    if via_haproxy:
        text = _replace(text, vip_line, ";" + vip_line, "pgbouncer.ini")
        text = _replace(text, haproxy_line, haproxy_line[1:], "pgbouncer.ini")
    else:
        text = _replace(text, vip_line, f"* = host={lab.vip} port={PG_PORT}\n", "pgbouncer.ini")
    for old, new in (
        ("listen_port = 6432\n", f"listen_port = {port}\n"),
        ("unix_socket_dir = /var/run/postgresql\n", f"unix_socket_dir = {run_dir}\n"),
        ("logfile = /var/log/postgresql/pgbouncer.log\n", f"logfile = {run_dir / f'pgbouncer-{port}.log'}\n"),
        ("pidfile = /var/run/postgresql/pgbouncer.pid\n", f"pidfile = {run_dir / f'pgbouncer-{port}.pid'}\n"),
        ("auth_file = /etc/pgbouncer/userlist.txt\n", f"auth_file = {run_dir / 'userlist.txt'}\n"),
    ):
        text = _replace(text, old, new, "pgbouncer.ini")
    return text


@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int


class Proxies:
    """HAProxy and two PgBouncers in the lab's client namespace."""

    def __init__(self, lab: E2ELab) -> None:
        self.lab = lab
        self.procs: list[Proxy] = []
        self.haproxy_user = _user("haproxy") or _user("postgres")
        self.pgbouncer_user = _user("postgres")
        if self.haproxy_user is None or self.pgbouncer_user is None:
            raise RuntimeError("no 'haproxy' or 'postgres' OS user to run the proxies as")
        self.haproxy_dir = lab.base / "haproxy"
        self.pgbouncer_dir = lab.base / "pgbouncer"
        self.stats_socket = self.haproxy_dir / "haproxy.sock"

    def start(self) -> Proxies:
        try:
            for d, (uid, gid) in ((self.haproxy_dir, self.haproxy_user), (self.pgbouncer_dir, self.pgbouncer_user)):
                d.mkdir(mode=0o700)
                os.chown(d, uid, gid)
            cfg = self.haproxy_dir / "haproxy.cfg"
            cfg.write_text(render_haproxy(HAPROXY_CFG.read_text(), self.lab, self.haproxy_dir))
            os.chown(cfg, *self.haproxy_user)
            self._check_haproxy(cfg)
            userlist = self.pgbouncer_dir / "userlist.txt"
            userlist.write_text(f'"{WRITER_USER}" "{WRITER_PASSWORD}"\n')
            os.chmod(userlist, 0o600)
            os.chown(userlist, *self.pgbouncer_user)
            self._spawn("haproxy", WRITE_PORT, [find_program("haproxy") or "haproxy", "-db", "-f", str(cfg)])
            for port, via in ((PGBOUNCER_VIP_PORT, False), (PGBOUNCER_HAPROXY_PORT, True)):
                ini = self.pgbouncer_dir / f"pgbouncer-{port}.ini"
                ini.write_text(
                    render_pgbouncer(
                        PGBOUNCER_INI.read_text(), self.lab, self.pgbouncer_dir, port=port, via_haproxy=via
                    )
                )
                os.chown(ini, *self.pgbouncer_user)
                self._spawn(f"pgbouncer-{port}", port, [find_program("pgbouncer") or "pgbouncer", str(ini)])
            for proxy in self.procs:
                self._wait_listening(proxy)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_haproxy(self, cfg: Path) -> None:
        done = subprocess.run(
            [find_program("haproxy") or "haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(f"haproxy -c rejects the rendered deploy/haproxy.cfg:\n{done.stdout}{done.stderr}")

    def _spawn(self, name: str, port: int, argv: list[str]) -> None:
        uid, gid = self.haproxy_user if name == "haproxy" else self.pgbouncer_user
        run = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--inh-caps=-all", "--", *argv]
        log_path = self.lab.base / f"{name}.log"
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*self.lab.net.exec_prefix(CLIENT), *run],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        self.procs.append(Proxy(name, proc, log_path, port))

    def _wait_listening(self, proxy: Proxy) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proxy.proc.poll() is not None:
                raise RuntimeError(f"{proxy.name} exited ({proxy.proc.returncode}):\n{self.log_tail(proxy)}")
            out = self.lab.run_in(CLIENT, ["ss", "-Hltn", f"sport = :{proxy.port}"], check=False)
            if out.strip():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{proxy.name} not listening on {proxy.port} after {_START_TIMEOUT_S} s")

    def log_tail(self, proxy: Proxy, chars: int = 3000) -> str:
        return proxy.log_path.read_text(errors="replace")[-chars:]

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{self.log_tail(p)}" for p in self.procs)

    def pids(self) -> dict[str, int]:
        return {p.name: p.proc.pid for p in self.procs}

    def stop(self) -> None:
        """Stop every proxy started here, by its PID."""
        for proxy in self.procs:
            terminate(proxy.proc, 10)
        self.procs.clear()

    # ------------------------------------------------------------ HAProxy state

    def haproxy_stats(self) -> list[dict[str, str]]:
        """`show stat` over the stats socket (a Unix socket in the lab's directory)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def servers_up(self, backend: str) -> set[str]:
        return {
            r["svname"]
            for r in self.haproxy_stats()
            if r["pxname"] == backend and r["svname"] in DATA and r["status"].startswith("UP")
        }

    def server_row(self, backend: str, server: str) -> dict[str, str]:
        return next(r for r in self.haproxy_stats() if r["pxname"] == backend and r["svname"] == server)

    async def wait_backends(self, primary: str, timeout_s: float = 30.0) -> None:
        """Until HAProxy sends writes to `primary` only and reads to every other member."""
        standbys = {n for n in DATA if n != primary}

        async def settled() -> bool | None:
            ok = self.servers_up(WRITE_BACKEND) == {primary} and self.servers_up(READ_BACKEND) == standbys
            return True if ok else None

        await wait_for(
            f"HAProxy: writes to {primary}, reads to {sorted(standbys)}",
            settled,
            timeout_s,
            interval_s=0.1,
            detail=lambda: f"{self.haproxy_stats()}\n{self.log_tails()}",
        )

    # -------------------------------------------------------------- reading

    def read_through(self, port: int, count: int) -> list[tuple[str, bool]]:
        """`count` new connections to 127.0.0.1:`port` from the client
        namespace: (member, in recovery) as each one answered."""
        psql = str(self.lab.bin_dir / "psql")
        env = {"PATH": "/usr/bin:/bin", "PGPASSWORD": WRITER_PASSWORD, "LANG": "C.UTF-8"}
        dsn = f"host=127.0.0.1 port={port} user={WRITER_USER} dbname=postgres connect_timeout=3"
        answers = []
        for _ in range(count):
            done = subprocess.run(
                [
                    *self.lab.net.exec_prefix(CLIENT),
                    psql,
                    "-X",
                    "-A",
                    "-t",
                    "-c",
                    "SELECT current_setting('cluster_name'), pg_is_in_recovery()",
                    dsn,
                ],
                capture_output=True,
                text=True,
                timeout=15,
                env=env,
                check=False,
            )
            if done.returncode != 0:
                raise AssertionError(f"read through port {port} failed: {done.stderr.strip()}")
            member, recovery = done.stdout.strip().split("|")
            answers.append((member, recovery == "t"))
        return answers

    def api_get(self, member: str, path: str) -> tuple[int, dict[str, Any]]:
        """GET `path` on `member`'s API from the client namespace (where HAProxy checks from)."""
        script = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            "    r = urllib.request.urlopen(sys.argv[1], timeout=3); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); print(e.read().decode())\n"
        )
        url = f"http://{self.lab.address(member)}:8008{path}"
        out = self.lab.run_in(CLIENT, ["python3", "-c", script, url])
        status, _, body = out.partition("\n")
        return int(status), json.loads(body)


def _user(name: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


# -------------------------------------------------------------------- fault runs


@dataclass
class PathResult:
    path: str
    acked: int = 0
    lost: int = 0
    gap_s: float | None = None  # the longest stretch without an acknowledged write, fault to end
    first_write_s: float | None = None  # fault -> first write acknowledged by the new primary
    errors: int = 0  # failed attempts the client reported (each followed by a retry)
    members_after: list[str] = field(default_factory=list)  # who acknowledged the writes after the fault


@dataclass
class PathsRun:
    fault: str
    old_primary: str
    new_primary: str | None = None
    term_before: int = 0
    term_after: int = 0
    paths: dict[str, PathResult] = field(default_factory=dict)
    dual_primary_samples: int = 0
    dual_vip: int = 0
    samples: int = 0
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _writes(client: ClientRun, count: int, since: float, timeout_s: float, what: str, by=lambda m: True) -> Ack:
    def acked() -> Ack | None:
        got = [a for a in client.acked_since(since) if by(a.member)]
        if len(got) >= count:
            return got[0]
        if client.proc.poll() is not None:
            raise AssertionError(f"the client exited:\n{client.output_tail()}")
        return None

    return await wait_for(what, acked, timeout_s, interval_s=0.02, detail=lambda: client.output_tail())


async def run_paths(
    lab: E2ELab, monitor: VipMonitor, proxies: Proxies, fault: Fault, first_id: int, paths: tuple[Route, ...] = PATHS
) -> PathsRun:
    """One failover with a client on every path at once (module docstring)."""
    primary = await lab.wait_for("a healthy cluster", lab.healthy, HEALTHY_TIMEOUT_S)
    await proxies.wait_backends(primary)
    standby = next(n for n in DATA if n != primary)
    result = PathsRun(fault.name, primary, term_before=lab.leadership()[1])
    sampler = DualPrimarySampler(lab, SAMPLE_INTERVAL_S)
    sampler.start()
    start_wall = time.time()
    clients = {
        p.name: ClientRun(
            lab, first_id + i * 100_000, timeouts=FAST, tag=p.name, host=p.host, port=p.port, pooled=p.pooled
        )
        for i, p in enumerate(paths)
    }
    try:
        for name, c in clients.items():
            await _writes(c, 20, 0.0, 60, f"the first writes through {name}")
        await asyncio.sleep(1.0)
        fault_wall, fault_t = time.time(), time.monotonic()
        fault.inject(lab, primary, standby)
        try:
            firsts = await asyncio.gather(
                *(
                    _writes(
                        c, 1, fault_t, FIRST_WRITE_BOUND_S, f"a write on a new primary through {n}", by=primary.__ne__
                    )
                    for n, c in clients.items()
                )
            )
            await asyncio.sleep(HOLD_AFTER_FAILOVER_S)
        finally:
            fault.heal(lab, primary, standby)
        await lab.wait_for("the cluster whole again", lab.healthy, HEALTHY_TIMEOUT_S)
        now = time.monotonic()
        for name, c in clients.items():
            await _writes(c, WRITES_AFTER_HEAL, now, 30, f"writes through {name} after healing")
        end_t = time.monotonic()
    except BaseException:
        print(f"run failed; logs kept in {lab.save_logs()}\n{proxies.log_tails()}", flush=True)
        for c in clients.values():
            c.stop()
        await sampler.stop()
        raise
    for c in clients.values():
        c.stop()
    await sampler.stop()
    end_wall = time.time()
    final = await lab.wait_for("one primary", lab.healthy, HEALTHY_TIMEOUT_S)
    result.new_primary = final
    stored = await lab.stored_ids(final)
    for (name, c), first in zip(clients.items(), firsts, strict=True):
        acks = c.acks()
        r = PathResult(name, acked=len(acks), errors=c.errors)
        missing = [a.id for a in acks if a.id not in stored]
        r.lost = len(missing)
        if missing:
            result.problems.append(f"{name}: acknowledged writes missing on {final}: {missing[:10]}")
        r.gap_s = round(longest_gap(fault_t, end_t, [a.t for a in acks]), 3)
        r.first_write_s = round(first.t - fault_t, 3)
        r.members_after = sorted({a.member for a in acks if a.t > fault_t})
        result.paths[name] = r
    result.dual_primary_samples = len(sampler.dual)
    if sampler.dual:
        result.problems.append(f"two primaries sampled: {sampler.dual[:5]}")
    result.samples = sampler.samples
    overlaps = monitor.overlaps(start_wall, end_wall)
    result.dual_vip = len(overlaps)
    if overlaps:
        result.problems.append(f"the VIP on two hosts at once: {overlaps[:5]}")
    result.term_after = lab.leadership()[1]
    result.timeline = timeline(lab, monitor, fault_wall, [])
    return result


def describe(r: PathsRun) -> list[str]:
    """Report lines for one run."""
    lines = [
        f"{r.fault:16} {r.old_primary}->{r.new_primary} term {r.term_before}->{r.term_after} "
        f"dual pg {r.dual_primary_samples} dual vip {r.dual_vip} samples {r.samples}"
    ]
    for p in r.paths.values():
        lines.append(
            f"    {p.path:18} write gap {p.gap_s} s, first write on the new primary +{p.first_write_s} s, "
            f"acked {p.acked} lost {p.lost} errors {p.errors} (after the fault: {', '.join(p.members_after)})"
        )
    return lines


@contextlib.contextmanager
def started(lab: E2ELab):
    """Proxies running for the block, stopped by PID afterwards."""
    proxies = Proxies(lab).start()
    try:
        yield proxies
    finally:
        proxies.stop()
