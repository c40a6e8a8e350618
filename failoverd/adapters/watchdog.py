"""The fencing watchdog (safety property 5): a tiny process beside each
supervisor that stops PostgreSQL when the supervisor cannot.

    python -m failoverd.adapters.watchdog --data-dir D --pg-bin-dir B \
        [--vip-release-command '["/usr/sbin/ip", "addr", "del", ...]']

Protocol: newline-delimited commands on stdin, one report per line on stdout.

    arm <deadline>  fence when time.monotonic() passes <deadline>   -> nothing
                    (CLOCK_MONOTONIC: the supervisor's clock on the same host;
                    a new arm replaces the deadline, earlier or later; no
                    reply, since a leader re-arms on every acknowledgement:
                    send "ping" to know that the arms before it were read)
    disarm          no deadline                                     -> "disarmed"
    ping                                                            -> "pong"
    EOF             armed: fence at once, then exit; disarmed: exit
    on start                                                        -> "ready <pid>"
    after fencing   "fenced <deadline|eof> <what was done>", and the watchdog is disarmed
    bad input       "error <why>"; the deadline is left as it was

Why a separate process with its own loop: a supervisor that is SIGKILLed,
SIGSTOPped or stuck in a stalled event loop cannot fence anything. This loop
is `select()` on stdin with a timeout of exactly the time left to the
deadline, no asyncio, no threads, nothing the supervisor can block.

Fencing is what `pg_ctl stop -m immediate` does, without pg_ctl's start-up
cost: SIGQUIT to the postmaster named in D/postmaster.pid. On SIGQUIT the
postmaster SIGQUITs all its children (backends, walsenders, ...) and exits
without a checkpoint, so no further commit is acknowledged. If it is still
alive after FENCE_GRACE_S (at once if it is stopped by a signal, since it
cannot act on the SIGQUIT then), it and its children (found by parent PID in
/proc, never by name) are SIGKILLed: SIGKILL of the postmaster alone would
leave its backends running until they notice the postmaster is gone. Then the
VIP release command, if any, runs (bounded by --vip-release-timeout).

Signals: the watchdog ignores SIGINT, SIGTERM, SIGHUP and SIGTSTP, and the
supervisor starts it in its own session. `systemctl stop` sends SIGTERM to the
whole cgroup; the supervisor's orderly shutdown demotes and then disarms, and
if it dies or stalls half-way the watchdog must still be there to fence at
the deadline or at EOF. Its lifetime is therefore tied to its stdin, not to
signals; systemd's final SIGKILL (after TimeoutStopSec) still ends it. Ctrl-C
or Ctrl-Z in a terminal reach only the supervisor's process group.

Consequence for the supervisor: the write end of the pipe must not leak into
any other process (asyncio's subprocesses close inherited fds by default, and
Python's pipes are close-on-exec), or EOF never comes when the supervisor dies.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence

from failoverd.adapters import processes

# The watchdog process imports only what it runs every time: it lives beside
# every supervisor for the host's lifetime, so what it imports is memory held
# for nothing (argparse, pathlib and subprocess took it from about 9 MB to
# 13 MB). json and subprocess are imported where a VIP release command needs
# them; asyncio and structlog only by WatchdogHandle, in the supervisor.
if __name__ != "__main__":
    import asyncio
    import json

    import structlog

FENCE_GRACE_S = 0.5  # SIGQUIT -> SIGKILL; PostgreSQL's own immediate shutdown waits 5 s
POLL_INTERVAL_S = 0.01
LINE_BYTES_MAX = 4096
VIP_RELEASE_TIMEOUT_S = 5.0


# --- the watchdog process ---


class Watchdog:
    """The watchdog's state and loop; `infd`, `out` and `clock` can be swapped
    to drive it in-process, the command line uses stdin, stdout and CLOCK_MONOTONIC."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        vip_release_command: Sequence[str] | None = None,
        *,
        vip_release_timeout_s: float = VIP_RELEASE_TIMEOUT_S,
        infd: int = 0,
        out: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data_dir = data_dir
        self.vip_release_command = list(vip_release_command) if vip_release_command else None
        self.vip_release_timeout_s = vip_release_timeout_s
        self.infd = infd
        self.out = out or _write_stdout
        self.clock = clock
        self.deadline: float | None = None
        self._buffer = b""
        self._discarding = False

    def run(self) -> int:
        self.out(f"ready {os.getpid()}")
        while True:
            if self._expired():
                self.fence("deadline")
            timeout = None if self.deadline is None else max(0.0, self.deadline - self.clock())
            readable, _, _ = select.select([self.infd], [], [], timeout)
            # Fence before reading: an "arm" read after the deadline (the supervisor
            # late, or this process descheduled) must not extend a lease that ran out.
            if not readable or self._expired():
                continue
            try:
                chunk = os.read(self.infd, 65536)
            except OSError as error:  # an unreadable pipe counts as a closed one
                self.out(f"error reading stdin: {error.strerror or error}")
                chunk = b""
            if not chunk:
                if self.deadline is not None:
                    self.fence("eof")
                return 0
            self._feed(chunk)

    def _expired(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def _feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if self._discarding:  # the tail of an overlong line
                self._discarding = False
            elif len(line) > LINE_BYTES_MAX:
                self.out(f"error line longer than {LINE_BYTES_MAX} bytes discarded")
            else:
                self.command(line.decode("utf-8", "replace").strip())
        if len(self._buffer) > LINE_BYTES_MAX:  # bounds memory before the newline arrives
            if not self._discarding:
                self.out(f"error line longer than {LINE_BYTES_MAX} bytes discarded")
            self._buffer, self._discarding = b"", True

    def command(self, line: str) -> None:
        words = line.split()
        if words == ["disarm"]:
            self.deadline = None
            self.out("disarmed")
        elif words == ["ping"]:
            self.out("pong")
        elif len(words) == 2 and words[0] == "arm":
            deadline = _parse_deadline(words[1])
            if deadline is None:
                self.out(f"error bad deadline {words[1][:40]!r}")
            else:
                self.deadline = deadline
        elif words:
            self.out(f"error unknown command {line[:40]!r}")

    def fence(self, reason: str) -> None:
        self.deadline = None
        done = [stop_postmaster(self.data_dir)]
        if self.vip_release_command:
            done.append(release_vip(self.vip_release_command, self.vip_release_timeout_s))
        self.out(f"fenced {reason} " + "; ".join(done))


def _parse_deadline(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def _write_stdout(line: str) -> None:
    # A dead or frozen supervisor must not stop the fence: reports are best effort.
    try:
        os.write(1, (line + "\n").encode())
    except OSError:
        pass


def stop_postmaster(data_dir: str | os.PathLike[str], grace_s: float = FENCE_GRACE_S) -> str:
    """Immediate shutdown of the postmaster of `data_dir`; returns what happened."""
    pid = processes.read_postmaster_pid(data_dir)
    if pid is None:
        return "no postmaster (no readable postmaster.pid)"
    if not processes.process_alive(pid):
        return f"no postmaster (pid {pid} from postmaster.pid is not running)"
    if not processes.runs_in(pid, data_dir):
        return f"no postmaster (pid {pid} from postmaster.pid is another process)"
    try:
        os.kill(pid, signal.SIGQUIT)
    except ProcessLookupError:
        return f"postmaster {pid} exited"
    except PermissionError:
        return f"postmaster {pid} could not be signalled: permission denied"
    # A postmaster stopped by a signal (SIGSTOP, a tracer) cannot act on the
    # SIGQUIT until it is continued: no grace for it, SIGKILL at once.
    waited_s = 0.0 if processes.is_stopped(pid) else grace_s
    end = time.monotonic() + waited_s
    while time.monotonic() < end:
        if not processes.process_alive(pid):
            return f"postmaster {pid} stopped by SIGQUIT"
        time.sleep(POLL_INTERVAL_S)
    children = processes.children_of(pid)
    for victim in [pid, *children]:  # the postmaster first, so it forks no more
        try:
            os.kill(victim, signal.SIGKILL)
        except OSError:
            pass
    return f"postmaster {pid} SIGKILLed with {len(children)} children after {waited_s:g} s"


def release_vip(argv: Sequence[str], timeout_s: float) -> str:
    import subprocess  # here: see the imports at the top

    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"vip release command timed out after {timeout_s:g} s"
    except OSError as error:
        return f"vip release command failed to start: {error.strerror or error}"
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().replace("\n", " ")[-200:]
        return f"vip release command exited {done.returncode}: {tail}"
    return "vip released"


USAGE = (
    "usage: python -m failoverd.adapters.watchdog --data-dir D [--pg-bin-dir B]"
    " [--vip-release-command JSON-ARGV] [--vip-release-timeout S]"
)


class UsageError(Exception):
    pass


class Options:
    """The command line, parsed (a plain class: dataclasses would import inspect)."""

    def __init__(self, data_dir: str, pg_bin_dir: str | None = None) -> None:
        self.data_dir = data_dir
        self.pg_bin_dir = pg_bin_dir  # accepted for a pg_ctl fallback; fencing signals the postmaster itself
        self.vip_release_command: list[str] | None = None
        self.vip_release_timeout = VIP_RELEASE_TIMEOUT_S


def parse_args(argv: Sequence[str]) -> Options:
    """The command line (the supervisor writes it: WatchdogHandle.argv)."""
    given: dict[str, str] = {}
    words = list(argv)
    while words:
        option = words.pop(0)
        name, eq, value = option.partition("=")
        if name not in ("--data-dir", "--pg-bin-dir", "--vip-release-command", "--vip-release-timeout"):
            raise UsageError(f"unknown argument {option[:60]!r}")
        if not eq:
            if not words:
                raise UsageError(f"{name} needs a value")
            value = words.pop(0)
        given[name] = value
    if not given.get("--data-dir"):
        raise UsageError("--data-dir is required")
    options = Options(given["--data-dir"], given.get("--pg-bin-dir"))
    if "--vip-release-command" in given:
        options.vip_release_command = _vip_command(given["--vip-release-command"])
    if "--vip-release-timeout" in given:
        timeout = _parse_deadline(given["--vip-release-timeout"])
        if timeout is None or timeout <= 0:
            raise UsageError("--vip-release-timeout: not a positive number of seconds")
        options.vip_release_timeout = timeout
    return options


def _vip_command(text: str) -> list[str]:
    import json  # here: see the imports at the top

    try:
        argv = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--vip-release-command: not JSON: {error}") from None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise UsageError("--vip-release-command: must be a JSON array of non-empty strings (an argv list)")
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        sys.stderr.write(f"{USAGE}\nerror: {error}\n")
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)
    # A supervisor that stops reading (frozen with a full pipe) must not be able
    # to block this process in write(): a report that does not fit is dropped.
    os.set_blocking(1, False)
    watchdog = Watchdog(args.data_dir, args.vip_release_command, vip_release_timeout_s=args.vip_release_timeout)
    return watchdog.run()


# --- the supervisor's side ---


class WatchdogError(Exception):
    """The watchdog could not be started or is gone: nothing fences for us."""


class WatchdogHandle:
    """Runs the watchdog as a child of the supervisor and feeds it deadlines.

    `close()` closes the pipe: if still armed, the watchdog fences (that is
    the point); the orderly shutdown path is demote, `disarm()`, `close()`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        pg_bin_dir: str | os.PathLike[str] | None = None,
        *,
        vip_release_command: Sequence[str] | None = None,
        python: str = sys.executable,
        on_report: Callable[[str], None] | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.argv = [python, "-m", "failoverd.adapters.watchdog", "--data-dir", os.fspath(data_dir)]
        if pg_bin_dir is not None:
            self.argv += ["--pg-bin-dir", os.fspath(pg_bin_dir)]
        if vip_release_command:
            self.argv += ["--vip-release-command", json.dumps(list(vip_release_command))]
        self.on_report = on_report
        self.start_timeout_s = start_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("failoverd.adapters.watchdog")

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        """Spawn the watchdog and wait for its "ready" line."""
        if self._proc is not None:
            raise RuntimeError("watchdog already started")
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        try:
            first = await asyncio.wait_for(self._proc.stdout.readline(), self.start_timeout_s)
        except TimeoutError:
            first = b""
        if not first.startswith(b"ready "):
            await self._kill()
            self._proc = None
            raise WatchdogError(f"watchdog did not start: {first[:200]!r}")
        self._log.info("watchdog_started", pid=self._proc.pid)
        self._reader = asyncio.create_task(self._read_reports(), name="watchdog-reports")

    async def arm(self, deadline: float) -> None:
        await self._send(f"arm {float(deadline)!r}")

    async def disarm(self) -> None:
        await self._send("disarm")

    async def ping(self) -> None:
        await self._send("ping")

    async def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise WatchdogError("watchdog is not running")
        try:
            proc.stdin.write(line.encode() + b"\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as error:
            raise WatchdogError(f"watchdog is gone: {error}") from None

    async def _read_reports(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            text = line.decode("utf-8", "replace").strip()
            if text.startswith("fenced "):
                self._log.warning("watchdog_fenced", report=text)
            elif text.startswith("error "):
                self._log.error("watchdog_error", report=text)
            else:
                self._log.debug("watchdog_report", report=text)
            if self.on_report is not None:
                try:
                    self.on_report(text)
                except Exception:  # noqa: BLE001 - the reports must keep flowing into the log
                    self._log.exception("watchdog_report_callback_failed", report=text)
        self._log.info("watchdog_exited", returncode=await self._proc.wait())

    async def close(self, timeout_s: float = 10.0) -> int | None:
        """Close the pipe and wait for the watchdog to exit (SIGKILL after `timeout_s`)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
            try:
                await proc.stdin.wait_closed()
            except (BrokenPipeError, ConnectionResetError):
                pass
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            await self._kill()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 1.0)
            except TimeoutError:  # a grandchild holding stdout open; stop listening
                pass
        return proc.returncode

    async def _kill(self) -> None:
        assert self._proc is not None
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.wait()


if __name__ == "__main__":
    sys.exit(main())
