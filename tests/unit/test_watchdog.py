"""The fencing watchdog, run as the real `python -m failoverd.adapters.watchdog` process
against a stand-in postmaster: a child process whose PID sits in a fake data
directory's postmaster.pid and that records when SIGQUIT arrives."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from failoverd.adapters import processes
from failoverd.adapters.watchdog import VIP_RELEASE_TIMEOUT_S, UsageError, WatchdogError, WatchdogHandle, parse_args
from tests.support import wait_for_sync

LIVENESS_S = 2.0  # "soon", on any machine: these tests check what happens, not how fast

POSTMASTER = r"""
import os, signal, subprocess, sys, time
marker, stubborn = sys.argv[1], sys.argv[2] == "stubborn"
def on_quit(signum, frame):
    with open(marker, "w") as f:
        f.write(repr(time.monotonic()))
    os._exit(0)
signal.signal(signal.SIGQUIT, signal.SIG_IGN if stubborn else on_quit)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) if stubborn else None
print("ready", child.pid if child else 0, flush=True)
time.sleep(30)
"""


class Child:
    """A child process with line-oriented pipes and bounded reads."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self, timeout_s: float = 3.0) -> str:
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"no line within {timeout_s} s (have {self._buffer!r})")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise EOFError(f"stdout closed (have {self._buffer!r})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def postmaster(children: list[Child], data_dir: Path, stubborn: bool = False) -> tuple[Child, Path, int]:
    """Start the stand-in in `data_dir` (a postmaster's cwd is its data directory)."""
    marker = data_dir.parent / "sigquit-at"
    child = Child([sys.executable, "-c", POSTMASTER, str(marker), "stubborn" if stubborn else "plain"], cwd=data_dir)
    children.append(child)
    word, grandchild = child.line().split()
    assert word == "ready"
    (data_dir / "postmaster.pid").write_text(f"{child.proc.pid}\n{data_dir}\n1718000000\n5432\n")
    return child, marker, int(grandchild)


def watchdog(children: list[Child], data_dir: Path, *extra: str) -> Child:
    argv = [
        sys.executable,
        "-m",
        "failoverd.adapters.watchdog",
        "--data-dir",
        str(data_dir),
        "--pg-bin-dir",
        "/nonexistent",
    ]
    child = Child([*argv, *extra])
    children.append(child)
    assert child.line().startswith("ready ")
    return child


def exited(child: Child, timeout_s: float = 2.0) -> bool:
    try:
        child.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_fences_at_the_deadline(children: list[Child], data_dir: Path) -> None:
    pm, marker, _ = postmaster(children, data_dir)
    wd = watchdog(children, data_dir)
    deadline = time.monotonic() + 0.3
    wd.send(f"arm {deadline!r}")
    report = wd.line(timeout_s=2.0)
    assert report.startswith("fenced deadline postmaster"), report
    assert "stopped by SIGQUIT" in report
    fenced_at = float(marker.read_text())
    # Never before the deadline. The bound after it is liveness only (a
    # loaded machine may be slow); the real delay is in make bench's
    # timelines ("watchdog fenced" right after "lease lost").
    assert deadline <= fenced_at < deadline + LIVENESS_S
    assert exited(pm)
    wd.send("ping")  # still alive, and disarmed: nothing more happens
    assert wd.line() == "pong"


def test_rearming_extends_and_disarm_prevents(children: list[Child], data_dir: Path) -> None:
    pm, marker, _ = postmaster(children, data_dir)
    wd = watchdog(children, data_dir)
    start = time.monotonic()
    while time.monotonic() < start + 0.6:  # three times past the first deadline
        wd.send(f"arm {time.monotonic() + 0.2!r}")
        time.sleep(0.05)
    wd.send("disarm")
    assert wd.line() == "disarmed"
    time.sleep(0.4)
    wd.send("ping")
    assert wd.line() == "pong"
    assert not marker.exists() and pm.proc.poll() is None


def test_past_deadline_fences_at_once(children: list[Child], data_dir: Path) -> None:
    # The core's step-down emits ArmWatchdog(now): fence immediately.
    postmaster(children, data_dir)
    wd = watchdog(children, data_dir)
    wd.send(f"arm {time.monotonic() - 1.0!r}")
    assert wd.line(timeout_s=1.0).startswith("fenced deadline postmaster")


def test_eof_while_armed_fences_immediately(children: list[Child], data_dir: Path) -> None:
    pm, marker, _ = postmaster(children, data_dir)
    wd = watchdog(children, data_dir)
    wd.send(f"arm {time.monotonic() + 60.0!r}")
    wd.send("ping")
    assert wd.line() == "pong"  # the arm was read (it has no reply of its own)
    closed_at = time.monotonic()
    wd.close_stdin()
    assert wd.line(timeout_s=1.0).startswith("fenced eof postmaster")
    assert float(marker.read_text()) - closed_at < LIVENESS_S
    assert exited(wd) and wd.proc.returncode == 0
    assert exited(pm)


def test_eof_while_disarmed_exits_without_fencing(children: list[Child], data_dir: Path) -> None:
    pm, marker, _ = postmaster(children, data_dir)
    wd = watchdog(children, data_dir)
    wd.send(f"arm {time.monotonic() + 60.0!r}")
    wd.send("disarm")
    assert wd.line() == "disarmed"
    wd.close_stdin()
    assert exited(wd) and wd.proc.returncode == 0
    assert not marker.exists() and pm.proc.poll() is None


def test_stale_postmaster_pid_is_reported_not_fatal(children: list[Child], data_dir: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(5)
    (data_dir / "postmaster.pid").write_text(f"{gone.pid}\n{data_dir}\n")
    wd = watchdog(children, data_dir)
    wd.send(f"arm {time.monotonic()!r}")
    report = wd.line()
    assert report.startswith("fenced deadline no postmaster") and str(gone.pid) in report
    wd.send("ping")
    assert wd.line() == "pong"


def test_pid_reused_by_another_process_is_not_signalled(children: list[Child], data_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other, marker, _ = postmaster(children, elsewhere)  # runs in another directory
    (data_dir / "postmaster.pid").write_text(f"{other.proc.pid}\n")
    wd = watchdog(children, data_dir)
    wd.send(f"arm {time.monotonic()!r}")
    assert "is another process" in wd.line()
    assert other.proc.poll() is None and not marker.exists()


def test_missing_postmaster_pid_and_vip_release(children: list[Child], data_dir: Path, tmp_path: Path) -> None:
    released = tmp_path / "vip-released"
    command = json.dumps([sys.executable, "-c", f"open({str(released)!r}, 'w').close()"])
    wd = watchdog(children, data_dir, "--vip-release-command", command)
    wd.send(f"arm {time.monotonic()!r}")
    report = wd.line()
    assert report.startswith("fenced deadline no postmaster (no readable postmaster.pid)")
    assert report.endswith("vip released") and released.exists()


def test_stubborn_postmaster_and_its_children_are_killed(children: list[Child], data_dir: Path) -> None:
    pm, _, grandchild = postmaster(children, data_dir, stubborn=True)
    wd = watchdog(children, data_dir)
    wd.send(f"arm {time.monotonic()!r}")
    report = wd.line(timeout_s=2.0)
    assert "SIGKILLed with 1 children" in report, report
    assert exited(pm) and pm.proc.returncode == -signal.SIGKILL
    for _ in range(100):  # the grandchild is reparented, so poll for it by PID
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        stat = Path(f"/proc/{grandchild}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.01)
    else:
        pytest.fail("the postmaster's child survived")


def test_a_stopped_postmaster_is_sigkilled_without_the_grace(children: list[Child], data_dir: Path) -> None:
    """SIGSTOPped (a hung server in the e2e lab), the postmaster cannot act
    on SIGQUIT: the watchdog does not wait FENCE_GRACE_S for it."""
    pm, marker, _ = postmaster(children, data_dir)
    os.kill(pm.proc.pid, signal.SIGSTOP)
    wait_for_sync("the SIGSTOP delivered", lambda: processes.is_stopped(pm.proc.pid), 5, interval_s=0.01)
    wd = watchdog(children, data_dir)
    wd.send(f"arm {time.monotonic()!r}")
    report = wd.line(timeout_s=2.0)
    assert "SIGKILLed with 0 children after 0 s" in report, report
    assert exited(pm) and pm.proc.returncode == -signal.SIGKILL
    assert not marker.exists()  # it never ran its SIGQUIT handler


def test_bad_commands_and_termination_signals_are_ignored(children: list[Child], data_dir: Path) -> None:
    pm, marker, _ = postmaster(children, data_dir)
    wd = watchdog(children, data_dir)
    for line, answer in [
        ("arm soon", "error bad deadline"),
        ("arm nan", "error bad deadline"),
        ("explode", "error unknown command"),
        ("x" * 5000, "error line longer"),
        ("y" * 70000, "error line longer"),
        ("ping", "pong"),
    ]:
        wd.send(line)
        assert wd.line().startswith(answer), line[:20]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        wd.proc.send_signal(sig)
    wd.send("ping")
    assert wd.line() == "pong"
    assert not marker.exists() and pm.proc.poll() is None


def test_a_supervisor_that_stops_reading_cannot_stall_the_fence(children: list[Child], data_dir: Path) -> None:
    # 20,000 pongs (100 KB) overflow the 64 KiB stdout pipe nobody reads.
    pm, marker, _ = postmaster(children, data_dir)
    wd = watchdog(children, data_dir)
    assert wd.proc.stdin is not None
    wd.proc.stdin.write(b"ping\n" * 20_000 + f"arm {time.monotonic() + 0.2!r}\n".encode())
    wd.proc.stdin.flush()
    assert exited(pm, timeout_s=2.0) and marker.exists()


async def test_handle_arms_disarms_and_fences_on_close(children: list[Child], data_dir: Path) -> None:
    pm, marker, _ = postmaster(children, data_dir)
    reports: list[str] = []
    handle = WatchdogHandle(data_dir, "/nonexistent", on_report=reports.append)
    await handle.start()
    try:
        await handle.arm(time.monotonic() + 60.0)
        await handle.disarm()
        await handle.ping()
        await handle.arm(time.monotonic() + 60.0)
    finally:
        assert await handle.close() == 0  # closing while armed is the supervisor dying
    assert reports[:2] == ["disarmed", "pong"]  # an arm has no reply
    assert reports[-1].startswith("fenced eof postmaster")
    assert marker.exists() and exited(pm)
    with pytest.raises(WatchdogError):
        await handle.arm(time.monotonic())


async def test_handle_start_failure_is_an_error(tmp_path: Path) -> None:
    handle = WatchdogHandle(tmp_path, python=sys.executable, vip_release_command=["x"], start_timeout_s=5.0)
    handle.argv.append("--no-such-option")
    with pytest.raises(WatchdogError, match="did not start"):
        await handle.start()


# ----------------------------------------------------------- command line


def test_command_line_forms_and_defaults() -> None:
    options = parse_args(["--data-dir", "/d", "--pg-bin-dir=/b", "--vip-release-command", '["ip", "addr", "del"]'])
    assert (options.data_dir, options.pg_bin_dir) == ("/d", "/b")
    assert options.vip_release_command == ["ip", "addr", "del"]
    assert options.vip_release_timeout == VIP_RELEASE_TIMEOUT_S
    assert parse_args(["--data-dir=/d", "--vip-release-timeout", "2.5"]).vip_release_timeout == 2.5


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ([], "--data-dir is required"),
        (["--data-dir"], "--data-dir needs a value"),
        (["--data-dir", "/d", "--bogus"], "unknown argument '--bogus'"),
        (["--data-dir", "/d", "--vip-release-command", "[1]"], "JSON array of non-empty strings"),
        (["--data-dir", "/d", "--vip-release-command", "ip addr"], "not JSON"),
        (["--data-dir", "/d", "--vip-release-timeout", "0"], "not a positive number"),
        (["--data-dir", "/d", "--vip-release-timeout", "nan"], "not a positive number"),
    ],
)
def test_a_bad_command_line_is_refused(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError, match=error):
        parse_args(argv)


def test_a_bad_command_line_exits_2_with_the_usage(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "failoverd.adapters.watchdog", "--data-dir", str(tmp_path), "--bogus"]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and done.stderr.startswith("usage: ") and "--bogus" in done.stderr


def test_the_watchdog_process_imports_only_what_it_needs(tmp_path: Path) -> None:
    """It runs beside every supervisor for good: its memory is the interpreter
    and what it imports (13 MB with argparse, pathlib and subprocess, 10.6
    without). With a VIP release command it also needs json, nothing more."""

    def imports(*args: str) -> set[str]:
        argv = [sys.executable, "-X", "importtime", *args]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done
        return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}

    interpreter = imports("-c", "pass")  # whatever this interpreter's site imports anyway
    watchdog = imports(
        "-m", "failoverd.adapters.watchdog", "--data-dir", str(tmp_path), "--vip-release-command", '["true"]'
    )
    assert "failoverd.adapters.processes" in watchdog and "json" in watchdog
    heavy = {"argparse", "asyncio", "dataclasses", "inspect", "pathlib", "structlog", "subprocess", "typing"}
    assert (watchdog - interpreter) & heavy == set()
