"""Telling systemd how the daemon is doing (the sd_notify protocol), without libsystemd.

Under a `Type=notify` unit systemd puts the address of a datagram socket in
$NOTIFY_SOCKET; a service reports by sending newline-separated assignments
to it: READY=1 (start-up is over), STATUS=<one line for `systemctl status`>,
WATCHDOG=1 (the keep-alive ping `WatchdogSec=` expects), RELOADING=1 and
STOPPING=1. systemd checks the sender's PID (NotifyAccess=main), so only the
daemon's own process may send.

Reporting is best effort and never the daemon's problem: with no
$NOTIFY_SOCKET (not started by systemd, a test, a terminal) every call is a
no-op, and a send that fails is logged once per run of failures, never
raised. The socket is non-blocking: a service manager that stops reading must
not be able to stall the event loop that keeps the lease.

The keep-alive ping is sent by `watchdog_pinger`, a task on the daemon's event
loop, at half the watchdog period: a loop that hangs stops pinging, and
systemd then aborts and restarts the member. That is a liveness measure only:
a frozen leader is already fenced by its lease and the fencing watchdog
process long before systemd acts.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog

# systemd reads notifications into a buffer of this size; longer ones are cut.
DATAGRAM_BYTES_MAX = 4096
STATUS_CHARS_MAX = 512
# How often a status callback is asked: a role change shows in `systemctl
# status` within this, without a datagram per tick.
STATUS_INTERVAL_S = 1.0
_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """A client of one notification socket; disabled (every call a no-op) without one."""

    def __init__(self, address: str | None, *, watchdog_interval_s: float | None = None, log: Any = None) -> None:
        self.log = log or structlog.get_logger("failoverd.runtime.sdnotify")
        self.address = address or None
        # Seconds between keep-alive pings (None: systemd expects none); see watchdog_interval().
        self.watchdog_interval_s = watchdog_interval_s
        self._target: bytes | None = None
        self._sock: socket.socket | None = None
        self._failing = False
        self.failures = 0  # sends that failed, over the notifier's life
        if self.address is None:
            return
        if self.address.startswith("/"):
            self._target = os.fsencode(self.address)
        elif self.address.startswith("@") and len(self.address) > 1:
            # Linux abstract namespace: the name is the address after a NUL byte.
            self._target = b"\0" + os.fsencode(self.address[1:])
        else:
            # e.g. "vsock:..." of newer systemd: better said at start than failing silently.
            self.log.warning("sdnotify_unsupported_socket", address=self.address[:120])

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False, log: Any = None
    ) -> Notifier:
        """The notifier $NOTIFY_SOCKET asks for, with `watchdog_interval_s` read
        from $WATCHDOG_USEC/$WATCHDOG_PID. `unset` then removes those three
        variables from `environ` (os.environ by default), so that no child
        process (the fencing watchdog, hooks) inherits them and reports in our
        name. Call it before starting any child."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"), watchdog_interval_s=watchdog_interval(env), log=log)
        if unset:
            for key in _ENVIRONMENT:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._target is not None

    # ----------------------------------------------------------- messages

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: `systemctl start` returns and WatchdogSec= starts counting."""
        return self._send("READY=1", status)

    def status(self, text: str) -> bool:
        return self._send(None, text)

    def watchdog(self, status: str | None = None) -> bool:
        return self._send("WATCHDOG=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; send `ready()` when it is over."""
        return self._send("RELOADING=1", status)

    def stopping(self, status: str | None = None) -> bool:
        """An orderly shutdown has begun (systemd shows the unit as deactivating)."""
        return self._send("STOPPING=1", status)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------ sending

    def _send(self, assignment: str | None, status: str | None) -> bool:
        """Send one datagram; True if it left. Never raises."""
        if self._target is None:
            return False
        lines = [assignment] if assignment is not None else []
        if status is not None:
            lines.append("STATUS=" + one_line(status))
        data = "\n".join(lines).encode("utf-8", "replace")[:DATAGRAM_BYTES_MAX]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            sent = self._sock.sendto(data, self._target)
            if sent != len(data):  # a datagram leaves whole or not at all; never seen, but cheap to check
                raise OSError(errno.EMSGSIZE, f"sent {sent} of {len(data)} bytes")
        except OSError as error:
            self.failures += 1
            if not self._failing:
                self._failing = True
                self.log.warning(
                    "sdnotify_send_failed",
                    address=self.address,
                    kind=lines[0].split("=")[0],
                    error=error.strerror or str(error),
                )
            return False
        if self._failing:
            self._failing = False
            self.log.info("sdnotify_send_recovered", address=self.address, failures=self.failures)
        return True


def one_line(text: str) -> str:
    """STATUS= ends at a newline: one that slipped in would start an assignment
    of its own (a status that says "\\nSTOPPING=1" must not stop anything)."""
    cleaned = "".join(" " if ch < " " or ch == "\x7f" else ch for ch in text)
    return cleaned if len(cleaned) <= STATUS_CHARS_MAX else cleaned[: STATUS_CHARS_MAX - 3] + "..."


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between keep-alive pings, or None when systemd expects none from us.

    Half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so that one
    late wake-up of the loop does not miss the deadline. $WATCHDOG_PID, when
    set, names the process the watchdog is meant for: a child that inherited
    the environment must not ping for its parent.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text.isdigit() or int(usec_text) <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text is not None:
        if not pid_text.isdigit() or int(pid_text) != (os.getpid() if pid is None else pid):
            return None
    return int(usec_text) / 2_000_000


async def watchdog_pinger(
    notifier: Notifier,
    interval_s: float | None,
    *,
    healthy: Callable[[], bool] | None = None,
    status: Callable[[], str] | None = None,
    status_interval_s: float = STATUS_INTERVAL_S,
) -> None:
    """Ping systemd's watchdog every `interval_s` for as long as the loop runs.

    Run it as a task on the daemon's own event loop: if that loop stalls, the
    pings stop. `healthy`, if given, is asked before each ping; False (or an
    exception) withholds it, so a loop that still turns but whose supervisor
    is stuck is restarted too. `status`, if given, is asked every
    `status_interval_s` (or every ping, if that is sooner) and sent as STATUS=
    whenever its text changes, with or without a watchdog. Returns at once
    when there is nothing to do: no socket, or neither a watchdog for this
    process (`interval_s` None) nor a status.
    """
    if not notifier.enabled or (interval_s is None and status is None):
        return
    for value in (interval_s, status_interval_s):
        if value is not None and not value > 0:
            raise ValueError(f"intervals must be positive, not {value!r}")
    period = min(x for x in (interval_s, status_interval_s if status is not None else None) if x is not None)
    shown: str | None = None
    withheld = False
    while True:
        text = _status_text(status, notifier)
        changed = text if text is not None and text != shown else None
        if interval_s is None:
            if changed is not None and notifier.status(changed):
                shown = changed
        else:
            try:
                problem = None if healthy is None or healthy() else "not healthy"
            except Exception as error:  # noqa: BLE001 - a failing check is a failed check
                problem = f"health check raised {error!r}"[:300]
            if problem is None:
                if notifier.watchdog(changed) and changed is not None:
                    shown = changed
                if withheld:
                    withheld = False
                    notifier.log.info("watchdog_ping_resumed")
            elif not withheld:
                withheld = True
                notifier.log.error("watchdog_ping_withheld", reason=problem)
        await asyncio.sleep(period)


def _status_text(status: Callable[[], str] | None, notifier: Notifier) -> str | None:
    # A broken status line must not cost the ping: the member is healthy.
    if status is None:
        return None
    try:
        return status()
    except Exception as error:  # noqa: BLE001 - reported, see above
        notifier.log.warning("sdnotify_status_failed", error=repr(error)[:300])
        return None


def status_line(status: Any) -> str:
    """One line for `systemctl status` from a `MemberStatus`, e.g.
    "leader, term 7; PostgreSQL primary; VIP held" or
    "follower of db1, term 7; PostgreSQL standby following db1"."""
    role = str(getattr(status.role, "value", status.role))
    who = role if role == "leader" or status.leader is None else f"{role} of {status.leader}"
    if role != "leader" and status.leader is None:
        who = f"{role}, no leader known"
    parts = [f"{who}, term {status.term}"]
    pg = status.pg
    if pg is not None:
        pg_role = getattr(pg.role, "value", pg.role)
        following = f" following {pg.following}" if getattr(pg, "following", None) else ""
        parts.append(f"PostgreSQL {pg_role}{following}")
    if status.vip_held:
        parts.append("VIP held")
    if status.paused:
        parts.append("cluster paused")
    return "; ".join(parts)
