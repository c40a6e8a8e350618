"""/proc helpers used by the probe and the watchdog, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess

from failoverd.adapters import processes
from tests.support import wait_for_sync


def test_is_stopped_follows_sigstop_and_sigcont():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not processes.is_stopped(child.pid)
        os.kill(child.pid, signal.SIGSTOP)
        # Signal delivery is asynchronous: wait until the kernel shows it.
        wait_for_sync("the child stopped", lambda: processes.is_stopped(child.pid), 5, interval_s=0.01)
        os.kill(child.pid, signal.SIGCONT)
        wait_for_sync("the child running again", lambda: not processes.is_stopped(child.pid), 5, interval_s=0.01)
    finally:
        child.kill()
        child.wait()
    assert not processes.is_stopped(child.pid)  # gone
