"""Loopback ports for the servers tests and benchmarks start (failoverd's API
and peer listeners, PostgreSQL), handed out before those servers bind them.

Binding port 0, reading the number and closing the socket before the server
binds it races twice: the kernel hands that very number to the next process
that binds port 0 (a parallel test run doing the same), and, being in the
ephemeral range, to any outgoing connection as its local port. Here:

* Ports come from a range below the kernel's ephemeral range
  (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): 20000
  up to that, at most 32000. No outgoing connection is given one of these.
* That range is cut into blocks of BLOCK ports, and each process claims one
  block for itself with an exclusive flock() on a lock file in the temporary
  directory (failoverd-test-ports-<first port>.lock), held until the process
  exits, when the kernel drops it (a crash included). Processes that use
  this module (parallel pytest runs or workers, bench scripts, another
  checkout) therefore never hand out the same port.
* Within its block a process hands the ports out in turn, skipping any that
  something listens on (checked by binding it, with SO_REUSEADDR as the
  servers use, so that a closed connection in TIME_WAIT does not count).

The race that remains:

* A program that does not go through this module can bind a handed-out port
  between the check and the server's bind (another service on the machine,
  or a test that binds a fixed port in 20000-32000).
* A process hands out its block's ports again after BLOCK of them: a port
  given out BLOCK hand-outs ago whose server has not bound it yet (or is
  down for a moment, a stopped member restarting) can be handed out twice.
  Nothing in the suite holds a port unbound across that many hand-outs.
* Where ip_local_port_range was widened so that no range of MIN_SPAN ports
  lies outside it, ports come from 20000-32000 anyway, inside the ephemeral
  range, and an outgoing connection can take one.
* A block whose lock file cannot be opened (another user's, in a /tmp with
  fs.protected_regular) is skipped, never shared; if every block is taken,
  free_port() raises instead of guessing.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import threading

LOOPBACK = "127.0.0.1"
BLOCK = 200
_PREFERRED = (20000, 32000)
MIN_SPAN = 4 * BLOCK


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for local ports of outgoing connections (inclusive)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def port_range() -> tuple[int, int]:
    """[low, high): where the blocks are, outside the ephemeral range if it can be."""
    eph_low, eph_high = ephemeral_range()
    low, high = _PREFERRED[0], min(_PREFERRED[1], eph_low)
    if high - low >= MIN_SPAN:
        return low, high
    if 65536 - (eph_high + 1) >= MIN_SPAN:
        return max(eph_high + 1, 1024), 65536
    return _PREFERRED


class _Block:
    """This process's block of ports and the lock that holds it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._pid: int | None = None
        self._fd: int | None = None
        self.first = 0
        self._next = 0

    def take(self) -> int:
        with self._mutex:
            if self._pid != os.getpid():  # first use, or a forked child: the block is the parent's
                self._claim()
            for _ in range(BLOCK):
                port = self.first + self._next
                self._next = (self._next + 1) % BLOCK
                if _nothing_listens(port):
                    return port
        raise RuntimeError(f"every port of this process's block {self.first}-{self.first + BLOCK - 1} is in use")

    def _claim(self) -> None:
        low, high = port_range()
        starts = list(range(-(-low // BLOCK) * BLOCK, high - BLOCK + 1, BLOCK))
        if not starts:
            raise RuntimeError(f"no block of {BLOCK} ports fits in {low}-{high - 1}")
        offset = os.getpid() % len(starts)  # parallel processes start their search in different places
        for start in starts[offset:] + starts[:offset]:
            fd = _lock(os.path.join(tempfile.gettempdir(), f"failoverd-test-ports-{start}.lock"))
            if fd is None:
                continue
            # A forked child leaves the parent's inherited fd alone: the parent's lock stays.
            self._pid, self._fd, self.first, self._next = os.getpid(), fd, start, 0
            return
        raise RuntimeError(
            f"all {len(starts)} blocks of test ports in {low}-{high - 1} are held by other processes "
            f"(lock files {tempfile.gettempdir()}/failoverd-test-ports-*.lock)"
        )


def _lock(path: str) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when another
    process holds it or the file cannot be opened."""
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # flock needs no write access
        except FileNotFoundError:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _nothing_listens(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


_block = _Block()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, from this process's own
    block (see the module's docstring for what that protects against)."""
    return _block.take()


def free_ports(count: int) -> list[int]:
    """`count` distinct free_port()s."""
    if count > BLOCK:
        raise ValueError(f"at most {BLOCK} ports at once")
    ports: list[int] = []
    for _ in range(count):
        port = free_port()
        if port in ports:  # wrapped around within one call: nearly every port of the block is in use
            raise RuntimeError(f"fewer than {count} free ports left in this process's block")
        ports.append(port)
    return ports
