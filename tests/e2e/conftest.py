"""The end-to-end lab (tests/support/e2e/lab.py) needs root, `ip netns`, nft,
tc and PostgreSQL.

Where any of that is missing the whole directory is skipped, with the reason
printed in the report header and in pytest's skip summary. The results of
every run are printed at the end of the session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.e2e.lab import lab_unsupported_reason
from tests.support.e2e.scenarios import REPORT

HERE = Path(__file__).resolve().parent

REASON = lab_unsupported_reason()


def pytest_report_header(config: pytest.Config) -> str:
    return "e2e lab: namespaces available" if REASON is None else f"e2e lab: skipped: {REASON}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REASON is None:
        return
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=f"e2e lab unavailable: {REASON}"))


def pytest_terminal_summary(terminalreporter) -> None:
    if REPORT:
        terminalreporter.write_sep("-", "e2e lab runs")
        for line in REPORT:
            terminalreporter.write_line(line)
