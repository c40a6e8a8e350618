"""Operator hooks: programs run on role changes, VIP moves and before a promotion.

Each hook is a command line from the config (`[hooks]`), split like a shell
would split it but run without a shell, as the daemon's own user, with no
capabilities (not even the VIP's), a fresh environment and the hook timeout.
What happened is passed in environment variables, never on the command line:

    FAILOVERD_HOOK       on_role_change | on_vip_change | pre_promote
    FAILOVERD_CLUSTER    cluster name
    FAILOVERD_NODE       this member
    FAILOVERD_TERM       the term the event belongs to
    FAILOVERD_ROLE       on_role_change: leader | follower | candidate | pre_candidate
    FAILOVERD_PREVIOUS_ROLE  on_role_change: the role before
    FAILOVERD_REASON     why (election, lease lost, switchover, ...)
    FAILOVERD_VIP        on_vip_change: the address, e.g. 198.18.0.10/24
    FAILOVERD_VIP_ACTION on_vip_change: acquired | released

`on_role_change` and `on_vip_change` only report: they run in the background,
one at a time and in order, and their failure is logged. `pre_promote` is a
fencing hook and decides: the promotion goes ahead only if it exits 0 within
the timeout; anything else (non-zero, timeout, cannot start) vetoes it.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

from failoverd.config.load import HooksConfig
from failoverd.runtime.ports import ProgramRunner

REPORT_QUEUE_LIMIT = 100  # events beyond this while a slow hook runs are dropped (and logged)


class HookRunner:
    def __init__(
        self, hooks: HooksConfig, *, cluster: str, node: str, vip: str | None, log: Any, run: ProgramRunner
    ) -> None:
        self.hooks = hooks
        self.run = run  # the daemon's: failoverd.adapters.programs.run, as the daemon's user, no capabilities
        self.cluster = cluster
        self.node = node
        self.vip = vip
        self.log = log
        self._reports: asyncio.Queue[tuple[str, str, dict[str, str]]] = asyncio.Queue(REPORT_QUEUE_LIMIT)
        self._worker: asyncio.Task | None = None

    def update(self, hooks: HooksConfig) -> None:
        """Apply a reloaded [hooks] table; hooks already running finish as they were."""
        self.hooks = hooks

    # ---------------------------------------------------------------- report hooks

    def role_changed(self, *, term: int, role: str, previous: str, reason: str) -> None:
        self._report(
            "on_role_change",
            term,
            {"FAILOVERD_ROLE": role, "FAILOVERD_PREVIOUS_ROLE": previous, "FAILOVERD_REASON": reason},
        )

    def vip_changed(self, *, term: int, action: str, reason: str) -> None:
        self._report(
            "on_vip_change",
            term,
            {"FAILOVERD_VIP": self.vip or "", "FAILOVERD_VIP_ACTION": action, "FAILOVERD_REASON": reason},
        )

    def _report(self, name: str, term: int, extra: dict[str, str]) -> None:
        command = getattr(self.hooks, name)
        if command is None:
            return
        env = self._env(name, term) | extra
        try:
            self._reports.put_nowait((name, command, env))
        except asyncio.QueueFull:
            self.log.error("hook_dropped", node=self.node, term=term, hook=name, reason="too many queued events")
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run_reports(), name="hooks")

    async def _run_reports(self) -> None:
        while not self._reports.empty():
            name, command, env = self._reports.get_nowait()
            await self._run(name, command, env)

    async def close(self) -> None:
        """Let queued report hooks finish, within one hook timeout, then stop."""
        worker = self._worker
        if worker is None or worker.done():
            return
        done, _ = await asyncio.wait({worker}, timeout=self.hooks.timeout_s)
        if not done:
            worker.cancel()  # the runner kills the hook's process group on cancellation
            await asyncio.wait({worker})

    # ------------------------------------------------------------------ pre_promote

    async def pre_promote(self, term: int) -> str | None:
        """None when the promotion may go ahead, else why it may not."""
        command = self.hooks.pre_promote
        if command is None:
            return None
        return await self._run("pre_promote", command, self._env("pre_promote", term))

    # ----------------------------------------------------------------------- common

    def _env(self, name: str, term: int) -> dict[str, str]:
        return {
            "FAILOVERD_HOOK": name,
            "FAILOVERD_CLUSTER": self.cluster,
            "FAILOVERD_NODE": self.node,
            "FAILOVERD_TERM": str(term),
        }

    async def _run(self, name: str, command: str, env: dict[str, str]) -> str | None:
        term = env["FAILOVERD_TERM"]
        try:
            argv = shlex.split(command)
        except ValueError as error:
            return self._failed(name, term, f"cannot parse the command: {error}")
        if not argv:
            return self._failed(name, term, "empty command")
        try:
            done = await self.run(argv, timeout_s=self.hooks.timeout_s, env=env)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - ProgramRunner: timed out, or could not start
            timed_out = getattr(error, "timed_out", False)
            why = f"timed out after {self.hooks.timeout_s} s" if timed_out else f"did not start: {error}"
            return self._failed(name, term, why)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-300:]
            return self._failed(name, term, f"exited {done.returncode}" + (f": {tail}" if tail else ""))
        self.log.info("hook_done", node=self.node, term=int(term), hook=name)
        return None

    def _failed(self, name: str, term: str, why: str) -> str:
        self.log.error("hook_failed", node=self.node, term=int(term), hook=name, error=why)
        return f"{name} hook {why}"
