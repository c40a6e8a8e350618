"""`failoverd check-config`: a summary and exit 0, or problem lines and exit 1."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from failoverd.cli import failoverd_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUORUM = CONFIGS / "three-nodes-quorum.toml"


def check(*args: str | Path) -> Result:
    return CliRunner().invoke(failoverd_main, ["check-config", *map(str, args)])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "failoverd.toml"
    path.write_text(text)
    return path


def five_data_members(sync_count: int) -> str:
    nodes = "".join(
        f'[[nodes]]\nname = "db{i}"\npeer = "198.18.0.1{i}:7400"\n[nodes.postgres]\ndata_dir = "/pg"\n'
        for i in range(1, 6)
    )
    return f'[cluster]\nname = "big"\nsecret_file = "/s"\n[replication]\nsync_count = {sync_count}\n{nodes}'


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_examples_pass(path: Path) -> None:
    result = check(path, "--node", "db1")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert f"({path})" in result.stdout
    [db1_row] = [line for line in result.stdout.splitlines() if line.startswith("  db1 ")]
    assert db1_row.endswith("yes")  # the local column


def test_quorum_summary() -> None:
    out = check(QUORUM, "--node", "db2").stdout
    assert "cluster      main (" in out
    assert "members      3 (3 data, 0 witness); a majority is 2" in out
    assert "  name  kind  peer              postgres          priority  nofailover  local" in out
    assert "  db3   data  198.18.0.13:7400  198.18.0.13:5432  50        no\n" in out
    assert (
        "replication  quorum mode, ANY 1: every commit on 2 of 3 data members; survives the loss of 1 member\n" in out
    )
    assert "lease 0.8 s" in out and "safe lease bound 0.9307 s" in out
    assert "vip          198.18.0.100/24 on eth0" in out


def test_witness_summary_says_what_stops_writes() -> None:
    out = check(CONFIGS / "two-nodes-witness.toml", "--node", "db1").stdout
    assert "  witness1  witness  198.18.0.20:7400  -" in out
    assert "survives the loss of witness1 only; losing db1 or db2 stops writes until it returns" in out


def test_async_summary() -> None:
    out = check(CONFIGS / "async.toml", "--node", "db3").stdout
    assert "async mode: a failover may lose up to 1048576 bytes of WAL; survives the loss of 1 member" in out
    assert "vip          none" in out


@pytest.mark.parametrize(
    ("sync_count", "survives"),
    [(1, "survives the loss of 1 member"), (2, "survives the loss of 2 members"), (4, "cannot lose any member")],
)
def test_survival_follows_quorum_intersection(tmp_path: Path, sync_count: int, survives: str) -> None:
    # k=1 of 5: a new primary needs 4 data members to vouch, so 2 losses stop it.
    result = check(write(tmp_path, five_data_members(sync_count)), "--node", "db1")
    assert result.exit_code == 0, result.output
    assert survives in result.stdout


def test_without_node_and_no_matching_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    result = check(QUORUM)
    assert result.exit_code == 0
    assert "local        none: no --node given" in result.stdout


def test_broken_file_lists_every_problem(tmp_path: Path) -> None:
    text = QUORUM.read_text().replace("lease_s = 0.8", 'lease_s = "fast"').replace("priority = 50", "priorty = 50")
    path = write(tmp_path, text.replace('peer = "198.18.0.13:7400"', 'peer = "db3:80x"'))
    result = check(path, "--node", "db1")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f'{path}: timing.lease_s: "fast" is not a number',
        f'{path}: nodes[2].peer: "db3:80x" is not host:port (port "80x" is not a number 1..65535)',
        f'{path}: nodes[2].priorty: unknown key (did you mean "priority"?)',
    ]


def test_unknown_node() -> None:
    result = check(QUORUM, "--node", "db9")
    assert result.exit_code == 1
    assert result.stderr == f"{QUORUM}: --node db9: not a member (members: db1, db2, db3)\n"


def test_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[cluster]\nname = "main\n')
    result = check(path)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}: line 2, column 13: invalid TOML: Illegal character")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = check(path)
    assert result.exit_code == 1
    assert result.stderr == f"{path}: cannot read the configuration file: No such file or directory\n"


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "failoverd", "check-config", str(QUORUM), "--node", "db1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "cluster      main" in result.stdout


def test_run_exits_78_on_an_invalid_config(tmp_path) -> None:
    """EX_CONFIG, so that systemd's RestartPreventExitStatus=78 stops retrying a broken file."""
    from click.testing import CliRunner

    from failoverd.cli import failoverd_main

    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nname = 'x'\n")
    result = CliRunner().invoke(failoverd_main, ["run", "--config", str(bad)])
    assert result.exit_code == 78
