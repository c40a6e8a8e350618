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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pwd
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

SETPRIV = "/usr/bin/setpriv"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
OUTPUT_LIMIT_BYTES = 1 << 20  # per stream; a runaway child must not fill our memory
STDERR_TAIL_CHARS = 2000
_REAP_TIMEOUT_S = 5.0


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


def command_for(argv: Sequence[str], user: str | None) -> tuple[list[str], dict[str, str]]:
    """The argv to execute and the base environment for running `argv` as `user`.

    Capabilities never pass to the child: a uid change from root clears them,
    and when we keep our uid but hold ambient capabilities (the VIP's
    CAP_NET_ADMIN, granted by the systemd unit) they are dropped explicitly,
    so that PostgreSQL, and whatever its superusers run, has none of them."""
    if not argv:
        raise ValueError("empty command")
    who = None if user is None else OsUser.lookup(user)
    if who is None or who.uid == os.geteuid():
        prefix = [SETPRIV, "--ambient-caps=-all", "--inh-caps=-all", "--"] if _holds_ambient_caps() else []
        return prefix + list(argv), _base_env(who)
    if os.geteuid() != 0:
        raise PermissionError(f"running as uid {os.geteuid()}, cannot run programs as {user!r}")
    prefix = [SETPRIV, f"--reuid={who.uid}", f"--regid={who.gid}", "--init-groups", "--"]
    return prefix + list(argv), _base_env(who)


def _holds_ambient_caps() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapAmb:"):
            return int(line.split()[1], 16) != 0
    return False


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
) -> Completed:
    """Run `argv` (as `user`, or as ourselves when None) and wait at most
    `timeout_s`. Raises CommandFailed on a non-zero exit when `check`, and
    always on a timeout; the child's whole process group is killed then, and
    also when the caller is cancelled."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
    full_argv, full_env = command_for(argv, user)
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
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await _communicate(proc, stdin)
    except TimeoutError:
        await _kill_group(proc)
        raise CommandFailed(argv, None, "", timed_out=True) from None
    except BaseException:  # cancelled: the child must not outlive the request
        await _kill_group(proc)
        raise
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


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The child leads its own session, so its pid is also its process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_REAP_TIMEOUT_S):
            await proc.wait()
