"""What the e2e lab watches while faults run: the client's acknowledged
writes, every host's VIP, and every server's recovery state.

* `ClientRun` starts client.py in the client namespace and reads its output
  (one line per acknowledged write, timed with CLOCK_MONOTONIC).
* `VipMonitor` runs `ip -ts monitor address` in every data host's namespace
  for the lab's whole life: the kernel reports each change of the address
  as it happens, stamped by `ip` itself, so two hosts holding the VIP at once
  is seen however briefly it lasts, not only at sampling instants.
* Two servers out of recovery at once are sampled every 50 ms with
  tests.support.cluster.DualPrimarySampler, over the servers' Unix sockets (which
  reach an isolated host too).
"""

from __future__ import annotations

import datetime
import itertools
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.e2e.lab import CLIENT, DATA, PG_PORT, WRITER_PASSWORD, WRITER_USER, E2ELab
from tests.support.postgres import terminate

CLIENT_PY = Path(__file__).with_name("client.py")

# Timeouts for the client: short on a LAN so that a silent server is left
# quickly; generous under the stability profile's delays (a connection there
# takes several 200 ms round trips).
FAST = {"connect_timeout": 0.3, "command_timeout": 0.5}
SLOW = {"connect_timeout": 5.0, "command_timeout": 5.0}


@dataclass(frozen=True, slots=True)
class Ack:
    id: int
    t: float  # CLOCK_MONOTONIC
    member: str


class ClientRun:
    """One client.py process in the client namespace, writing through the VIP
    (or through `host`:`port`, a proxy in the client namespace; `pooled` for a
    transaction-pooling PgBouncer)."""

    def __init__(
        self,
        lab: E2ELab,
        first_id: int,
        *,
        writers: int = 4,
        timeouts: dict[str, float] = FAST,
        tag: str = "client",
        host: str | None = None,
        port: int = PG_PORT,
        pooled: bool = False,
    ) -> None:
        self.lab = lab
        self.out_path = lab.base / f"{tag}-{first_id}.out"
        argv = [
            *lab.net.exec_prefix(CLIENT),
            sys.executable,
            str(CLIENT_PY),
            "--host",
            host or lab.vip,
            "--port",
            str(port),
            "--user",
            WRITER_USER,
            "--first-id",
            str(first_id),
            "--writers",
            str(writers),
            "--connect-timeout",
            str(timeouts["connect_timeout"]),
            "--command-timeout",
            str(timeouts["command_timeout"]),
            *(["--pooled"] if pooled else []),
        ]
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "E2E_PASSWORD": WRITER_PASSWORD, "LANG": "C.UTF-8"}
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self._offset = 0
        self._acks: list[Ack] = []
        self.errors = 0

    def acks(self) -> list[Ack]:
        """Every acknowledged write so far, in the order they were reported."""
        with open(self.out_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "A":
                self._acks.append(Ack(int(parts[1]), float(parts[2]), parts[3]))
            elif parts[:1] == ["E"]:
                self.errors += 1
        return self._acks

    def acked_since(self, t: float) -> list[Ack]:
        return [a for a in self.acks() if a.t > t]

    def stop(self, timeout_s: float = 15.0) -> None:
        terminate(self.proc, timeout_s)
        self.acks()

    def output_tail(self, chars: int = 2000) -> str:
        return self.out_path.read_text(errors="replace")[-chars:]


_MONITOR_LINE = re.compile(r"^\[(?P<ts>[0-9T:.-]+)\]\s+(?P<deleted>Deleted\s+)?\d+:\s+\S+\s+inet\s+(?P<addr>[0-9.]+)/")


class VipMonitor:
    """Every change of the VIP on every data host, with `ip`'s own timestamps."""

    def __init__(self, lab: E2ELab) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen] = {}
        self.paths = {h: lab.base / f"vip-monitor-{h}.out" for h in DATA}
        self.initial: dict[str, bool] = {}
        self.started_wall = 0.0

    def start(self) -> None:
        for host in DATA:
            prefix = self.lab.net.exec_prefix(host)
            with open(self.paths[host], "wb") as out:
                self.procs[host] = subprocess.Popen(
                    [*prefix, prefix[0], "-ts", "-o", "monitor", "address"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        time.sleep(0.3)  # listening before the snapshot: a change in between shows in both
        self.started_wall = time.time()
        holders = self.lab.vip_holders()
        self.initial = {h: h in holders for h in DATA}

    def stop(self) -> None:
        for proc in self.procs.values():
            terminate(proc, 5)

    def changes(self, host: str) -> list[tuple[float, bool]]:
        """(wall time, held after the change) for each add or removal of the VIP on `host`."""
        found = []
        for line in self.paths[host].read_text(errors="replace").splitlines():
            m = _MONITOR_LINE.match(line)
            if m and m["addr"] == self.lab.vip:
                stamp = datetime.datetime.fromisoformat(m["ts"]).timestamp()  # ip prints local time
                found.append((stamp, not m["deleted"]))
        return found

    def intervals(self, host: str, until: float) -> list[tuple[float, float]]:
        """The stretches during which `host` held the VIP."""
        spans: list[tuple[float, float]] = []
        since = self.started_wall if self.initial.get(host) else None
        for stamp, held in self.changes(host):
            if held and since is None:
                since = stamp
            elif not held and since is not None:
                spans.append((since, stamp))
                since = None
        if since is not None:
            spans.append((since, until))
        return spans

    def overlaps(self, start: float, end: float) -> list[tuple[str, str, float, float]]:
        """Periods within [start, end] (wall time) in which two hosts held the VIP."""
        spans = {h: self.intervals(h, end) for h in DATA}
        found = []
        for i, a in enumerate(DATA):
            for b in DATA[i + 1 :]:
                for a0, a1 in spans[a]:
                    for b0, b1 in spans[b]:
                        lo, hi = max(a0, b0, start), min(a1, b1, end)
                        if lo < hi:
                            found.append((a, b, lo, hi))
        return found

    def moves(self, start: float) -> list[tuple[float, str, bool]]:
        """Every change after `start`: (wall time, host, held)."""
        return sorted((t, h, held) for h in DATA for t, held in self.changes(h) if t >= start)


def longest_gap(start: float, end: float, times: list[float]) -> float:
    """The longest stretch within [start, end] without an acknowledged write."""
    points = [start, *sorted(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(points))
