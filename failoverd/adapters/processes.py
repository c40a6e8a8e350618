"""Processes seen through /proc and postmaster.pid, with the standard library
only: the fencing watchdog imports this and must start in a fraction of a
second. Nothing here finds a process by name."""

from __future__ import annotations

import os
import select
from collections.abc import Callable

# The fencing watchdog imports this module and nothing it can do without
# (its memory is held on every host for good): paths are handled with
# os.path, and typing is for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


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


def is_zombie(pid: int) -> bool:
    """Whether `pid` has exited but is not reaped yet (state Z or X)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


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


def read_postmaster_pid(data_dir: str | os.PathLike[str]) -> int | None:
    """The pid on the first line of postmaster.pid (negative there: a
    single-user backend holds the directory)."""
    return read_lock_pid(os.path.join(data_dir, "postmaster.pid"))


def read_lock_pid(lock_file: str | os.PathLike[str]) -> int | None:
    """The pid on the first line of a PostgreSQL lock file (postmaster.pid,
    a socket's .lock)."""
    try:
        with open(lock_file, encoding="utf-8", errors="replace") as f:
            first = f.readline().strip()
        pid = abs(int(first))
    except (OSError, ValueError):
        return None
    return pid if 1 < pid <= 2**22 else None


def runs_in(pid: int, data_dir: str | os.PathLike[str]) -> bool:
    """False only when we can see that `pid` does not serve `data_dir`: a
    postmaster's working directory is its data directory, and a stale
    postmaster.pid may name a pid since reused by another process."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return True  # another user's process, or /proc hidden: the pid alone must do
    return os.path.realpath(cwd) == os.path.realpath(data_dir)


def live_postmaster_pid(data_dir: str | os.PathLike[str]) -> int | None:
    """The postmaster of `data_dir`, if one is running."""
    pid = read_postmaster_pid(data_dir)
    if pid is None or not process_alive(pid) or not runs_in(pid, data_dir):
        return None
    return pid


class PostmasterWatch:
    """The postmaster of one data directory, found the way
    `live_postmaster_pid` finds it and then held by a pidfd. While the pidfd
    does not say the process exited, the same postmaster runs: a probe costs
    one poll instead of the pid file, /proc and two realpaths, and no reused
    pid can be mistaken for it.

    With `on_exit`, the pidfd is also watched by the running asyncio loop, and
    `on_exit()` is called as soon as the postmaster exits (a probe need not
    wait for its turn to see a crash). Without pidfds (a kernel before 5.3),
    every call makes the full check."""

    def __init__(self, data_dir: str | os.PathLike[str], on_exit: Callable[[], None] | None = None) -> None:
        self.data_dir = data_dir
        self._on_exit = on_exit
        self._pid: int | None = None
        self._fd: int | None = None
        self._loop: Any = None  # the asyncio loop watching _fd, if one is

    @property
    def on_exit(self) -> Callable[[], None] | None:
        return self._on_exit

    @on_exit.setter
    def on_exit(self, callback: Callable[[], None] | None) -> None:
        """Set from the loop: a postmaster already held is watched from now on."""
        self._on_exit = callback
        if self._fd is not None and self._loop is None:
            self._watch(self._fd)

    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        if self._fd is not None:
            if not _pidfd_exited(self._fd):
                return self._pid
            self.forget()
        pid = live_postmaster_pid(self.data_dir)
        if pid is None:
            return None
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone since, or no pidfds here
            return live_postmaster_pid(self.data_dir)
        # The pidfd pins the process: check again that it is the one the pid
        # file names and that it serves this directory, now that its pid
        # cannot be reused under us.
        if _pidfd_exited(fd) or read_postmaster_pid(self.data_dir) != pid or not runs_in(pid, self.data_dir):
            os.close(fd)
            return None
        self._pid, self._fd = pid, fd
        self._watch(fd)
        return pid

    def forget(self) -> None:
        """Close the pidfd: the next call looks the postmaster up again."""
        fd, self._fd, self._pid = self._fd, None, None
        if fd is None:
            return
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)  # before the close: the number may be reused at once
        os.close(fd)

    def _watch(self, fd: int) -> None:
        if self._on_exit is None:
            return
        import asyncio  # here, not at the top: the watchdog imports this module and never watches

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.add_reader(fd, self._exited)
        self._loop = loop

    def _exited(self) -> None:
        self.forget()  # a pidfd stays readable: leaving it watched would spin the loop
        if self._on_exit is not None:
            self._on_exit()


def _pidfd_exited(fd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()  # not select(): it fails on descriptors above 1023
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def process_state(pid: int) -> bytes | None:
    """The state letter of /proc/<pid>/stat (R, S, D, T, t, Z, ...); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the state
    # is the first field after its last closing parenthesis.
    fields = stat[stat.rfind(b")") + 1 :].split()
    return fields[0] if fields else None


def is_stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (SIGSTOP, SIGTSTP) or a tracer:
    state T or t. False when it is gone."""
    return process_state(pid) in (b"T", b"t")


_CANNOT_RUN = (b"T", b"t", b"D")


def server_stalled(postmaster_pid: int) -> bool:
    """Whether no process of the server can run: the postmaster stopped by a
    signal (it answers no new connection and restarts nothing: broken,
    whatever its children still do), or the postmaster and every child stopped or in uninterruptible sleep
    (a storage stall). A busy server has processes running or runnable, and
    an idle one sleeps interruptibly (S) in its wait loops."""
    state = process_state(postmaster_pid)
    if state in (b"T", b"t"):
        return True
    if state != b"D":
        return False
    return all(process_state(child) in (*_CANNOT_RUN, None) for child in children_of(postmaster_pid))
