"""Every host of the lab saturated at once, for `bench/saturation.py` and the
e2e test: pgbench (TPC-B-like) at full speed through the VIP from the
client's namespace, commits waiting for the synchronous standby; busy loops at
normal priority (the hosts are namespaces of one machine and share its
cores, so these load every host); and a disk writer that writes and fsyncs
4 MB at a time on the file system of the data directories. A primary that is
merely slow must not be replaced: the result counts elections, lease losses,
fences, leadership changes, pre-votes and closed peer streams during the
load, and pgbench's throughput and failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.e2e.lab import CLIENT, DATA, PG_PORT, WRITER_PASSWORD, WRITER_USER, E2ELab

SCALE = 10  # pgbench_accounts holds SCALE * 100,000 rows
DISK_CHUNK_BYTES = 4 << 20
DISK_FILE_MAX_BYTES = 256 << 20
COUNTED = ("election_started", "lease_lost", "fence", "fenced", "pre_vote_started", "peer_stream_closed")

_DISK_WRITER = f"""
import os, sys
chunk = bytes({DISK_CHUNK_BYTES})
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
written = 0
while True:
    os.write(fd, chunk)
    os.fsync(fd)
    written += len(chunk)
    if written >= {DISK_FILE_MAX_BYTES}:
        os.lseek(fd, 0, 0)
        written = 0
"""


def _pgbench(bin_dir: Path, host: str, port: int, user: str, *argv: str) -> list[str]:
    return [str(bin_dir / "pgbench"), "-h", host, "-p", str(port), "-U", user, *argv, "postgres"]


def prepare_pgbench(lab: E2ELab, primary: str) -> None:
    """pgbench's tables on the primary (they replicate), writable by the
    lab's writer role (`E2ELab.create_writer_role` first)."""
    a = lab.adapters[primary]
    sock, port = str(a.socket_dir), a.pg.port
    subprocess.run(
        _pgbench(lab.bin_dir, sock, port, "postgres", "-i", "-q", "-s", str(SCALE)),
        check=True,
        capture_output=True,
        timeout=600,
    )
    grant = f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {WRITER_USER}"
    psql = [str(lab.bin_dir / "psql"), "-X", "-q", "-h", sock, "-p", str(port), "-U", "postgres"]
    subprocess.run([*psql, "-c", grant, "postgres"], check=True, capture_output=True, timeout=60)


def _start_load(base: Path, burners: int) -> list[subprocess.Popen]:
    """The busy loops and the disk writer, each in a session of its own, stopped by PID."""
    argvs = [[sys.executable, "-c", "while True: pass"]] * burners
    argvs.append([sys.executable, "-c", _DISK_WRITER, str(base / "disk-load")])
    return [subprocess.Popen(argv, start_new_session=True) for argv in argvs]


def _stop(load: list[subprocess.Popen]) -> None:
    for proc in load:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    load.clear()


def _pgbench_summary(text: str) -> dict[str, float]:
    found = {}
    for key, pattern in (
        ("tps", r"tps = ([0-9.]+)"),
        ("transactions", r"number of transactions actually processed: (\d+)"),
        ("failed", r"number of failed transactions: (\d+)"),
        ("latency_ms", r"latency average = ([0-9.]+) ms"),
    ):
        m = re.search(pattern, text)
        if m:
            found[key] = float(m.group(1))
    return found


async def run_saturation(lab: E2ELab, seconds: float, clients: int, burners: int) -> dict[str, Any]:
    """Saturate a healthy lab (pgbench's tables prepared) for `seconds`."""
    primary = await lab.wait_for("a healthy cluster before the load", lab.healthy, 120)
    term_before = lab.leadership()[1]
    counts = {n: len(lab.events(n)) for n in DATA}
    load: list[subprocess.Popen] = []
    try:
        started_wall = time.time()
        load += await asyncio.to_thread(_start_load, lab.base, burners)
        argv = _pgbench(lab.bin_dir, lab.vip, PG_PORT, WRITER_USER, "-n", "-c", str(clients), "-j", "2")
        bench = await asyncio.to_thread(
            subprocess.run,
            [*lab.net.exec_prefix(CLIENT), *argv, "-T", str(round(seconds)), "-P", "30"],
            env={**os.environ, "PGPASSWORD": WRITER_PASSWORD},
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
        ended_wall = time.time()
    finally:
        await asyncio.to_thread(_stop, load)
    after = await lab.wait_for("a healthy cluster after the load", lab.healthy, 120)
    events = [e for n in DATA for e in lab.events(n)[counts[n] :]]
    during = [e for e in events if e.get("wall") is not None and e["wall"] <= ended_wall + 1.0]
    output = bench.stdout + bench.stderr
    return {
        "seconds": round(ended_wall - started_wall, 1),
        "clients": clients,
        "cpu_burners": burners,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "primary_before": primary,
        "primary_after": after,
        "term_before": term_before,
        "term_after": lab.leadership()[1],
        "leadership_changes": sum(
            1 for e in during if e.get("event") == "role_changed" and "leader" in (e.get("role"), e.get("previous"))
        ),
        "events": {name: sum(1 for e in during if e.get("event") == name) for name in COUNTED},
        "pgbench_rc": bench.returncode,
        "pgbench": _pgbench_summary(output),
        "pgbench_tail": output[-1500:],
    }


def describe(result: dict[str, Any]) -> str:
    ev = result["events"]
    return (
        f"saturation for {result['seconds']} s ({result['clients']} pgbench clients through the VIP, "
        f"{result['cpu_burners']} CPU burners, a 4 MB-fsync disk writer; load {result['load_average']}):\n"
        f"  pgbench: {result['pgbench']} (exit {result['pgbench_rc']})\n"
        f"  primary {result['primary_before']} -> {result['primary_after']}, term {result['term_before']} -> "
        f"{result['term_after']}, leadership changes {result['leadership_changes']}\n"
        f"  elections {ev['election_started']}, lease losses {ev['lease_lost']}, fences {ev['fence']}, "
        f"pre-votes {ev['pre_vote_started']}, peer streams closed {ev['peer_stream_closed']}"
    )
