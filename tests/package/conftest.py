"""Timing of the Debian package test (test_deb.py), printed after the run:
the test builds a package and a Debian root, so what each part cost is shown
whether the tests pass or not."""

from __future__ import annotations

import pytest

TIMINGS = pytest.StashKey[dict[str, float]]()


@pytest.fixture(scope="session")
def deb_timings(pytestconfig: pytest.Config) -> dict[str, float]:
    """Seconds per part, in the order they ran; the summary prints them."""
    return pytestconfig.stash.setdefault(TIMINGS, {})


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    timings = config.stash.get(TIMINGS, None)
    if not timings:
        return
    terminalreporter.section("Debian package test: time per part")
    # The checks (spread over the tests) last, after the parts they waited for.
    for part, seconds in sorted(timings.items(), key=lambda item: item[0] == "checks"):
        terminalreporter.line(f"{seconds:7.1f} s  {part}")
    terminalreporter.line(f"{sum(timings.values()):7.1f} s  total")
