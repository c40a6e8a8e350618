"""Integration tests run real PostgreSQL servers on 127.0.0.1.

They are skipped, with the reason printed, only when the PostgreSQL server
programs cannot be found (`pg_config --bindir` has no `postgres`). As root,
the servers run as the `postgres` OS user (PostgreSQL refuses root).
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import find_bin_dir, stop_servers_under

HERE = Path(__file__).resolve().parent
BIN_DIR = find_bin_dir()
SKIP_REASON = "PostgreSQL server programs not found (pg_config --bindir has no 'postgres')"


def pytest_report_header(config: pytest.Config) -> str:
    return f"postgresql: {BIN_DIR}" if BIN_DIR else f"postgresql: {SKIP_REASON}; integration tests skipped"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if BIN_DIR is not None:
        return
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    assert BIN_DIR is not None  # the items are skipped otherwise
    return BIN_DIR


@pytest.fixture(scope="session")
def os_user() -> str:
    """The OS user PostgreSQL runs as: `postgres` when we are root."""
    if os.geteuid() != 0:
        return getpass.getuser()
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root, but there is no 'postgres' OS user to run PostgreSQL as")
    return "postgres"


@pytest.fixture
def owner(os_user: str) -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(os_user)
    return (entry.pw_uid, entry.pw_gid)


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A directory the PostgreSQL user can enter; every server started under it
    is stopped afterwards, by PID."""
    base = Path(tempfile.mkdtemp(prefix="failoverd-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        stop_servers_under(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_cluster(base_dir, bin_dir, os_user, owner):
    """Three-member (or as asked) `failoverd run` clusters, cleaned up after the test."""
    from tests.support.cluster import LocalCluster

    made: list[LocalCluster] = []

    def make(**kw) -> LocalCluster:
        c = LocalCluster(base_dir, bin_dir, os_user, owner, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.cleanup()
