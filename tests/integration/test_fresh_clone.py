"""A new user's checkout in a directory only root may enter (`cd ~ && git
clone ... && make test`, with /root at mode 0700).

Every test that runs code as another user (the systemd unit's credentials,
PostgreSQL's OS user, the supervisors started as `postgres`) must work from
there: the other user can read neither the checkout nor its virtualenv, so
whatever it runs has to come from somewhere it can read (the runtime bundle,
tests/support/cluster.py). This test copies the working tree into a fresh
0700 directory, gives it a virtualenv of its own there (the system
interpreter, seeing this environment's installed libraries but not this
checkout), and runs a selection of those tests in it, which must all pass
and none be skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sysconfig
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import system_python

REPO = Path(__file__).resolve().parents[2]

# Tests that switch users, one or a few of each kind (the whole of them would
# double the suite's time): the unit's credentials moving a VIP, a daemon
# managing PostgreSQL as `postgres`, a cluster of supervisors running as
# `postgres` through a failover, and the VIP adapter as `postgres`.
SELECTED = (
    "tests/unit/test_deploy.py::test_unit_capabilities_let_the_daemon_move_the_vip",
    "tests/unit/test_deploy.py::test_vip_adapter_works_under_the_unit_credentials",
    "tests/daemon/test_daemon_signals.py::test_sighup_applies_logging_and_hooks_and_reports_what_needs_a_restart",
    "tests/integration/test_cluster.py::test_postmaster_killed_new_primary_and_old_rejoins",
    "tests/integration/test_vip.py::test_vip_as_postgres_user_with_ambient_capabilities",
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the point is a checkout another user cannot enter"),
    pytest.mark.timeout(600),
]


@pytest.fixture
def private_checkout() -> Iterator[Path]:
    """A copy of the working tree (tracked and new files, as git sees them)
    in a fresh directory of mode 0700, with a virtualenv inside it."""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' OS user")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout and git")
    base = Path(tempfile.mkdtemp(prefix="failoverd-private-"))  # mode 0700
    try:
        checkout = base / "checkout"
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        for name in filter(None, (entry.decode() for entry in listed)):
            source = REPO / name
            if source.is_file():
                target = checkout / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        venv = checkout / ".venv"
        subprocess.run([system_python(), "-m", "venv", "--without-pip", str(venv)], check=True)
        # This environment's libraries, and the copy as the editable install
        # would add it; not this checkout.
        site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        (site / "failoverd-private.pth").write_text(f"{checkout}\n{sysconfig.get_path('purelib')}\n")
        yield checkout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_tests_that_switch_users_pass_from_a_checkout_only_root_can_enter(
    private_checkout: Path, tmp_path: Path
) -> None:
    # The premise: the user PostgreSQL runs as cannot read the checkout.
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "test",
            "-r",
            str(private_checkout / "pyproject.toml"),
        ],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode != 0, "the postgres user can read a 0700 directory: the test would prove nothing"

    report = tmp_path / "report.xml"
    python = private_checkout / ".venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *SELECTED],
        cwd=private_checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=570,
    )
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-60:])
    assert done.returncode == 0, tail
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = "skipped" if "skipped" in kinds else ("failed" if kinds & {"failure", "error"} else "passed")
    assert outcomes == {name: "passed" for name in SELECTED}, tail
