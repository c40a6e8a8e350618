"""The virtual IP: an IPv4 address that follows the primary (design §2).

`acquire()` adds the address to the configured interface and announces it
with gratuitous ARP; `release()` removes it. The supervisor calls `acquire()`
only after PostgreSQL has been seen out of recovery while the lease is valid,
and `release()` before or with fencing/demotion; the watchdog runs
`release_command()` itself when it fences.

`acquire()` returns at once and takes the address in a background task. The
supervisor awaits its actions inside its event loop's critical section, and
the new primary's heartbeats (which tell the standbys to stream from it, and
so let its first commit be acknowledged) must not wait for duplicate address
detection; the VIP comes up in parallel with that instead of before it.
`release()` cancels an acquisition still in progress and then removes the
address if it is there, so the order "release before fencing" still holds.
Failures of a background acquisition are logged (`vip_acquire_failed`) and
returned by `wait_acquired()`.

Before adding the address, the acquisition runs duplicate address detection
(`arping -D`): if another host answers ARP for it (an old primary that was
not fenced, a misconfiguration), it refuses with VipError rather than create
a split brain on the client network. Detection is short because it sits on
the failover path: `dad_probes` probes `dad_interval_s` apart, all answers
awaited until `dad_window_s` after the first (arping only counts whole
seconds, so each probe is interrupted at the end of the window, which makes
it print its summary). On a LAN an owner answers within milliseconds. The
announcement (`arping -U`, spaced unsolicited ARP requests that overwrite
neighbours' stale ARP entries) follows the addition, also in the background.

`precheck()` starts that detection early, when this node wins an election
(the core's PrepareVip), so that it overlaps the confirmation and the
promotion instead of following them. An acquisition uses a precheck that
heard nobody and finished at most `PRECHECK_MAX_AGE_S` before it (waiting
for one still running), and runs its own detection otherwise. The check
stays what it was, a guard against a misconfigured or unfenced host; the
lease is what keeps an old primary off the address (it removes it when its
lease ends, before any election).

Programs: `ip` (iproute2) and `arping` (iputils-arping), found on PATH or in
the sbin directories; `apt-get install iproute2 iputils-arping`. Privileges:
`ip addr add/del` needs CAP_NET_ADMIN and `arping` needs CAP_NET_RAW; nothing
else. A daemon running as the PostgreSQL user gets both as ambient
capabilities (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW); these
commands run with exactly those two kept (`programs.run(keep_caps=...)`), while
every PostgreSQL program gets none. As root they simply run as root. With
`netns` set, every command is prefixed with `ip netns exec NAME` (test labs),
which also needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import time
from typing import Any

import structlog

from failoverd.adapters import programs
from failoverd.config.load import VipConfig

INSTALL_HINT = "apt-get install iproute2 iputils-arping"
# What the VIP's commands need, and all they keep of our capabilities.
VIP_CAPABILITIES = ("net_admin", "net_raw")
IP_TIMEOUT_S = 5.0
# A probe is interrupted at the end of its window; this bounds a hung one.
DAD_TIMEOUT_S = 5.0
# How old a finished precheck may be and still stand for the detection.
PRECHECK_MAX_AGE_S = 1.0
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
        dad_probes: int = 2,
        dad_interval_s: float = 0.05,
        dad_window_s: float = 0.2,
    ) -> None:
        if arp_count < 0:
            raise ValueError(f"arp_count must be >= 0, not {arp_count!r}")
        if not arp_interval_s >= 0:
            raise ValueError(f"arp_interval_s must be >= 0, not {arp_interval_s!r}")
        if dad_probes < 1 or not dad_interval_s >= 0:
            raise ValueError(f"need dad_probes >= 1 and dad_interval_s >= 0, not {dad_probes!r}, {dad_interval_s!r}")
        # Every probe, the last one too, must get some time to hear an answer.
        if not (dad_probes - 1) * dad_interval_s < dad_window_s < 1.0:
            raise ValueError(f"dad_window_s must exceed the last probe's start and be under 1 s, not {dad_window_s!r}")
        self.dad_probes = dad_probes
        self.dad_interval_s = dad_interval_s
        self.dad_window_s = dad_window_s
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
        self._acquiring: asyncio.Task[None] | None = None
        self._precheck: asyncio.Task[tuple[bool, float]] | None = None
        self._announcing: asyncio.Task[None] | None = None
        self.acquire_error: str | None = None  # why the last acquisition failed, if it did

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

    async def _run(
        self, argv: list[str], timeout_s: float, interrupt_after_s: float | None = None
    ) -> programs.Completed:
        try:
            return await programs.run(
                argv,
                user=None,
                timeout_s=timeout_s,
                check=False,
                keep_caps=VIP_CAPABILITIES,
                interrupt_after_s=interrupt_after_s,
            )
        except programs.CommandFailed as error:  # could not start, or timed out
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
        for the address on the interface's link (`dad_window_s` when nobody does)."""
        # -w 1: arping's own deadline, should the interrupt be missed.
        argv = self._argv(self._arping, "-D", "-c", "1", "-w", "1", "-I", self.interface, self.address)

        async def probe(delay_s: float) -> bool:
            await asyncio.sleep(delay_s)
            done = await self._run(argv, DAD_TIMEOUT_S, interrupt_after_s=self.dad_window_s - delay_s)
            return self._dad_answered(done)

        probes = [asyncio.create_task(probe(i * self.dad_interval_s)) for i in range(self.dad_probes)]
        try:
            for finished in asyncio.as_completed(probes):
                if await finished:
                    return True
            return False
        finally:
            for task in probes:
                task.cancel()  # a no-op for those done; kills a running arping otherwise (programs.run)
            await asyncio.gather(*probes, return_exceptions=True)

    def _dad_answered(self, done: programs.Completed) -> bool:
        if done.returncode == 0:
            return False
        # Interrupted before arping set up its handler: it heard nothing.
        if done.returncode == -signal.SIGINT:
            return False
        # Exit status 1 also means a usage error: only trust it with a reply.
        received = _RECEIVED.search(done.stdout)
        if done.returncode == 1 and ((received and int(received.group(1)) > 0) or _REPLY.search(done.stdout)):
            return True
        detail = (done.stderr or done.stdout).strip()[-300:]
        raise VipError(
            f"{self._describe()}: duplicate address detection failed (arping exit {done.returncode}): {detail}"
        )

    def precheck(self) -> None:
        """Start duplicate address detection in the background, for an
        acquisition expected soon (see the module's docstring)."""
        if self._precheck is not None and not self._precheck.done():
            return
        self._precheck = asyncio.create_task(self._timed_detection(), name=f"vip-precheck-{self.address}")

    async def _timed_detection(self) -> tuple[bool, float]:
        """(whether another host answered, when the detection ended)."""
        answered = await self.answered_elsewhere()
        return answered, time.monotonic()

    async def _detect_duplicate(self) -> bool:
        """Whether another host answers for the address. A precheck that heard
        nobody at most PRECHECK_MAX_AGE_S ago stands for the detection (one
        still running is waited for); one that heard someone is not trusted
        to still be right (that host may have let go since), so a detection
        runs now, as it does without a precheck."""
        task = self._precheck
        if task is not None:
            # Still in self._precheck while we wait, so that release() can cancel it.
            await asyncio.wait([task])
            if self._precheck is task:
                self._precheck = None
            if not task.cancelled() and task.exception() is None:
                answered, ended_at = task.result()
                if not answered and time.monotonic() - ended_at <= PRECHECK_MAX_AGE_S:
                    self.log.info("vip_precheck_used", address=self.address, answered=False)
                    return False
        return await self.answered_elsewhere()

    async def _stop_precheck(self) -> None:
        task, self._precheck = self._precheck, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    # -------------------------------------------------------------- actions

    async def acquire(self) -> None:
        """Start taking the address (see the module's docstring) and return at
        once. Idempotent: an acquisition in progress goes on; a held address
        is announced again."""
        # No await, so no lock: taking it would wait for a running detection.
        if self._acquiring is None or self._acquiring.done():
            self.acquire_error = None
            self._acquiring = asyncio.create_task(self._acquire_reported(), name=f"vip-acquire-{self.address}")

    async def wait_acquired(self) -> None:
        """Wait for the acquisition started by the last acquire(); VipError if
        it failed (it was logged already)."""
        task = self._acquiring
        if task is not None:
            await asyncio.wait([task])  # neither cancels it nor raises its cancellation
        if self.acquire_error is not None:
            raise VipError(self.acquire_error)

    async def acquisition_result(self) -> str | None:
        """Wait for the acquisition started by the last acquire(): None when
        the address is ours, else why not (logged already)."""
        task = self._acquiring
        if task is not None:
            await asyncio.wait([task])  # neither cancels it nor raises its cancellation
            if task.cancelled():
                return "cancelled"
        return self.acquire_error

    async def _acquire_reported(self) -> None:
        started = time.monotonic()
        try:
            async with self._lock:
                already = await self._add()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - reported here: nobody awaits this task
            self.acquire_error = str(error)
            self.log.error(
                "vip_acquire_failed", address=self.address, interface=self.interface, error=self.acquire_error[:300]
            )
            return
        self.log.info(
            "vip_address_added",
            address=self.address,
            interface=self.interface,
            already_held=already,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _add(self) -> bool:
        """Add the address unless held, refusing when another host answers for
        it, then start announcing it. Returns whether it was held already."""
        already = await self.held()
        if not already:
            if await self._detect_duplicate():
                raise VipError(f"{self._describe()}: refusing to acquire, another host answers for {self.address}")
            argv = self._argv(self._ip, "addr", "add", self.config.address.with_prefixlen, "dev", self.interface)
            done = await self._run(argv, IP_TIMEOUT_S)
            # "File exists": added meanwhile by someone else; that is held too.
            if done.returncode != 0 and not await self.held():
                raise VipError(f"{self._describe()}: ip addr add failed: {(done.stderr or done.stdout).strip()[-300:]}")
        await self._stop_announcing()
        if self.arp_count:
            self._announcing = asyncio.create_task(self._announce(), name=f"vip-announce-{self.address}")
        return already

    async def release(self) -> None:
        """Stop an acquisition in progress, then remove the address if held
        (any prefix length). Idempotent."""
        await self._stop_acquiring()
        await self._stop_precheck()
        async with self._lock:
            await self._stop_announcing()
            prefixes = await self._prefixes()
            for prefix in prefixes:
                argv = self._argv(self._ip, "addr", "del", f"{self.address}/{prefix}", "dev", self.interface)
                done = await self._run(argv, IP_TIMEOUT_S)
                if done.returncode != 0 and prefix in await self._prefixes():
                    raise VipError(
                        f"{self._describe()}: ip addr del failed: {(done.stderr or done.stdout).strip()[-300:]}"
                    )
            self.log.info(
                "vip_address_removed", address=self.address, interface=self.interface, was_held=bool(prefixes)
            )

    async def wait_announced(self) -> None:
        """Wait for the acquisition and the announcement it started, if any."""
        task = self._acquiring
        if task is not None:
            await asyncio.wait([task])
        task = self._announcing
        if task is not None:
            await asyncio.wait([task])  # neither cancels it nor raises its cancellation

    async def close(self) -> None:
        """Stop a pending acquisition or announcement (daemon shutdown); an
        address already added stays."""
        await self._stop_acquiring()
        await self._stop_precheck()
        async with self._lock:
            await self._stop_announcing()

    async def _stop_acquiring(self) -> None:
        task, self._acquiring = self._acquiring, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
        sends: list[asyncio.Task[programs.Completed]] = []
        try:
            for i in range(self.arp_count):
                if i:
                    await asyncio.sleep(self.arp_interval_s)
                sends.append(asyncio.create_task(self._run(argv, ANNOUNCE_TIMEOUT_S)))
            results = await asyncio.gather(*sends, return_exceptions=True)
        finally:
            for task in sends:
                task.cancel()  # a no-op for those done; kills arping otherwise (programs.run)
            await asyncio.gather(*sends, return_exceptions=True)
        failures = [
            str(r)
            if isinstance(r, BaseException)
            else f"arping exit {r.returncode}: {(r.stderr or r.stdout).strip()[-200:]}"
            for r in results
            if isinstance(r, BaseException) or r.returncode != 0
        ]
        if failures:
            self.log.warning(
                "vip_announce_failed",
                address=self.address,
                interface=self.interface,
                failed=len(failures),
                sent=self.arp_count,
                error=failures[0],
            )
        else:
            self.log.info("vip_announced", address=self.address, interface=self.interface, count=self.arp_count)
