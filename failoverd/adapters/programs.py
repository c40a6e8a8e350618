"""Running external programs, optionally as another OS user, with a hard timeout.

PostgreSQL's programs refuse to run as root, so a daemon running as root runs
them as the cluster's OS user through `setpriv`. The environment is rebuilt
from scratch for that user (what `setpriv --reset-env` would give) so that
nothing of root's environment leaks into the child; `env` adds to it. Values
that must stay secret (passwords) never go on a command line: pass them in
`env` or, better, in a file the child reads.

Every child runs in a session of its own, so a timeout or a cancellation can
kill it together with everything it started (`os.killpg`), and a terminal's
Ctrl-C does not reach it.

Capabilities. A daemon running as the PostgreSQL user gets CAP_NET_ADMIN and
CAP_NET_RAW from systemd as *ambient* capabilities (AmbientCapabilities=),
which every child would inherit. Children get none of them unless the caller
names them in `keep_caps`: the VIP's `ip addr` and `arping` keep exactly those
two, while PostgreSQL's programs (and whatever its superusers run from the
server) get nothing. Dropping is done by `setpriv --inh-caps --ambient-caps`
in front of the program, and only when we hold something to drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pwd
import signal
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

SETPRIV = "/usr/bin/setpriv"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
OUTPUT_LIMIT_BYTES = 1 << 20  # per stream; a runaway child must not fill our memory
STDERR_TAIL_CHARS = 2000
_REAP_TIMEOUT_S = 5.0

# Linux capability numbers (linux/capability.h), by setpriv's names.
CAPABILITY_BITS = {
    name: bit
    for bit, name in enumerate(
        (
            "chown",
            "dac_override",
            "dac_read_search",
            "fowner",
            "fsetid",
            "kill",
            "setgid",
            "setuid",
            "setpcap",
            "linux_immutable",
            "net_bind_service",
            "net_broadcast",
            "net_admin",
            "net_raw",
            "ipc_lock",
            "ipc_owner",
            "sys_module",
            "sys_rawio",
            "sys_chroot",
            "sys_ptrace",
            "sys_pacct",
            "sys_admin",
            "sys_boot",
            "sys_nice",
            "sys_resource",
            "sys_time",
            "sys_tty_config",
            "mknod",
            "lease",
            "audit_write",
            "audit_control",
            "setfcap",
            "mac_override",
            "mac_admin",
            "syslog",
            "wake_alarm",
            "block_suspend",
            "audit_read",
            "perfmon",
            "bpf",
            "checkpoint_restore",
        )
    )
}


@dataclasses.dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


class CommandFailed(Exception):
    """A program exited with a non-zero status, could not be started, or ran
    out of time (`returncode` None, `timed_out` True)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, *, timed_out: bool = False) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr[-STDERR_TAIL_CHARS:].strip()
        self.timed_out = timed_out
        if timed_out:
            what = "timed out"
        elif returncode is None:
            what = "could not be started"
        else:
            what = f"exited with status {returncode}"
        detail = f": {self.stderr_tail}" if self.stderr_tail else ""
        super().__init__(f"{Path(self.argv[0]).name} {what}{detail}")


@dataclasses.dataclass(frozen=True, slots=True)
class OsUser:
    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @classmethod
    def lookup(cls, name: str) -> OsUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise LookupError(f"OS user {name!r} does not exist") from None
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell or "/bin/sh")


def command_for(
    argv: Sequence[str], user: str | None, keep_caps: Collection[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """The argv to execute and the base environment for running `argv` as `user`.

    Capabilities never pass to a child run as another user: a uid change from
    root clears them. When we keep our uid, the child inherits our ambient
    capabilities, so all of them are dropped except those named in
    `keep_caps` (lower-case names without "cap_", e.g. "net_admin"), which
    stay ambient if we hold them ambient; naming one we do not hold grants
    nothing."""
    if not argv:
        raise ValueError("empty command")
    keep_mask = capability_mask(keep_caps)
    who = None if user is None else OsUser.lookup(user)
    if who is None or who.uid == os.geteuid():
        return _cap_prefix(keep_mask) + list(argv), _base_env(who)
    if keep_mask:
        raise ValueError(f"keep_caps only applies to programs run as ourselves, not as {user!r}")
    if os.geteuid() != 0:
        raise PermissionError(f"running as uid {os.geteuid()}, cannot run programs as {user!r}")
    prefix = [SETPRIV, f"--reuid={who.uid}", f"--regid={who.gid}", "--init-groups", "--"]
    return prefix + list(argv), _base_env(who)


def capability_mask(names: Collection[str]) -> int:
    mask = 0
    for name in names:
        bit = CAPABILITY_BITS.get(name)
        if bit is None:
            raise ValueError(f"unknown capability {name!r} (write e.g. 'net_admin')")
        mask |= 1 << bit
    return mask


def own_capabilities() -> dict[str, int]:
    """Our capability sets from /proc/self/status: {"CapInh": mask, "CapAmb": mask, ...}."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    return {
        key: int(value, 16)
        for key, _, value in (line.partition(":\t") for line in status.splitlines() if line.startswith("Cap"))
    }


def _cap_prefix(keep_mask: int) -> list[str]:
    """setpriv arguments that leave the child exactly `keep_mask` (within what
    we hold ambient) as ambient and inheritable capabilities, or nothing when
    the child would get exactly that anyway."""
    caps = own_capabilities()
    ambient = caps.get("CapAmb", 0)
    keep = keep_mask & ambient
    # Extra inheritable bits matter too: a program with file-inheritable
    # capabilities would gain them.
    if (ambient | caps.get("CapInh", 0)) & ~keep == 0:
        return []
    names = "".join(f",+{name}" for name, bit in CAPABILITY_BITS.items() if keep >> bit & 1)
    return [SETPRIV, f"--inh-caps=-all{names}", f"--ambient-caps=-all{names}", "--"]


def _base_env(who: OsUser | None) -> dict[str, str]:
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if who is None:
        for key in ("HOME", "USER", "LOGNAME", "TZ"):
            if key in os.environ:
                env[key] = os.environ[key]
    else:
        env.update(HOME=who.home, USER=who.name, LOGNAME=who.name, SHELL=who.shell)
    return env


async def run(
    argv: Sequence[str],
    *,
    user: str | None,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: bytes | None = None,
    check: bool = True,
    keep_caps: Collection[str] = (),
    interrupt_after_s: float | None = None,
) -> Completed:
    """Run `argv` (as `user`, or as ourselves when None) and wait at most
    `timeout_s`. Raises CommandFailed on a non-zero exit when `check`, and
    always on a timeout; the child's whole process group is killed then, and
    also when the caller is cancelled.

    `keep_caps`: see `command_for`. `interrupt_after_s`: send the child (the
    program itself: `setpriv` and `ip netns exec` exec it in place) SIGINT
    after that long and keep waiting for it to report and exit, for programs
    such as `arping` that only take whole seconds but summarise on SIGINT."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
    if interrupt_after_s is not None and not 0 < interrupt_after_s < timeout_s:
        raise ValueError(f"interrupt_after_s must be within 0..timeout_s, not {interrupt_after_s!r}")
    full_argv, full_env = command_for(argv, user, keep_caps)
    full_env.update(env or {})
    try:
        proc = await asyncio.create_subprocess_exec(
            *full_argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as error:
        raise CommandFailed(argv, None, str(error)) from error
    interrupter = None
    if interrupt_after_s is not None:
        interrupter = asyncio.get_running_loop().call_later(interrupt_after_s, _interrupt, proc)
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await _communicate(proc, stdin)
    except TimeoutError:
        await _kill_group(proc)
        raise CommandFailed(argv, None, "", timed_out=True) from None
    except BaseException:  # cancelled: the child must not outlive the request
        await _kill_group(proc)
        raise
    finally:
        if interrupter is not None:
            interrupter.cancel()
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    returncode = proc.returncode if proc.returncode is not None else -1
    if check and returncode != 0:
        raise CommandFailed(argv, returncode, stderr or stdout)
    return Completed(returncode, stdout, stderr)


async def _communicate(proc: asyncio.subprocess.Process, stdin: bytes | None) -> tuple[bytes, bytes]:
    if stdin is not None and proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        proc.stdin.close()
    out, err = await asyncio.gather(_read_limited(proc.stdout), _read_limited(proc.stderr))
    await proc.wait()
    return out, err


async def _read_limited(stream: asyncio.StreamReader | None) -> bytes:
    """Read to EOF, keeping only the last OUTPUT_LIMIT_BYTES (errors come last)."""
    if stream is None:
        return b""
    data = bytearray()
    while chunk := await stream.read(65536):
        data += chunk
        if len(data) > OUTPUT_LIMIT_BYTES:
            del data[: len(data) - OUTPUT_LIMIT_BYTES]
    return bytes(data)


def _interrupt(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The child leads its own session, so its pid is also its process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_REAP_TIMEOUT_S):
            await proc.wait()
