"""Suite-wide fixtures."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import structlog

SWEEP_TEST = "tests/sim/test_simulator.py::test_no_violation_across_seeds"
SWEEP_KEY = pytest.StashKey[object]()


@pytest.fixture(autouse=True)
def _captured_logs():
    # structlog's default logger prints to the sys.stdout of the moment it is
    # first used; under pytest's capture that stream is closed after the test.
    # Capturing keeps every test's log events in memory instead.
    with structlog.testing.capture_logs() as logs:
        yield logs


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the simulator's seed sweep in the background if any of its
    tests will run (tests/sim/sweep.py)."""
    if session.config.option.collectonly:
        return
    shapes = [item.callspec.params["shape"] for item in session.items if item.nodeid.startswith(SWEEP_TEST)]
    if not shapes:
        return
    from tests.sim.sweep import Background
    from tests.sim.test_simulator import SEEDS

    out = Path(tempfile.mkdtemp(prefix="failoverd-sweep-")) / "results.jsonl"
    session.config.stash[SWEEP_KEY] = Background(out, {shape: len(SEEDS[shape]) for shape in shapes})


def pytest_sessionfinish(session: pytest.Session) -> None:
    sweep = session.config.stash.get(SWEEP_KEY, None)
    if sweep is not None:
        sweep.stop()
