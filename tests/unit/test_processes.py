"""/proc helpers used by the probe and the watchdog, on real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from failoverd.adapters import processes
from tests.support import wait_for_sync


def test_is_stopped_follows_sigstop_and_sigcont():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not processes.is_stopped(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        # Signal delivery is asynchronous: wait until the kernel shows it.
        wait_for_sync("the child stopped", lambda: processes.is_stopped(child.pid), 5, interval_s=0.01)
        os.kill(child.pid, signal.SIGCONT)
        wait_for_sync("the child running again", lambda: not processes.is_stopped(child.pid), 5, interval_s=0.01)
    finally:
        child.kill()
        child.wait()
    assert not processes.is_stopped(child.pid)  # gone


def _fake_postmaster(data_dir: Path) -> subprocess.Popen:
    """A process whose working directory is `data_dir`, named by its
    postmaster.pid, as a postmaster is."""
    child = subprocess.Popen(["sleep", "30"], cwd=data_dir)
    (data_dir / "postmaster.pid").write_text(f"{child.pid}\n{data_dir}\n")
    return child


def test_the_postmaster_watch_holds_the_process_it_verified(tmp_path: Path) -> None:
    child = _fake_postmaster(tmp_path)
    watch = processes.PostmasterWatch(tmp_path)
    try:
        assert watch.pid() == child.pid
        # Held by its pidfd now: the pid file is not read again while it runs.
        (tmp_path / "postmaster.pid").write_text("999999\n")
        assert watch.pid() == child.pid
        child.kill()
        child.wait()
        assert watch.pid() is None  # exited: looked up again, and the pid file names nothing alive
    finally:
        child.kill()
        child.wait()
        watch.forget()


def test_the_postmaster_watch_refuses_a_process_serving_another_directory(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    child = _fake_postmaster(tmp_path / "elsewhere")
    try:
        # A stale pid file whose pid now belongs to an unrelated process.
        (tmp_path / "data" / "postmaster.pid").write_text(f"{child.pid}\n")
        assert processes.PostmasterWatch(tmp_path / "data").pid() is None
    finally:
        child.kill()
        child.wait()


async def test_the_postmaster_watch_wakes_the_loop_when_the_postmaster_exits(tmp_path: Path) -> None:
    child = _fake_postmaster(tmp_path)
    exited = asyncio.Event()
    watch = processes.PostmasterWatch(tmp_path, on_exit=exited.set)
    try:
        assert watch.pid() == child.pid
        await asyncio.sleep(0.05)
        assert not exited.is_set()
        child.kill()
        async with asyncio.timeout(5):
            await exited.wait()  # from the loop's own wakeup, not a poll of ours
        child.wait()
        assert watch.pid() is None
    finally:
        child.kill()
        child.wait()
        watch.forget()


async def test_a_postmaster_found_before_the_watch_was_asked_for_is_watched_too(tmp_path: Path) -> None:
    child = _fake_postmaster(tmp_path)
    watch = processes.PostmasterWatch(tmp_path)
    exited = asyncio.Event()
    try:
        assert watch.pid() == child.pid  # held, not watched: nobody asked
        watch.on_exit = exited.set
        child.kill()
        async with asyncio.timeout(5):
            await exited.wait()
        child.wait()
    finally:
        child.kill()
        child.wait()
        watch.forget()


def test_server_stalled_when_the_postmaster_is_stopped_by_a_signal():
    parent = subprocess.Popen(["sleep", "30"])
    try:
        assert not processes.server_stalled(parent.pid)  # sleeping interruptibly: idle, not stalled
        os.kill(parent.pid, signal.SIGSTOP)
        wait_for_sync("the process stopped", lambda: processes.server_stalled(parent.pid), 5, interval_s=0.01)
        os.kill(parent.pid, signal.SIGCONT)
        wait_for_sync("the process running again", lambda: not processes.server_stalled(parent.pid), 5, interval_s=0.01)
    finally:
        parent.kill()
        parent.wait()


def test_server_stalled_in_uninterruptible_sleep_only_when_every_child_is(monkeypatch):
    # Uninterruptible sleep cannot be made on demand here: the states are given.
    states = {1: b"D", 2: b"D", 3: b"T"}
    monkeypatch.setattr(processes, "process_state", lambda pid: states.get(pid))
    monkeypatch.setattr(processes, "children_of", lambda pid: [2, 3])
    assert processes.server_stalled(1)
    states[3] = b"R"  # one child runs: a slow server, not a stalled one
    assert not processes.server_stalled(1)
    states[3], states[1] = b"D", b"S"  # the postmaster waits for connections: it answers
    assert not processes.server_stalled(1)


def test_process_state_of_a_gone_process_is_none():
    child = subprocess.Popen(["true"])
    child.wait()
    assert processes.process_state(child.pid) is None and not processes.server_stalled(child.pid)
