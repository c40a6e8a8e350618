"""Processes seen through /proc and postmaster.pid, with the standard library
only: the fencing watchdog imports this and must start in a fraction of a
second. Nothing here finds a process by name."""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds no sockets or locks)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        pass
    try:  # no /proc entry we can read: ask the kernel directly
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # the name in parentheses may hold spaces
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[0] not in (b"Z", b"X") and fields[1] == str(pid).encode():
            found.append(int(entry))
    return found


def read_postmaster_pid(data_dir: Path) -> int | None:
    """The pid on the first line of postmaster.pid (negative there: a
    single-user backend holds the directory)."""
    try:
        first = (Path(data_dir) / "postmaster.pid").read_text(errors="replace").split("\n", 1)[0].strip()
        pid = abs(int(first))
    except (OSError, ValueError):
        return None
    return pid if 1 < pid <= 2**22 else None


def runs_in(pid: int, data_dir: Path) -> bool:
    """False only when we can see that `pid` does not serve `data_dir`: a
    postmaster's working directory is its data directory, and a stale
    postmaster.pid may name a pid since reused by another process."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return True  # another user's process, or /proc hidden: the pid alone must do
    return os.path.realpath(cwd) == os.path.realpath(data_dir)


def live_postmaster_pid(data_dir: Path) -> int | None:
    """The postmaster of `data_dir`, if one is running."""
    pid = read_postmaster_pid(data_dir)
    if pid is None or not process_alive(pid) or not runs_in(pid, data_dir):
        return None
    return pid


def is_stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (SIGSTOP, SIGTSTP) or a tracer:
    state T or t in /proc/<pid>/stat. False when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The command name (field 2) may hold spaces and parentheses: the state
    # is the first field after its last closing parenthesis.
    fields = stat[stat.rfind(b")") + 1 :].split()
    return bool(fields) and fields[0] in (b"T", b"t")
