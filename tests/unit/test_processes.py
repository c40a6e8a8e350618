"""/proc helpers used by the probe and the watchdog, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from failoverd.adapters import processes


def test_is_stopped_follows_sigstop_and_sigcont():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not processes.is_stopped(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not processes.is_stopped(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while processes.is_stopped(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    assert not processes.is_stopped(child.pid)  # gone
