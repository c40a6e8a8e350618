"""The end-to-end lab: a three-member failoverd cluster whose hosts are network
namespaces, with a real virtual IP and a client host that knows only the VIP.

    <tag>-br       bridge br0, one port per host
    <tag>-db1..3   198.18.<subnet>.1..3: PostgreSQL :5432 and `failoverd run` (peer :7400)
    <tag>-client   198.18.<subnet>.4: the writers (client.py), connecting to the VIP only
    VIP            198.18.<subnet>.100/24 on eth0 of whichever host is primary

Nothing is added to the root namespace (tests/support/netns.py builds the
hosts). Every process is started here and recorded, and stopped by that PID:
supervisors, their watchdogs (PIDs from the supervisors' own logs) and the
postmasters (by postmaster.pid under the lab's directory, checked against the
process's working directory).

Every supervisor (and its watchdog) runs with clockshift.so preloaded, which
shifts its CLOCK_REALTIME by the seconds in `<base>/<host>.clock-offset`:
`step_clock(host, seconds)` steps a host's wall clock as NTP or `date -s`
would, leaving the monotonic clock alone. PostgreSQL, started by the
supervisor with an environment of its own, keeps the true time.

Supervisors run in one of two ways, chosen per member:
  "caps": as the `postgres` user holding only ambient CAP_NET_ADMIN and
          CAP_NET_RAW, as the systemd unit runs it (setpriv --ambient-caps);
  "root": as root with [postgres] os_user = "postgres".

PostgreSQL listens on every address (failoverd writes listen_addresses =
'*'), so a client's connection to the VIP reaches whichever host holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from failoverd.adapters import processes
from failoverd.adapters.postgres.adapter import PostgresAdapter
from failoverd.config.load import Config, parse_config
from failoverd.core.state import PgRole
from tests.support.cluster import make_runtime_bundle, system_python
from tests.support.netns import Lab, unsupported_reason
from tests.support.postgres import find_bin_dir, stop_servers_under, terminate
from tests.support.waiting import wait_for

T = TypeVar("T")
DATA = ("db1", "db2", "db3")
CLIENT = "client"
SUBNET = 20  # 198.18.20.0/24; test_vip.py uses .7
VIP_OCTET = 100
PG_PORT = 5432
PEER_PORT = 7400
SECRET = b"e2e-lab-secret-0123456789abcdef"
WRITER_USER = "writer"
WRITER_PASSWORD = "writer-password-e2e"
NET_CAPS = "+net_admin,+net_raw"
SLOWLINK = Path(__file__).with_name("slowlink.py")
CLOCKSHIFT_SOURCE = Path(__file__).with_name("clockshift.c")
PROGRAMS = ("ip", "arping", "ping", "nft", "tc", "setpriv")
_SETUP_TIMEOUT_S = 10.0


def lab_unsupported_reason() -> str | None:
    """Why the lab cannot run here, or None."""
    if find_bin_dir() is None:
        return "PostgreSQL server programs not found (pg_config --bindir has no 'postgres')"
    reason = unsupported_reason(PROGRAMS)
    if reason is not None and "not found" in reason:
        return reason + "; the e2e lab also needs nft and tc: apt-get install nftables iproute2"
    if reason is not None:
        return reason
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' OS user to run PostgreSQL as"
    return None


@dataclass
class Supervisor:
    name: str
    mode: str
    proc: subprocess.Popen
    log_path: Path
    log_offset: int  # where this process's lines start in the (shared, appended) log file


# The events after which a member holds a role, beside role_changed: a
# follower that stops hearing its leader starts a pre-vote without a
# role_changed, and a pre-vote that yields, is lost or times out returns it to
# following without one (a timed-out candidacy that stands again logs
# pre_vote_started next).
_ROLE_EVENTS = {
    "role_changed": "",
    "pre_vote_started": "candidate",
    "election_started": "candidate",
    "pre_vote_yielded": "follower",
    "election_lost": "follower",
    "election_timed_out": "follower",
}


@dataclass
class E2ELab:
    base: Path
    bin_dir: Path
    modes: dict[str, str] = field(default_factory=lambda: {"db1": "caps", "db2": "root", "db3": "caps"})
    subnet: int = SUBNET
    log_level: str = "info"
    supervisors: dict[str, Supervisor] = field(default_factory=dict)
    watchdogs: set[int] = field(default_factory=set)
    degraded: str | None = None  # how the links are slowed down now, if they are
    slowlink: subprocess.Popen | None = None
    slowlink_summary: str = ""  # its last report: frames forwarded and dropped, how late they left
    unsettled: str = ""  # why `settled` last found the cluster not settled

    def __post_init__(self) -> None:
        if set(self.modes) != set(DATA) or not set(self.modes.values()) <= {"caps", "root"}:
            raise ValueError(f"modes must give 'caps' or 'root' for each of {DATA}: {self.modes!r}")
        self.net = Lab([*DATA, CLIENT], subnet=self.subnet)
        self.vip = str(self.net.vip(VIP_OCTET).ip)
        entry = pwd.getpwnam("postgres")
        self.owner = (entry.pw_uid, entry.pw_gid)
        self.config_path = self.base / "cluster.toml"
        self.bundle: Path | None = None
        self.adapters: dict[str, PostgresAdapter] = {}
        self.config: Config | None = None

    # ------------------------------------------------------------- building

    def build(self) -> E2ELab:
        """Namespaces and files; nothing is started yet."""
        try:
            self.net.build()
            self.bundle = make_runtime_bundle(self.base)
            self._build_clockshift()
            secret = self.base / "secret"
            secret.write_bytes(SECRET)
            os.chmod(secret, 0o600)
            for d in [self.base / "state", *(self.base / n for n in DATA)]:
                d.mkdir(mode=0o755)
            for p in [secret, self.base / "state", *(self.base / n for n in DATA)]:
                os.chown(p, *self.owner)
            self.config_path.write_text(self._config_text())
            os.chmod(self.config_path, 0o644)
            self.config = parse_config(self.config_path.read_text(), source=str(self.config_path), node=DATA[0])
            self.adapters = {n.name: PostgresAdapter(self.config, n, SECRET) for n in self.config.nodes}
        except BaseException:
            self.close()
            raise
        return self

    def address(self, host: str) -> str:
        return str(self.net.address(host).ip)

    def _build_clockshift(self) -> None:
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("no C compiler for clockshift.c (make test installs gcc)")
        subprocess.run(
            [
                compiler,
                "-shared",
                "-fPIC",
                "-O2",
                "-o",
                str(self.base / "clockshift.so"),
                str(CLOCKSHIFT_SOURCE),
                "-ldl",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for name in DATA:
            self.step_clock(name, 0.0)

    def step_clock(self, host: str, seconds: float) -> None:
        """Set `host`'s wall clock `seconds` away from the true time (0: back
        to it); its processes see the step within 20 ms."""
        path = self.base / f"{host}.clock-offset"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{seconds:.6f}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _config_text(self) -> str:
        nodes = "".join(
            f"""
[[nodes]]
name = "{name}"
peer = "{self.address(name)}:{PEER_PORT}"
  [nodes.postgres]
  host = "{self.address(name)}"
  port = {PG_PORT}
  data_dir = "{self.base / name / "data"}"
"""
            for name in DATA
        )
        return f"""
[cluster]
name = "e2e"
secret_file = "{self.base / "secret"}"
state_dir = "{self.base / "state"}"

[replication]
mode = "quorum"
sync_count = 1

[postgres]
bin_dir = "{self.bin_dir}"
os_user = "postgres"

[vip]
address = "{self.net.vip(VIP_OCTET).with_prefixlen}"
interface = "{self.net.interface}"

[logging]
level = "{self.log_level}"
format = "json"
{nodes}"""

    # ------------------------------------------------------------ processes

    def start(self, name: str) -> Supervisor:
        assert self.bundle is not None
        old = self.supervisors.get(name)
        if old is not None:
            if old.proc.poll() is None:
                raise RuntimeError(f"the supervisor of {name} still runs (pid {old.proc.pid})")
            self._note_watchdogs()
        run = [system_python(), "-m", "failoverd", "run", "--config", str(self.config_path), "--node", name]
        if self.modes[name] == "caps":
            run = [
                "setpriv",
                f"--reuid={self.owner[0]}",
                f"--regid={self.owner[1]}",
                "--init-groups",
                f"--inh-caps={NET_CAPS}",
                f"--ambient-caps={NET_CAPS}",
                "--",
                *run,
            ]
        argv = [*self.net.exec_prefix(name), *run]
        log_path = self.base / f"{name}.supervisor.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        env = {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "PYTHONPATH": str(self.bundle),
            "LANG": "C.UTF-8",
            "LD_PRELOAD": str(self.base / "clockshift.so"),
            "FAILOVERD_TEST_CLOCK_OFFSET_FILE": str(self.base / f"{name}.clock-offset"),
        }
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        sup = Supervisor(name, self.modes[name], proc, log_path, offset)
        self.supervisors[name] = sup
        return sup

    def start_all(self) -> None:
        for name in DATA:
            self.start(name)

    def signal_postgres(self, name: str, sig: int) -> int:
        """`sig` to every process of member `name`'s PostgreSQL: the
        postmaster, then its children (by parent PID, never by name). Returns
        how many were signalled."""
        postmaster = self.postmaster_pid(name)
        if postmaster is None:
            return 0
        done = 0
        for pid in (postmaster, *processes.children_of(postmaster)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                done += 1
        return done

    def signal_supervisor(self, name: str, sig: int) -> None:
        self.supervisors[name].proc.send_signal(sig)

    def stop_supervisor(self, name: str, timeout_s: float = 15.0) -> None:
        sup = self.supervisors[name]
        self._note_watchdogs()
        if sup.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup.proc.pid, signal.SIGCONT)
        terminate(sup.proc, timeout_s)

    def postmaster_pid(self, name: str) -> int | None:
        return processes.live_postmaster_pid(self.adapters[name].data_dir)

    def _note_watchdogs(self) -> None:
        for name in self.supervisors:
            for e in self.events(name, current_only=False):
                if e.get("event") == "watchdog_started" and isinstance(e.get("pid"), int):
                    self.watchdogs.add(e["pid"])

    def close(self) -> None:
        """Stop everything started here (by PID) and delete the namespaces.
        Safe to call more than once and on a half-built lab."""
        errors: list[str] = []
        try:
            self.restore()
        except Exception as error:
            errors.append(f"restoring links: {error!r}")
        for name in list(self.supervisors):
            try:
                self.stop_supervisor(name)
            except Exception as error:
                errors.append(f"supervisor {name}: {error!r}")
        self._note_watchdogs()
        for pid in sorted(self.watchdogs):
            # A watchdog outlives a killed supervisor only until it fenced; check
            # it still runs our module before signalling a possibly reused PID.
            if _cmdline_has(pid, "failoverd.adapters.watchdog"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.base.exists():
            stop_servers_under(self.base)
        try:
            self.net.destroy()
        except RuntimeError as error:
            errors.append(str(error))
        if errors:
            raise RuntimeError("lab cleanup: " + "; ".join(errors))

    # -------------------------------------------------------------- network

    def run_in(self, host: str, argv: list[str], *, stdin: str | None = None, check: bool = True) -> str:
        """Run a command in `host`'s namespace (synchronously: faults are
        injected at a known instant)."""
        done = subprocess.run(
            [*self.net.exec_prefix(host), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_SETUP_TIMEOUT_S,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {host}: {done.stderr.strip() or done.returncode}")
        return done.stdout

    def _nft(self, host: str, script: str) -> None:
        self.run_in(host, ["nft", "-f", "-"], stdin=script)

    def set_link(self, host: str, up: bool) -> None:
        """Cable pulled (or plugged back): the bridge's end of the host's link."""
        self.net.ip("-n", self.net.bridge_ns, "link", "set", self.net.port(host), "up" if up else "down")

    def block_inbound(self, host: str) -> None:
        """The host can send but receives nothing (IP; ARP still flows)."""
        self._nft(
            host,
            f"""table inet fo_fault {{
  chain input {{ type filter hook input priority filter; policy accept; iifname "{self.net.interface}" drop; }}
}}
""",
        )

    def block_peer_port(self, host: str) -> None:
        """Nothing reaches the host's peer port, on connections old or new;
        its own connections to the other members' peer ports still work."""
        self._nft(
            host,
            f"""table inet fo_fault {{
  chain input {{ type filter hook input priority filter; policy accept; tcp dport {PEER_PORT} drop; }}
}}
""",
        )

    def cut(self, host: str, peer: str) -> None:
        """No IP traffic between `host` and `peer`, either way (rules in `host`)."""
        other = self.address(peer)
        self._nft(
            host,
            f"""table inet fo_fault {{
  chain input {{ type filter hook input priority filter; policy accept; ip saddr {other} drop; }}
  chain output {{ type filter hook output priority filter; policy accept; ip daddr {other} drop; }}
}}
""",
        )

    def clear_filters(self, host: str) -> None:
        self.run_in(host, ["nft", "delete", "table", "inet", "fo_fault"], check=False)

    def degrade(self, delay_ms: float, jitter_ms: float, loss_percent: float, seconds_max: float) -> str:
        """Every link delays each frame by delay_ms +- jitter_ms and loses
        loss_percent of them: `tc netem` on each host's eth0 where the kernel
        has it, else slowlink.py (the same, in user space) in place of the
        bridge. Returns which of the two is in use; `restore()` undoes it."""
        if self.degraded is not None:
            raise RuntimeError(f"links already degraded ({self.degraded})")
        if self._netem_supported():
            for host in self.net.hosts:
                self.run_in(
                    host,
                    [
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        self.net.interface,
                        "root",
                        "netem",
                        "delay",
                        f"{delay_ms:g}ms",
                        f"{jitter_ms:g}ms",
                        "loss",
                        f"{loss_percent:g}%",
                    ],
                )
            self.degraded = "tc netem"
            return self.degraded
        ports = [self.net.port(h) for h in self.net.hosts]
        argv = [
            *self.net.exec_prefix(self.net.hosts[0])[:3],
            self.net.bridge_ns,
            sys.executable,
            str(SLOWLINK),
            "--ports",
            ",".join(ports),
            "--delay-ms",
            f"{delay_ms:g}",
            "--jitter-ms",
            f"{jitter_ms:g}",
            "--loss",
            f"{loss_percent / 100:g}",
            "--max-seconds",
            f"{seconds_max:g}",
        ]
        with open(self.base / "slowlink.out", "ab") as out:
            self.slowlink = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.degraded = "slowlink (no netem in this kernel)"
        assert self.slowlink.stdout is not None
        if self.slowlink.stdout.readline().strip() != b"ready":
            self.restore()
            raise RuntimeError("slowlink.py did not start: see slowlink.out")
        # Out of the kernel bridge only once the replacement forwards (a few
        # frames may pass twice meanwhile; none is lost).
        for port in ports:
            self.net.ip("-n", self.net.bridge_ns, "link", "set", port, "nomaster")
        return self.degraded

    def restore(self) -> None:
        """Undo `degrade()`."""
        if self.degraded == "tc netem":
            for host in self.net.hosts:
                self.run_in(host, ["tc", "qdisc", "del", "dev", self.net.interface, "root"], check=False)
        elif self.slowlink is not None:
            for host in self.net.hosts:
                self.net.ip("-n", self.net.bridge_ns, "link", "set", self.net.port(host), "master", "br0")
            proc, self.slowlink = self.slowlink, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    summary = proc.communicate(timeout=10)[0]
                except subprocess.TimeoutExpired:
                    proc.kill()
                    summary = proc.communicate(timeout=5)[0]
                with open(self.base / "slowlink.out", "ab") as out:
                    out.write(summary)
                self.slowlink_summary = summary.decode(errors="replace").strip()
        self.degraded = None

    def _netem_supported(self) -> bool:
        host = self.net.hosts[-1]
        added = subprocess.run(
            [*self.net.exec_prefix(host), "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
            capture_output=True,
            text=True,
            timeout=_SETUP_TIMEOUT_S,
        )
        if added.returncode != 0:
            return False
        self.run_in(host, ["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
        return True

    def vip_holders(self) -> list[str]:
        held = []
        for host in DATA:
            out = self.run_in(host, ["ip", "-o", "-4", "addr", "show", "dev", self.net.interface])
            if f"inet {self.vip}/" in out:
                held.append(host)
        return held

    # ---------------------------------------------------------------- state

    async def roles(self) -> dict[str, PgRole]:
        now = time.monotonic()
        obs = await asyncio.gather(*(a.probe(now) for a in self.adapters.values()))
        return {name: o.role for name, o in zip(self.adapters, obs, strict=True)}

    async def healthy(self) -> str | None:
        """The primary's name once exactly one server is primary, every other
        streams from it, and it holds the VIP (alone)."""
        now = time.monotonic()
        obs = dict(
            zip(self.adapters, await asyncio.gather(*(a.probe(now) for a in self.adapters.values())), strict=True)
        )
        prim = [n for n, o in obs.items() if o.role is PgRole.PRIMARY]
        if len(prim) != 1:
            return None
        if any(o.role is not PgRole.STANDBY or o.following != prim[0] for n, o in obs.items() if n != prim[0]):
            return None
        return prim[0] if await asyncio.to_thread(self.vip_holders) == prim else None

    async def wait_for(self, what: str, check: Callable[[], Awaitable[T | None]], timeout_s: float) -> T:
        """tests.support.wait_for, with the supervisors' log tails in the failure."""
        return await wait_for(what, check, timeout_s, interval_s=0.2, detail=self.log_tails)

    async def create_writer_role(self, primary: str) -> None:
        """The client's login and table, made once on the primary (they replicate)."""
        a = self.adapters[primary]
        conn = await asyncpg.connect(
            host=str(a.socket_dir), port=a.pg.port, user="postgres", database="postgres", timeout=10
        )
        try:
            await conn.execute(f"CREATE ROLE {WRITER_USER} LOGIN PASSWORD '{WRITER_PASSWORD}'")
            await conn.execute("CREATE TABLE acked (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
            await conn.execute(f"GRANT SELECT, INSERT ON acked TO {WRITER_USER}")
        finally:
            await conn.close()

    async def stored_ids(self, name: str) -> set[int]:
        a = self.adapters[name]
        conn = await asyncpg.connect(
            host=str(a.socket_dir), port=a.pg.port, user="postgres", database="postgres", timeout=10
        )
        try:
            return {r["id"] for r in await conn.fetch("SELECT id FROM acked")}
        finally:
            await conn.close()

    # ----------------------------------------------------------------- logs

    def events(self, name: str, *, current_only: bool = True) -> list[dict[str, Any]]:
        """The JSON log events of member `name` (of its current process, or of all)."""
        sup = self.supervisors.get(name)
        path = self.base / f"{name}.supervisor.log"
        if not path.exists():
            return []
        with open(path, "rb") as f:
            if current_only and sup is not None:
                f.seek(sup.log_offset)
            data = f.read()
        found = []
        for line in data.decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    event.setdefault("node", name)
                    event["wall"] = _wall(event.get("timestamp"))
                    found.append(event)
        return found

    def all_events(self, since_wall: float = 0.0) -> list[dict[str, Any]]:
        merged = [e for n in DATA for e in self.events(n, current_only=False) if (e["wall"] or 0) >= since_wall]
        return sorted(merged, key=lambda e: e["wall"] or 0)

    async def settled(self) -> str | None:
        """The primary's name once the cluster is healthy and every supervisor
        says so too: the primary's leads, every other follows it. A fault's
        aftermath (a member still pre-voting after a heal) is over. While it
        is not, `unsettled` says why."""
        primary = await self.healthy()
        if primary is None:
            self.unsettled = f"not healthy: {await self.health_report()}"
            return None
        for name in DATA:
            events = self.events(name)
            changes = [e for e in events if e.get("event") in _ROLE_EVENTS]
            last = changes[-1] if changes else {"event": "role_changed", "role": "follower"}
            role = last["role"] if last["event"] == "role_changed" else _ROLE_EVENTS[last["event"]]
            leaders = [e.get("leader") for e in events if e.get("event") == "leader_known"]
            if (name == primary and role != "leader") or (
                name != primary and (role != "follower" or not leaders or leaders[-1] != primary)
            ):
                self.unsettled = (
                    f"{primary} is primary; {name}'s last role event: {json.dumps(last, default=str)}; "
                    f"last leader it knew: {leaders[-1] if leaders else None}"
                )
                return None
        self.unsettled = ""
        return primary

    async def health_report(self) -> str:
        """What `healthy` saw, member by member: role, upstream, VIP."""
        now = time.monotonic()
        obs = await asyncio.gather(*(a.probe(now) for a in self.adapters.values()))
        holders = await asyncio.to_thread(self.vip_holders)
        parts = [f"{n} {o.role.value} following {o.following}" for n, o in zip(self.adapters, obs, strict=True)]
        return ", ".join(parts) + f"; VIP on {holders}"

    def leadership(self) -> tuple[str | None, int]:
        """The latest leader and term seen in the logs."""
        leaders = [e for e in self.all_events() if e.get("event") == "role_changed" and e.get("role") == "leader"]
        if not leaders:
            return None, 0
        return leaders[-1]["node"], int(leaders[-1]["term"])

    def save_logs(self) -> Path:
        """Copy every log of the lab (supervisors, PostgreSQL, client, VIP
        monitor, slowlink) to a new directory under /tmp that outlives it."""
        dest = Path(tempfile.mkdtemp(prefix="failoverd-e2e-logs-", dir="/tmp"))
        for path in [
            *self.base.glob("*.log"),
            *self.base.glob("*.out"),
            self.config_path,
            *self.base.glob("*/*.run/postgresql.log"),
        ]:
            with contextlib.suppress(OSError):
                shutil.copy(path, dest / str(path.relative_to(self.base)).replace("/", "_"))
        return dest

    def log_tails(self, chars: int = 4000) -> str:
        parts = []
        for name in DATA:
            path = self.base / f"{name}.supervisor.log"
            if path.exists():
                parts.append(f"--- {name} ({self.modes[name]})\n" + path.read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    # ------------------------------------------------------------ resources

    def usage(self, name: str) -> tuple[int, float]:
        """(RSS bytes, CPU seconds so far) of member `name`'s supervisor process."""
        return process_usage(self.supervisors[name].proc.pid)

    def watchdog_pid(self, name: str) -> int | None:
        pids = [e["pid"] for e in self.events(name) if e.get("event") == "watchdog_started" and "pid" in e]
        return pids[-1] if pids else None


def process_usage(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds so far) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return rss_kb * 1024, ticks / os.sysconf("SC_CLK_TCK")


def _wall(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _cmdline_has(pid: int, word: str) -> bool:
    try:
        return word.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@contextlib.contextmanager
def lab_dir(prefix: str = "failoverd-e2e-"):
    """A directory under /tmp the postgres user can enter, removed afterwards
    (kept, for its logs, when FAILOVERD_E2E_KEEP=1)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        if os.environ.get("FAILOVERD_E2E_KEEP") == "1":
            print(f"e2e lab directory kept: {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
