"""Hooks run real programs: environment, ordering, timeouts and the pre_promote veto."""

from __future__ import annotations

import asyncio
import functools
import os
import stat
from pathlib import Path

import pytest
import structlog

from failoverd.adapters import programs
from failoverd.config.load import HooksConfig
from failoverd.runtime.hooks import HookRunner


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def runner(hooks: HooksConfig) -> HookRunner:
    return HookRunner(
        hooks,
        cluster="pgc",
        node="a",
        vip="198.18.0.10/24",
        log=structlog.get_logger("t"),
        run=functools.partial(programs.run, user=None, check=False),
    )


async def test_role_change_hooks_run_in_order_with_documented_environment(tmp_path):
    out = tmp_path / "events"
    hook = script(
        tmp_path,
        "h",
        f'echo "$FAILOVERD_HOOK $FAILOVERD_CLUSTER $FAILOVERD_NODE $FAILOVERD_TERM '
        f'$FAILOVERD_ROLE $FAILOVERD_PREVIOUS_ROLE $FAILOVERD_REASON" >> {out}\n',
    )
    r = runner(HooksConfig(on_role_change=hook))
    r.role_changed(term=3, role="leader", previous="candidate", reason="election")
    r.role_changed(term=4, role="follower", previous="leader", reason="lease lost")
    await r.close()
    assert out.read_text().splitlines() == [
        "on_role_change pgc a 3 leader candidate election",
        "on_role_change pgc a 4 follower leader lease lost",
    ]


async def test_vip_hook_gets_address_and_action(tmp_path):
    out = tmp_path / "vip"
    hook = script(tmp_path, "v", f'echo "$FAILOVERD_VIP $FAILOVERD_VIP_ACTION $FAILOVERD_REASON" > {out}\n')
    r = runner(HooksConfig(on_vip_change=hook))
    r.vip_changed(term=2, action="released", reason="switchover")
    await r.close()
    assert out.read_text().strip() == "198.18.0.10/24 released switchover"


async def test_hook_command_line_is_split_without_a_shell(tmp_path):
    out = tmp_path / "args"
    hook = script(tmp_path, "a", f'printf "%s|" "$@" > {out}\n')
    r = runner(HooksConfig(on_role_change=f"{hook} 'two words' '$HOME' ';' x"))
    r.role_changed(term=1, role="leader", previous="candidate", reason="bootstrap")
    await r.close()
    assert out.read_text() == "two words|$HOME|;|x|"


async def test_hook_environment_does_not_leak_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("FAILOVERD_TEST_SECRET", "s3cret")
    out = tmp_path / "env"
    r = runner(HooksConfig(on_role_change=script(tmp_path, "e", f"env > {out}\n")))
    r.role_changed(term=1, role="leader", previous="candidate", reason="x")
    await r.close()
    assert "s3cret" not in out.read_text() and "FAILOVERD_NODE=a" in out.read_text()


async def test_pre_promote_allows_on_exit_zero_and_vetoes_otherwise(tmp_path):
    ok = runner(HooksConfig(pre_promote=script(tmp_path, "ok", "exit 0\n")))
    assert await ok.pre_promote(5) is None
    no = runner(HooksConfig(pre_promote=script(tmp_path, "no", "echo fenced elsewhere >&2; exit 3\n")))
    why = await no.pre_promote(5)
    assert why == "pre_promote hook exited 3: fenced elsewhere"
    assert await runner(HooksConfig()).pre_promote(5) is None  # no hook: nothing to veto


async def test_pre_promote_times_out_and_kills_the_hook(tmp_path):
    pidfile = tmp_path / "pid"
    hook = script(tmp_path, "slow", f"echo $$ > {pidfile}\nexec sleep 30\n")
    r = runner(HooksConfig(pre_promote=hook, timeout_s=0.5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    why = await r.pre_promote(1)
    assert why == "pre_promote hook timed out after 0.5 s" and loop.time() - started < 5
    pid = int(pidfile.read_text())
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"hook process {pid} still running")


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("/nonexistent/hook", "did not start"),
        ("'unterminated", "cannot parse"),
    ],
)
async def test_pre_promote_vetoes_a_hook_that_cannot_run(command, text):
    why = await runner(HooksConfig(pre_promote=command)).pre_promote(1)
    assert why is not None and text in why


async def test_report_hook_failure_is_logged_not_raised(tmp_path):
    r = runner(HooksConfig(on_role_change=script(tmp_path, "f", "exit 1\n")))
    with structlog.testing.capture_logs() as logs:
        r.role_changed(term=1, role="leader", previous="candidate", reason="x")
        await r.close()
    assert [e["hook"] for e in logs if e["event"] == "hook_failed"] == ["on_role_change"]


async def test_update_applies_to_later_events(tmp_path):
    out = tmp_path / "o"
    r = runner(HooksConfig())
    r.role_changed(term=1, role="leader", previous="candidate", reason="x")  # no hook yet
    r.update(HooksConfig(on_role_change=script(tmp_path, "u", f"echo $FAILOVERD_TERM >> {out}\n")))
    r.role_changed(term=2, role="follower", previous="leader", reason="y")
    await r.close()
    assert out.read_text().split() == ["2"]
    assert os.access(out, os.R_OK)
