"""A running `failoverd run`: SIGHUP reload and the sd_notify conversation with
a socket the test owns, on a witness daemon (no PostgreSQL needed)."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from daemon_fixture import RunningWitness, start_witness, stop_witness

from tests.support import wait_for_sync


def event_names(w: RunningWitness) -> list[str]:
    return [e.get("event") for e in w.events()]


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def receive_all(sock: socket.socket, until: str, timeout_s: float = 15.0) -> list[str]:
    """Every datagram received until one contains `until`."""
    got: list[str] = []

    def arrived() -> list[str] | None:
        try:
            got.append(sock.recv(4096).decode())  # waits up to the socket's timeout (0.2 s)
        except TimeoutError:
            return None
        return got if any(until in g for g in got) else None

    return wait_for_sync(
        f"{until!r} on the notify socket", arrived, timeout_s, interval_s=0, detail=lambda: f"got {got}"
    )


def test_sd_notify_ready_status_watchdog_and_stopping(tmp_path, notify_socket):
    sock, path = notify_socket
    w = start_witness(tmp_path, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    try:
        got = receive_all(sock, "READY=1")
        ready = next(g for g in got if "READY=1" in g)
        assert "STATUS=" in ready and "term" in ready
        got = receive_all(sock, "WATCHDOG=1", timeout_s=5)  # every 0.5 s with a 1 s watchdog
        w.proc.send_signal(signal.SIGTERM)
        got = receive_all(sock, "STOPPING=1")
        assert w.proc.wait(timeout=15) == 0
    finally:
        stop_witness(w)


def reload(w, outcome: str) -> dict:
    """SIGHUP the daemon; its first `outcome` event (config_reloaded or config_reload_failed)."""
    os.kill(w.proc.pid, signal.SIGHUP)
    return wait_for_sync(outcome, lambda: next((e for e in w.events() if e.get("event") == outcome), None), 10)


def test_sighup_applies_logging_and_hooks_and_reports_what_needs_a_restart(tmp_path):
    w = start_witness(tmp_path)
    try:
        text = w.config_path.read_text()
        text = text.replace('[logging]\nformat = "json"', '[logging]\nformat = "json"\nlevel = "debug"')
        text = text.replace("[api]\n", '[hooks]\non_role_change = "/bin/true"\n\n[api]\n', 1)
        w.config_path.write_text(text)
        event = reload(w, "config_reloaded")
        assert sorted(event["applied"]) == ["hooks", "logging"] and event["needs_restart"] == []
        assert w.alive()
    finally:
        stop_witness(w)


def test_sighup_with_a_broken_file_changes_nothing_and_keeps_running(tmp_path):
    w = start_witness(tmp_path)
    try:
        good = w.config_path.read_text()
        w.config_path.write_text(good.replace("[cluster]", "[cluster]\nbogus_key = 1", 1))
        event = reload(w, "config_reload_failed")
        assert any("bogus_key" in p for p in event["problems"])
        time.sleep(0.3)
        assert w.alive()
        # A later, valid change that needs a restart is reported, not applied.
        w.config_path.write_text(good.replace("[api]\n", "[api]\nhealth_auth = true\n", 1))
        event = reload(w, "config_reloaded")
        assert event["applied"] == [] and "api" in event["needs_restart"]
    finally:
        stop_witness(w)
