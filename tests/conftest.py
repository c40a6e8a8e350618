"""Suite-wide fixtures."""

from __future__ import annotations

import pytest
import structlog


@pytest.fixture(autouse=True)
def _captured_logs():
    # structlog's default logger prints to the sys.stdout of the moment it is
    # first used; under pytest's capture that stream is closed after the test.
    # Capturing keeps every test's log events in memory instead.
    with structlog.testing.capture_logs() as logs:
        yield logs
