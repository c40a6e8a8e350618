"""The virtual IP: an IPv4 address that follows the primary (design §2).

`acquire()` adds the address to the configured interface and announces it
with gratuitous ARP; `release()` removes it. The supervisor calls `acquire()`
only after PostgreSQL has been seen out of recovery while the lease is valid,
and `release()` before or with fencing/demotion; the watchdog runs
`release_command()` itself when it fences.

Before adding the address, `acquire()` runs duplicate address detection
(`arping -D`): if another host answers ARP for it (an old primary that was
not fenced, a misconfiguration), it refuses with VipError rather than create
a split brain on the client network. The announcement (`arping -U`, spaced
unsolicited ARP requests that overwrite neighbours' stale ARP entries) runs in
the background, so `acquire()` returns as soon as the address is on the
interface; `release()` cancels an announcement still in flight.

Programs: `ip` (iproute2) and `arping` (iputils-arping), found on PATH or in
the sbin directories; `apt-get install iproute2 iputils-arping`. Privileges:
`ip addr add/del` needs CAP_NET_ADMIN and `arping` needs CAP_NET_RAW
(Debian installs arping with that file capability); nothing else. Note that
`oscmd.run` drops ambient capabilities from its children, so a non-root
daemon holding only ambient CAP_NET_ADMIN/CAP_NET_RAW cannot run `ip addr`
through it; as root it works. With `netns` set, every command is prefixed
with `ip netns exec NAME` (test labs), which also needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
from typing import Any

import structlog

from failoverd import oscmd
from failoverd.config import VipConfig

INSTALL_HINT = "apt-get install iproute2 iputils-arping"
IP_TIMEOUT_S = 5.0
# `arping -D -w 1` gives up after one second; the margin covers a slow start.
DAD_TIMEOUT_S = 5.0
# One `arping -U -c 1` sends at once, then idles for its 1 s interval.
ANNOUNCE_TIMEOUT_S = 5.0
_SEARCH_PATH = ":".join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
)
_RECEIVED = re.compile(r"^Received (\d+) response", re.MULTILINE)
_REPLY = re.compile(r"^\S+ reply from ", re.MULTILINE)


class VipError(Exception):
    """The VIP could not be acquired or released, or its state read."""


def _find(program: str) -> str:
    path = shutil.which(program, path=_SEARCH_PATH)
    if path is None:
        raise VipError(f"{program!r} not found (PATH and sbin directories); install it: {INSTALL_HINT}")
    return path


class VirtualIp:
    """One virtual IPv4 address on one interface of this host (VipPort)."""

    def __init__(
        self,
        config: VipConfig,
        *,
        netns: str | None = None,
        log: Any = None,
        arp_count: int = 3,
        arp_interval_s: float = 0.2,
    ) -> None:
        if arp_count < 0:
            raise ValueError(f"arp_count must be >= 0, not {arp_count!r}")
        if not arp_interval_s >= 0:
            raise ValueError(f"arp_interval_s must be >= 0, not {arp_interval_s!r}")
        self.config = config
        self.netns = netns
        self.log = log or structlog.get_logger("failoverd")
        self.arp_count = arp_count
        self.arp_interval_s = arp_interval_s
        # Found once, at start-up: a host that could never take the VIP must
        # say so now, not at its first failover.
        self._ip = _find("ip")
        self._arping = _find("arping")
        self._lock = asyncio.Lock()
        self._announcing: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ addresses

    @property
    def address(self) -> str:
        return str(self.config.address.ip)

    @property
    def interface(self) -> str:
        return self.config.interface

    def _argv(self, *argv: str) -> list[str]:
        prefix = [self._ip, "netns", "exec", self.netns] if self.netns else []
        return prefix + list(argv)

    def release_command(self) -> list[str]:
        """The argv that removes the address, for the watchdog's
        --vip-release-command (it runs it without this process)."""
        return self._argv(self._ip, "addr", "del", self.config.address.with_prefixlen, "dev", self.interface)

    async def _run(self, argv: list[str], timeout_s: float) -> oscmd.Completed:
        try:
            return await oscmd.run(argv, user=None, timeout_s=timeout_s, check=False)
        except oscmd.CommandFailed as error:  # could not start, or timed out
            raise VipError(f"{self._describe()}: {error}") from error

    def _describe(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        return f"vip {self.address} on {self.interface}{where}"

    # ---------------------------------------------------------------- state

    async def _prefixes(self) -> list[int]:
        """The prefix lengths with which the address is on the interface
        (normally none or exactly the configured one)."""
        done = await self._run(self._argv(self._ip, "-o", "-4", "addr", "show", "dev", self.interface), IP_TIMEOUT_S)
        if done.returncode != 0:
            raise VipError(f"{self._describe()}: cannot list addresses: {(done.stderr or done.stdout).strip()[-300:]}")
        found = []
        for line in done.stdout.splitlines():
            words = line.split()
            for word, value in itertools.pairwise(words):
                if word == "inet":
                    addr, _, prefix = value.partition("/")
                    if addr == self.address:
                        found.append(int(prefix or 32))
        return found

    async def held(self) -> bool:
        """Whether the address is on the interface (with any prefix length)."""
        return bool(await self._prefixes())

    async def answered_elsewhere(self) -> bool:
        """Duplicate address detection: whether some other host answers ARP
        for the address on the interface's link (about 1 s when nobody does)."""
        done = await self._run(
            self._argv(self._arping, "-D", "-c", "2", "-w", "1", "-I", self.interface, self.address), DAD_TIMEOUT_S
        )
        if done.returncode == 0:
            return False
        # Exit status 1 also means a usage error: only trust it with a reply.
        received = _RECEIVED.search(done.stdout)
        if done.returncode == 1 and ((received and int(received.group(1)) > 0) or _REPLY.search(done.stdout)):
            return True
        detail = (done.stderr or done.stdout).strip()[-300:]
        raise VipError(f"{self._describe()}: duplicate address detection failed (arping exit {done.returncode}): {detail}")

    # -------------------------------------------------------------- actions

    async def acquire(self) -> None:
        """Add the address unless held, refusing when another host answers
        for it, then announce it in the background. Idempotent."""
        async with self._lock:
            already = await self.held()
            if not already:
                if await self.answered_elsewhere():
                    raise VipError(f"{self._describe()}: refusing to acquire, another host answers for {self.address}")
                argv = self._argv(self._ip, "addr", "add", self.config.address.with_prefixlen, "dev", self.interface)
                done = await self._run(argv, IP_TIMEOUT_S)
                # "File exists": added meanwhile by someone else; that is held too.
                if done.returncode != 0 and not await self.held():
                    raise VipError(f"{self._describe()}: ip addr add failed: {(done.stderr or done.stdout).strip()[-300:]}")
            await self._stop_announcing()
            if self.arp_count:
                self._announcing = asyncio.create_task(self._announce(), name=f"vip-announce-{self.address}")
            self.log.info("vip_acquired", address=self.address, interface=self.interface, already_held=already)

    async def release(self) -> None:
        """Remove the address if held (any prefix length). Idempotent."""
        async with self._lock:
            await self._stop_announcing()
            prefixes = await self._prefixes()
            for prefix in prefixes:
                argv = self._argv(self._ip, "addr", "del", f"{self.address}/{prefix}", "dev", self.interface)
                done = await self._run(argv, IP_TIMEOUT_S)
                if done.returncode != 0 and prefix in await self._prefixes():
                    raise VipError(f"{self._describe()}: ip addr del failed: {(done.stderr or done.stdout).strip()[-300:]}")
            self.log.info("vip_released", address=self.address, interface=self.interface, was_held=bool(prefixes))

    async def wait_announced(self) -> None:
        """Wait for the announcement started by the last acquire(), if any."""
        task = self._announcing
        if task is not None:
            await asyncio.wait([task])  # neither cancels it nor raises its cancellation

    async def close(self) -> None:
        """Stop a pending announcement (daemon shutdown); the address stays."""
        async with self._lock:
            await self._stop_announcing()

    # --------------------------------------------------------- announcement

    async def _stop_announcing(self) -> None:
        task, self._announcing = self._announcing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _announce(self) -> None:
        """`arp_count` unsolicited ARP requests for the address, `arp_interval_s`
        apart. iputils arping only spaces its own packets by whole seconds, so
        each request is a separate `arping -U -c 1`, which sends at once; they
        overlap while each idles out its second."""
        argv = self._argv(self._arping, "-U", "-c", "1", "-I", self.interface, self.address)
        sends: list[asyncio.Task[oscmd.Completed]] = []
        try:
            for i in range(self.arp_count):
                if i:
                    await asyncio.sleep(self.arp_interval_s)
                sends.append(asyncio.create_task(self._run(argv, ANNOUNCE_TIMEOUT_S)))
            results = await asyncio.gather(*sends, return_exceptions=True)
        finally:
            for task in sends:
                task.cancel()  # a no-op for those done; kills arping otherwise (oscmd)
            await asyncio.gather(*sends, return_exceptions=True)
        failures = [
            str(r) if isinstance(r, BaseException) else f"arping exit {r.returncode}: {(r.stderr or r.stdout).strip()[-200:]}"
            for r in results
            if isinstance(r, BaseException) or r.returncode != 0
        ]
        if failures:
            self.log.warning("vip_announce_failed", address=self.address, interface=self.interface,
                             failed=len(failures), sent=self.arp_count, error=failures[0])
        else:
            self.log.info("vip_announced", address=self.address, interface=self.interface, count=self.arp_count)
