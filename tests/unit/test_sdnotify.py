"""The sd_notify client against real datagram sockets the tests own: what
systemd would receive, byte for byte, and from which process."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from failoverd.core.state import PgObservation, PgRole, Role, StateStamp
from failoverd.core.status import MemberStatus
from failoverd.runtime.sdnotify import Notifier, one_line, status_line, watchdog_interval, watchdog_pinger


class Manager:
    """The service manager's end: a bound datagram socket that records the
    sender's PID of every message, as systemd does for NotifyAccess=main."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout_s: float = 2.0) -> tuple[bytes, int]:
        self.sock.settimeout(timeout_s)
        data, ancillary, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(struct.calcsize("3i")))
        pids = [
            struct.unpack("3i", payload)[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert len(pids) == 1
        return data, pids[0]

    def pending(self) -> list[bytes]:
        self.sock.setblocking(False)
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 107 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[tuple[Manager, str]]:
    path = str(short_dir / "notify")
    m = Manager(path)
    yield m, path
    m.close()


def test_each_message_is_one_exact_datagram_from_this_process(manager: tuple[Manager, str]) -> None:
    m, path = manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready() is True
    assert notifier.status("follower of db1, term 3") is True
    assert notifier.watchdog() is True
    assert notifier.reloading() is True
    assert notifier.stopping("handing over") is True
    assert notifier.ready("leader, term 4") is True
    received = [m.receive() for _ in range(6)]
    notifier.close()
    assert [data for data, _ in received] == [
        b"READY=1",
        b"STATUS=follower of db1, term 3",
        b"WATCHDOG=1",
        b"RELOADING=1",
        b"STOPPING=1\nSTATUS=handing over",
        b"READY=1\nSTATUS=leader, term 4",
    ]
    assert {pid for _, pid in received} == {os.getpid()}
    assert m.pending() == []


def test_abstract_namespace_socket() -> None:
    name = f"failoverd-test-{os.getpid()}-{time.monotonic_ns()}"
    m = Manager(b"\0" + name.encode())
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.watchdog() is True
        assert m.receive() == (b"WATCHDOG=1", os.getpid())
        notifier.close()
    finally:
        m.close()


def test_a_status_cannot_smuggle_another_assignment(manager: tuple[Manager, str]) -> None:
    m, path = manager
    notifier = Notifier(path)
    notifier.status("evil\nSTOPPING=1\r\x00tail")
    assert m.receive()[0] == b"STATUS=evil STOPPING=1  tail"
    notifier.status("x" * 5000)
    data = m.receive()[0]
    assert data == b"STATUS=" + b"x" * 509 + b"..."
    assert one_line("a\tb") == "a b"
    notifier.close()


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    with structlog.testing.capture_logs() as logs:
        notifier = Notifier.from_environment({})
        assert not notifier.enabled
        assert notifier.ready("x") is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
        notifier.close()
    assert logs == []
    assert notifier._sock is None  # no socket is even opened


@pytest.mark.parametrize("address", ["relative/path", "@", "vsock:2:1234"])
def test_unsupported_address_is_said_once_and_disables(address: str) -> None:
    with structlog.testing.capture_logs() as logs:
        notifier = Notifier(address)
        assert not notifier.enabled
        assert notifier.ready() is False
    assert [entry["event"] for entry in logs] == ["sdnotify_unsupported_socket"]


def test_send_failure_is_logged_once_per_run_and_never_raised(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    with structlog.testing.capture_logs() as logs:
        notifier = Notifier(path)  # nobody listens there yet
        assert [notifier.watchdog() for _ in range(5)] == [False] * 5
        assert notifier.failures == 5
        m = Manager(path)
        try:
            assert notifier.watchdog() is True
            assert m.receive()[0] == b"WATCHDOG=1"
        finally:
            m.close()
        os.unlink(path)
        assert notifier.watchdog() is False
        notifier.close()
    events = [(entry["event"], entry.get("kind")) for entry in logs]
    assert events == [
        ("sdnotify_send_failed", "WATCHDOG"),
        ("sdnotify_send_recovered", None),
        ("sdnotify_send_failed", "WATCHDOG"),
    ]
    assert logs[0]["error"] in ("No such file or directory", "Connection refused")


def test_a_manager_that_stops_reading_never_blocks_the_sender(manager: tuple[Manager, str]) -> None:
    m, path = manager
    notifier = Notifier(path)
    results = [notifier.watchdog() for _ in range(5000)]  # far beyond net.unix.max_dgram_qlen
    assert results[0] is True
    assert results[-1] is False  # EAGAIN, not a blocked loop
    assert len(m.pending()) == results.count(True)
    assert notifier.watchdog() is True  # drained: sends again
    notifier.close()


def test_from_environment_unset_hides_the_socket_from_children(manager: tuple[Manager, str]) -> None:
    m, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = Notifier.from_environment(env, unset=True)
    assert env == {"PATH": "/bin"}
    assert notifier.watchdog_interval_s == 5.0  # read before the variables went
    assert Notifier.from_environment(env).watchdog_interval_s is None
    assert notifier.ready() is True  # the notifier itself still knows where to send
    assert m.receive()[0] == b"READY=1"
    notifier.close()


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 42, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "42"}, 42, 5.0),
        ({"WATCHDOG_USEC": "3000", "WATCHDOG_PID": "42"}, 42, 0.0015),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "43"}, 42, None),  # meant for another process
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "x"}, 42, None),
        ({"WATCHDOG_USEC": "0"}, 42, None),
        ({"WATCHDOG_USEC": "-5"}, 42, None),
        ({"WATCHDOG_USEC": "10s"}, 42, None),
        ({"WATCHDOG_USEC": ""}, 42, None),
        ({}, 42, None),
        ({"WATCHDOG_PID": "42"}, 42, None),
    ],
)
def test_watchdog_interval_is_half_the_period_for_this_process_only(
    env: dict, pid: int, expected: float | None
) -> None:
    assert watchdog_interval(env, pid) == expected


def test_watchdog_interval_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


class Recorder(threading.Thread):
    """Reads the manager's socket from another thread, stamping each arrival,
    so a stalled event loop in the test cannot delay the stamps."""

    def __init__(self, m: Manager) -> None:
        super().__init__(daemon=True)
        self.m = m
        self.arrivals: list[tuple[float, bytes]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        self.m.sock.settimeout(0.02)
        while not self.stop.is_set():
            try:
                data = self.m.sock.recv(65536)
            except TimeoutError:
                continue
            self.arrivals.append((time.monotonic(), data))


async def test_pinger_pings_until_the_loop_stalls(manager: tuple[Manager, str]) -> None:
    m, path = manager
    recorder = Recorder(m)
    recorder.start()
    notifier = Notifier(path)
    task = asyncio.create_task(watchdog_pinger(notifier, 0.05))
    try:
        await asyncio.sleep(0.5)
        stalled_at = time.monotonic()
        time.sleep(0.5)  # noqa: ASYNC251 - a hung event loop: nothing on it runs
        resumed_at = time.monotonic()
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        recorder.stop.set()
        recorder.join()
        notifier.close()
    assert {data for _, data in recorder.arrivals} == {b"WATCHDOG=1"}
    before = [t for t, _ in recorder.arrivals if t < stalled_at]
    during = [t for t, _ in recorder.arrivals if stalled_at + 0.01 < t < resumed_at]
    after = [t for t, _ in recorder.arrivals if t >= resumed_at]
    assert len(before) >= 3  # ~10 at 0.05 s; a loaded machine gets fewer
    assert during == []
    assert len(after) >= 1


async def test_pinger_withholds_pings_while_unhealthy_and_sends_status_changes(manager: tuple[Manager, str]) -> None:
    m, path = manager
    recorder = Recorder(m)  # reads at once: this host's net.unix.max_dgram_qlen may be as low as 10
    recorder.start()
    state = {"healthy": True, "status": "follower, no leader known, term 1"}

    def healthy() -> bool:
        if state["healthy"] == "raise":
            raise RuntimeError("boom")
        return bool(state["healthy"])

    marks: dict[str, float] = {}
    notifier = Notifier(path)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(watchdog_pinger(notifier, 0.02, healthy=healthy, status=lambda: state["status"]))
        try:
            await asyncio.sleep(0.15)
            state["status"] = "leader, term 2"
            await asyncio.sleep(0.15)
            state["healthy"] = False
            marks["unhealthy"] = time.monotonic()
            await asyncio.sleep(0.2)
            state["healthy"] = "raise"
            await asyncio.sleep(0.2)
            marks["healthy"] = time.monotonic()
            state["healthy"] = True
            await asyncio.sleep(0.15)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            recorder.stop.set()
            recorder.join()
            notifier.close()
    first = [d for t, d in recorder.arrivals if t < marks["unhealthy"]]
    # A ping may have been on its way as the flag flipped; after that, none.
    withheld = [d for t, d in recorder.arrivals if marks["unhealthy"] + 0.01 < t < marks["healthy"]]
    resumed = [d for t, d in recorder.arrivals if t >= marks["healthy"]]
    assert first[0] == b"WATCHDOG=1\nSTATUS=follower, no leader known, term 1"
    assert first.count(b"WATCHDOG=1\nSTATUS=leader, term 2") == 1
    assert set(first) == {
        b"WATCHDOG=1\nSTATUS=follower, no leader known, term 1",
        b"WATCHDOG=1",
        b"WATCHDOG=1\nSTATUS=leader, term 2",
    }
    assert withheld == []
    assert resumed and set(resumed) == {b"WATCHDOG=1"}  # the status did not change meanwhile
    assert [entry["event"] for entry in logs] == ["watchdog_ping_withheld", "watchdog_ping_resumed"]
    assert logs[0]["reason"] == "not healthy"


async def test_without_watchdog_status_changes_are_still_reported(manager: tuple[Manager, str]) -> None:
    m, path = manager
    recorder = Recorder(m)
    recorder.start()
    state = {"status": "follower, no leader known, term 1"}
    notifier = Notifier(path)
    task = asyncio.create_task(watchdog_pinger(notifier, None, status=lambda: state["status"], status_interval_s=0.02))
    try:
        await asyncio.sleep(0.15)
        state["status"] = "follower of db1, term 2"
        await asyncio.sleep(0.15)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        recorder.stop.set()
        recorder.join()
        notifier.close()
    assert [data for _, data in recorder.arrivals] == [
        b"STATUS=follower, no leader known, term 1",
        b"STATUS=follower of db1, term 2",
    ]


async def test_pinger_returns_at_once_without_socket_or_watchdog(manager: tuple[Manager, str]) -> None:
    _m, path = manager
    await asyncio.wait_for(watchdog_pinger(Notifier(None), 0.01), 1.0)
    await asyncio.wait_for(watchdog_pinger(Notifier(path), None), 1.0)
    await asyncio.wait_for(watchdog_pinger(Notifier(None), 0.01, status=lambda: "x"), 1.0)
    with pytest.raises(ValueError):
        await watchdog_pinger(Notifier(path), 0.0)
    with pytest.raises(ValueError):
        await watchdog_pinger(Notifier(path), None, status=lambda: "x", status_interval_s=0)


def _member(
    name: str,
    role: Role,
    term: int,
    leader: str | None,
    pg: PgObservation | None,
    *,
    vip_held: bool = False,
    paused: bool = False,
) -> MemberStatus:
    return MemberStatus(
        name=name,
        role=role,
        term=term,
        leader=leader,
        leader_live=leader is not None,
        pg=pg,
        pg_age_s=None,
        lease_remaining_s=0.5 if role is Role.LEADER else None,
        promise_s=1.0,
        primary_ready=role is Role.LEADER,
        vip_held=vip_held,
        vip_error=None,
        paused=paused,
        primary_position=None,
        switchover_to=None,
        switchover_at=None,
        state_stamp=StateStamp(term, 1),
        history=(),
        rebuild=None,
        last_failover=None,
    )


def test_status_line() -> None:
    leader = _member("db1", Role.LEADER, 7, "db1", PgObservation(PgRole.PRIMARY, 1.0), vip_held=True)
    assert status_line(leader) == "leader, term 7; PostgreSQL primary; VIP held"
    follower = _member("db2", Role.FOLLOWER, 7, "db1", PgObservation(PgRole.STANDBY, 1.0, following="db1"), paused=True)
    assert status_line(follower) == "follower of db1, term 7; PostgreSQL standby following db1; cluster paused"
    alone = _member("w1", Role.PRE_CANDIDATE, 3, None, None)
    assert status_line(alone) == "pre_candidate, no leader known, term 3"
