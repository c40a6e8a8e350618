"""failoverctl against real API servers (fake supervisors behind them, served
from a background event loop): what each command prints, sends and exits
with, including a member down, no member up, and bad credentials."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_api_server import TOKEN, Cluster, config_text, leader_status, status, three

from failoverd.core.actions import ReplyCode
from failoverd.core.requests import CancelSwitchover, Failover, Pause, RecordEvent, Reinit, Resume, Switchover
from failoverd.core.state import HistoryEntry, Position
from failoverd.core.status import RebuildStatus
from failoverd.ctl import drill
from failoverd.ctl.commands import failoverctl_main
from tests.support import wait_for_sync


class Served:
    """A test_api_server.Cluster running on its own event loop in a thread."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.token = tmp / "token"
        self.token.write_text(TOKEN + "\n")
        self.token.chmod(0o600)
        self.config = tmp / "failoverd.toml"
        text = cluster.config_text.replace("/nonexistent/token", str(self.token))
        self.config.write_text(text)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def __enter__(self) -> Served:
        self.thread.start()
        self._run(self.cluster.__aenter__())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._run(self.cluster.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def ctl(self, *args: str, input: str | None = None) -> Any:
        return CliRunner().invoke(failoverctl_main, ["--config", str(self.config), *args], input=input)

    def fake(self, name: str):
        return self.cluster.fakes[name]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with Served(Cluster(three()), tmp_path) as s:
        yield s


# ------------------------------------------------------------------ reads


def test_list_shows_every_member(served: Served) -> None:
    result = served.ctl("list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "cluster unit, leader a, term 3, primary a"
    assert lines[1].split() == ["member", "host", "role", "state", "tl", "lsn", "lag", "term", "vip"]
    assert lines[2].split() == ["a", "127.0.0.1:5500", "primary", "running", "1", "0/1388", "0", "B", "3", "*"]
    assert lines[3].split() == [
        "b",
        "127.0.0.1:5501",
        "standby",
        "streaming",
        "from",
        "a",
        "1",
        "0/FA0",
        "1000",
        "B",
        "3",
    ]
    assert lines[4].split()[7:11] == ["0/BB8", "2.0", "kB", "3"]


def test_list_json_and_paused(tmp_path: Path) -> None:
    with Served(Cluster(three(paused=True, switchover_to="c", switchover_at=1_900_000_000.0)), tmp_path) as s:
        result = s.ctl("list", "--json")
        assert result.exit_code == 0
        view = json.loads(result.output)
        assert view["paused"] is True and [m["name"] for m in view["members"]] == ["a", "b", "c"]
        text = s.ctl("list").output.splitlines()[0]
        assert "PAUSED" in text and "switchover to c scheduled at 2030-03-17T17:46:40Z" in text


def test_list_with_a_member_down_and_with_all_down(tmp_path: Path) -> None:
    with Served(Cluster(three(), down=("a",)), tmp_path) as s:
        result = s.ctl("list")
        assert result.exit_code == 0, result.output
        assert any(
            line.split()[:4] == ["a", "127.0.0.1:5500", "?", "unreachable"] for line in result.output.splitlines()
        )
        assert "primary none" in result.output.splitlines()[0]
    with Served(Cluster(three(), down=NAMES_ALL), tmp_path) as s:
        result = s.ctl("list")
        assert result.exit_code == 4 and "no member answered" in result.output


NAMES_ALL = ("a", "b", "c")


def test_list_watch_redraws_until_interrupted(served: Served) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "failoverd.ctl.commands",
            "--config",
            str(served.config),
            "list",
            "--watch",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # Interrupted once it has drawn twice, however long that took.
        wait_for_sync("a second redraw", lambda: "".join(lines).count("cluster unit, leader a") >= 2, 30)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, err
    assert "".join(lines).count("cluster unit, leader a") >= 2


def test_history(tmp_path: Path) -> None:
    entries = (
        HistoryEntry(1, None, "a", "bootstrap", None, 1_700_000_000.0),
        HistoryEntry(4, "a", "b", "switchover", Position(1, 0x3000060), 1_700_000_100.0),
    )
    with Served(Cluster(three(history=entries)), tmp_path) as s:
        result = s.ctl("history")
        assert result.exit_code == 0
        rows = [line.split() for line in result.output.splitlines()]
        assert rows[0] == ["time", "term", "from", "to", "reason", "position"]
        assert rows[1] == ["2023-11-14T22:13:20Z", "1", "-", "a", "bootstrap", "-"]
        assert rows[2] == ["2023-11-14T22:15:00Z", "4", "a", "b", "switchover", "1/0/3000060"]
        body = json.loads(s.ctl("history", "--json").output)
        assert [e["to"] for e in body["history"]] == ["a", "b"]


def test_dsn(served: Served) -> None:
    result = served.ctl("dsn")
    expected = "postgresql://127.0.0.1:5500,127.0.0.1:5501,127.0.0.1:5502/postgres?target_session_attrs=read-write"
    assert result.exit_code == 0 and result.output.strip() == expected
    result = served.ctl("dsn", "--json", "--user", "app@x", "--dbname", "my db")
    body = json.loads(result.output)
    assert body["dsn"].startswith("postgresql://app%40x@127.0.0.1:5500,") and "/my%20db?" in body["dsn"]
    assert body["hosts"][2] == {"host": "127.0.0.1", "port": 5502}


def test_dsn_brackets_ipv6(tmp_path: Path) -> None:
    config = tmp_path / "v6.toml"
    config.write_text(config_text({"a": 1, "b": 2, "c": 3}).replace('peer = "127.0.0.1:7402"', 'peer = "[::1]:7402"'))
    result = CliRunner().invoke(failoverctl_main, ["--config", str(config), "dsn"])
    assert result.exit_code == 0 and ",[::1]:5502/postgres?" in result.output


def test_config_from_the_environment_and_config_errors(served: Served, tmp_path: Path) -> None:
    result = CliRunner().invoke(failoverctl_main, ["dsn"], env={"FAILOVERD_CONFIG": str(served.config)})
    assert result.exit_code == 0 and "target_session_attrs=read-write" in result.output
    result = CliRunner().invoke(failoverctl_main, ["--config", str(tmp_path / "missing.toml"), "list"])
    assert result.exit_code == 3 and "cannot read the configuration file" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text(served.config.read_text().replace('name = "unit"', "name = 5"))
    result = CliRunner().invoke(failoverctl_main, ["--config", str(bad), "pause"])
    assert result.exit_code == 3 and "cluster.name" in result.output


# ------------------------------------------------------------------ admin


def test_pause_and_resume(served: Served) -> None:
    result = served.ctl("pause")
    assert result.exit_code == 0 and result.output.strip() == "done"
    assert served.ctl("resume").exit_code == 0
    assert [type(r) for r in served.fake("a").requests()] == [Pause, Resume]


def test_admin_with_the_first_member_down(tmp_path: Path) -> None:
    statuses = three()
    statuses["b"] = leader_status("b")
    statuses["a"] = status("a", leader="b")
    with Served(Cluster(statuses, down=("a",)), tmp_path) as s:
        assert s.ctl("pause").exit_code == 0
        assert [type(r) for r in s.fake("b").requests()] == [Pause]


def test_bad_or_missing_credentials(served: Served, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("a-wrong-token-but-long-enough")
    wrong.chmod(0o600)
    result = served.ctl("--token-file", str(wrong), "pause")
    assert result.exit_code == 5 and "the token is not valid" in result.output
    loose = tmp_path / "loose"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    result = served.ctl("--token-file", str(loose), "pause")
    assert result.exit_code == 3 and "chmod 600" in result.output
    served.config.write_text(served.config.read_text().replace(f'token_file = "{served.token}"\n', ""))
    result = served.ctl("pause")
    assert result.exit_code == 3 and "no admin token" in result.output
    assert served.ctl("list").exit_code == 0  # reads need no token
    assert served.fake("a").calls == []


def test_switchover_asks_unless_forced(served: Served) -> None:
    result = served.ctl("switchover", "--to", "b")
    assert result.exit_code == 2 and "pass --force" in result.output
    assert served.fake("a").calls == []


def test_switchover_waits_for_the_new_primary(served: Served) -> None:
    def become_primary(req: Any) -> None:
        served.fake("a").st = status("a", leader="b", primary_position=Position(1, 5000))
        served.fake("b").st = leader_status("b")

    served.fake("a").on_request = become_primary
    result = served.ctl("switchover", "--to", "b", "--force")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "done" and result.output.splitlines()[1].startswith("b is the primary (")
    req = served.fake("a").requests()[0]
    assert isinstance(req, Switchover) and (req.target, req.at) == ("b", None)
    # One request to the leader's core, which checkpoints before it answers: nothing else from the API.
    assert [what for what, _ in served.fake("a").calls] == ["request"]


def test_switchover_refused_or_not_completing(served: Served) -> None:
    served.fake("a").reply = (ReplyCode.CONFLICT, "the cluster is paused")
    result = served.ctl("switchover", "--force")
    assert result.exit_code == 1 and "refused: the cluster is paused" in result.output
    served.fake("a").reply = (ReplyCode.OK, "switchover to c started")
    result = served.ctl("switchover", "--to", "c", "--force", "--wait-timeout", "1.5")
    assert result.exit_code == 1 and "no new primary within 1.5 s (primary now: a)" in result.output


def test_switchover_scheduled_and_cancelled(served: Served) -> None:
    result = served.ctl("switchover", "--to", "c", "--at", "2031-01-02T03:04:05+00:00", "--force")
    assert result.exit_code == 1 and "more than 30 days ahead" in result.output  # checked by the API
    wanted = int(time.time()) + 3600
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wanted))  # local time, whole seconds
    result = served.ctl("switchover", "--to", "c", "--at", at, "--force")
    assert result.exit_code == 0, result.output
    req = served.fake("a").requests()[0]
    assert isinstance(req, Switchover) and req.at == wanted
    assert served.ctl("switchover", "--cancel").exit_code == 0
    assert isinstance(served.fake("a").requests()[1], CancelSwitchover)
    assert served.ctl("switchover", "--at", "tomorrow", "--force").exit_code == 2
    assert served.ctl("switchover", "--cancel", "--to", "b").exit_code == 2


def test_failover(served: Served) -> None:
    result = served.ctl("failover", "--to", "c", "--allow-data-loss", "--force", "--no-wait")
    assert result.exit_code == 0, result.output
    req = served.fake("a").requests()[0]
    assert isinstance(req, Failover) and (req.target, req.allow_data_loss) == ("c", True)
    assert served.ctl("failover", "--force").exit_code == 2  # --to is required
    result = served.ctl("failover", "--to", "zz", "--force")
    assert result.exit_code == 1 and "'zz' is not a member" in result.output


def test_reinit(served: Served) -> None:
    def rebuilt(error: str | None) -> None:
        served.fake("c").st = dataclasses.replace(
            served.fake("c").st,
            rebuild=RebuildStatus("a", time.time(), running=False, finished_at=time.time(), error=error),
        )

    result = served.ctl("reinit", "c", "--force", "--no-wait")
    assert result.exit_code == 0 and result.output.strip() == "rebuilding c from a"
    (req,) = served.fake("c").requests()
    assert isinstance(req, Reinit) and req.member == "c"
    served.fake("b").reply = (ReplyCode.CONFLICT, "b is leader: only a follower's standby can be rebuilt")
    result = served.ctl("reinit", "b", "--force")
    assert result.exit_code == 1 and "only a follower" in result.output
    rebuilt(None)
    result = served.ctl("reinit", "c", "--force", "--wait-timeout", "5")
    assert result.exit_code == 0 and "c is streaming again" in result.output
    rebuilt("pg_basebackup failed")
    result = served.ctl("reinit", "c", "--force", "--wait-timeout", "5")
    assert result.exit_code == 1 and "rebuilding c failed: pg_basebackup failed" in result.output


def test_reinit_with_no_primary_to_clone_from(served: Served) -> None:
    served.fake("c").reply = (ReplyCode.CONFLICT, "c knows no live primary to clone from")
    result = served.ctl("reinit", "c", "--force", "--no-wait")
    assert result.exit_code == 1 and "c knows no live primary to clone from" in result.output


def test_tls(tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    with Served(Cluster(three(), tls=tls_files), tmp_path) as s:
        result = s.ctl("list", "--json")
        assert result.exit_code == 0 and all(m["reachable"] for m in json.loads(result.output)["members"])
        assert s.ctl("pause").exit_code == 0
        result = s.ctl("--cert", str(tmp_path / "missing.pem"), "--key", str(tls_files[1]), "list")
        assert result.exit_code == 3 and "TLS" in result.output
        result = s.ctl("--ca", str(tls_files[1]), "list")  # not a certificate
        assert result.exit_code == 3 and "TLS" in result.output


# ------------------------------------------------------------------ drill


def test_drill_asks_unless_forced_and_needs_a_known_port_for_the_vip(served: Served) -> None:
    result = served.ctl("drill", "--to", "b", "--dsn", "postgresql://127.0.0.1:9/postgres")
    assert result.exit_code == 2 and "pass --force" in result.output
    # The members' ports differ, so the VIP's port is not known: --dsn is needed.
    result = served.ctl("drill", "--force")
    assert result.exit_code == 2 and "pass --dsn" in result.output
    assert served.fake("a").calls == []


def test_drill_refused_without_a_writable_primary(tmp_path: Path) -> None:
    with Served(Cluster(three(primary_ready=False)), tmp_path) as s:
        result = s.ctl("drill", "--force", "--dsn", "postgresql://127.0.0.1:9/postgres")
        assert result.exit_code == 1 and "no writable primary" in result.output
        assert s.fake("a").calls == []


def test_drill_that_cannot_write_switches_nothing_and_is_recorded_as_failed(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drill, "WARM_UP_TIMEOUT_S", 0.5)
    result = served.ctl("drill", "--force", "--json", "--dsn", "postgresql://127.0.0.1:9/postgres")
    assert result.exit_code == 1, result.output
    out = json.loads(result.output)
    assert out["ok"] is False and out["old_primary"] == "a" and out["new_primary"] is None
    assert out["error"].startswith("the write endpoint: ") or "do not succeed" in out["error"]
    (req,) = served.fake("a").requests()
    assert (
        isinstance(req, RecordEvent) and req.reason == out["note"] and req.reason.startswith("drill from a: FAILED: ")
    )
    assert out["recorded"] is True


def test_write_endpoint_from_the_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from failoverd.config.load import parse_config

    ports = {"a": 8001, "b": 8002, "c": 8003}
    text = config_text(ports)
    config = parse_config(text, source="unit.toml")
    with pytest.raises(ValueError, match="pass --dsn"):
        drill.write_endpoint(config, None, None, None)
    same_port = parse_config(
        text.replace("port = 5501", 'host = "127.0.0.2"\nport = 5500').replace(
            "port = 5502", 'host = "127.0.0.3"\nport = 5500'
        ),
        source="unit.toml",
    )
    monkeypatch.setenv("PGUSER", "prober")
    vip = drill.write_endpoint(same_port, None, None, "app")
    assert vip.kwargs == {"host": "198.18.0.100", "port": 5500, "user": "prober", "database": "app"}
    assert vip.description == "the VIP 198.18.0.100:5500"
    no_vip = parse_config(
        text.replace('[vip]\naddress = "198.18.0.100/24"\ninterface = "eth0"\n', ""), source="unit.toml"
    )
    monkeypatch.delenv("PGUSER")
    every = drill.write_endpoint(no_vip, None, None, None)
    assert every.kwargs == {
        "host": ["127.0.0.1"] * 3,
        "port": [5500, 5501, 5502],
        "user": "postgres",
        "database": "postgres",
    }
    given = drill.write_endpoint(no_vip, "postgresql://h:1/d", "u", None)
    assert given.kwargs == {"dsn": "postgresql://h:1/d", "user": "u"}


def test_probe_writer_pause_and_missing_writes() -> None:
    writer = drill.ProbeWriter(_never_connect, run=7)
    writer.acks = [
        drill.Ack(1, 10.0, 0.0, "a"),
        drill.Ack(2, 10.1, 0.0, "a"),
        drill.Ack(3, 10.9, 0.0, "b"),
        drill.Ack(4, 11.0, 0.0, "b"),
    ]
    assert writer.pause_after("a", since=10.05) == drill.Pause(writer.acks[1], writer.acks[2])
    assert writer.pause_after("a", since=10.05).seconds == pytest.approx(0.8)
    assert writer.pause_after("b", since=10.05) is None  # nothing after a write of b on another server
    assert [a.id for a in writer.acked_by("b")] == [3, 4]

    class Rows:  # the one query missing_acks makes
        async def fetch(self, query: str, run: int) -> list[dict[str, int]]:
            assert "failoverd_drill" in query and run == 7
            return [{"id": 1}, {"id": 3}, {"id": 4}]

    assert asyncio.run(drill.missing_acks(Rows(), 7, writer.acks)) == [2]


def test_drill_note_and_text() -> None:
    ok = drill.DrillResult(
        ok=True,
        old_primary="a",
        new_primary="b",
        endpoint="the VIP",
        write_pause_s=0.412,
        acked=300,
        lost=0,
        phases=[
            drill.Phase("switchover requested", 0.0, "failoverctl's clock"),
            drill.Phase("b caught up", None, "not exposed by the API"),
        ],
    )
    assert ok.note_text() == "drill a->b: ok, write pause 0.41 s, 0 of 300 acknowledged probe writes lost"
    text = drill.render(ok)
    assert "   +0.000 s  switchover requested" in text and "         -    b caught up" in text
    assert "write pause: 0.412 s" in text and "300 acknowledged, 0 lost" in text
    failed = drill.DrillResult(ok=False, old_primary="a", new_primary=None, endpoint="x", error="e" * 500)
    assert len(failed.note_text()) == 200 and failed.note_text().startswith("drill from a: FAILED: eee")


async def _never_connect():
    raise OSError("not used")
