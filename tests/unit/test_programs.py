"""failoverd.adapters.programs's capability handling: which setpriv prefix a child gets for the
capability sets we hold (read from /proc/self/status, faked here)."""

from __future__ import annotations

import os

import pytest

from failoverd.adapters import programs

NET = (1 << 12) | (1 << 13)  # net_admin, net_raw


@pytest.fixture
def holding(monkeypatch: pytest.MonkeyPatch):
    def hold(ambient: int, inheritable: int | None = None) -> None:
        sets = {
            "CapInh": ambient if inheritable is None else inheritable,
            "CapPrm": ambient,
            "CapEff": ambient,
            "CapAmb": ambient,
        }
        monkeypatch.setattr(programs, "own_capabilities", lambda: sets)

    return hold


def test_no_ambient_capabilities_no_prefix(holding) -> None:
    holding(0)
    argv, _ = programs.command_for(["ip", "addr"], None, ("net_admin", "net_raw"))
    assert argv == ["ip", "addr"]
    assert programs.command_for(["pg_ctl"], None)[0] == ["pg_ctl"]


def test_postgres_commands_drop_every_ambient_capability(holding) -> None:
    holding(NET)
    argv, _ = programs.command_for(["pg_ctl", "start"], None)
    assert argv == [programs.SETPRIV, "--inh-caps=-all", "--ambient-caps=-all", "--", "pg_ctl", "start"]


def test_vip_commands_keep_exactly_their_capabilities(holding) -> None:
    holding(NET)  # exactly what they need: nothing to drop, no setpriv in between
    assert programs.command_for(["ip"], None, ("net_admin", "net_raw"))[0] == ["ip"]
    holding(NET | 1 << 21)  # sys_admin too: dropped, the two kept
    argv, _ = programs.command_for(["ip"], None, ("net_admin", "net_raw"))
    assert argv == [
        programs.SETPRIV,
        "--inh-caps=-all,+net_admin,+net_raw",
        "--ambient-caps=-all,+net_admin,+net_raw",
        "--",
        "ip",
    ]


def test_extra_inheritable_capabilities_are_dropped_too(holding) -> None:
    holding(NET, inheritable=NET | 1 << 21)
    argv, _ = programs.command_for(["ip"], None, ("net_admin", "net_raw"))
    assert argv[:3] == [
        programs.SETPRIV,
        "--inh-caps=-all,+net_admin,+net_raw",
        "--ambient-caps=-all,+net_admin,+net_raw",
    ]


def test_a_capability_we_do_not_hold_is_not_granted(holding) -> None:
    holding(1 << 12)
    argv, _ = programs.command_for(["arping"], None, ("net_admin", "net_raw"))
    assert argv == ["arping"]  # exactly net_admin held and kept; net_raw cannot be conjured


def test_unknown_capability_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown capability 'CAP_NET_ADMIN'"):
        programs.command_for(["ip"], None, ("CAP_NET_ADMIN",))


def test_keep_caps_is_refused_for_another_user(holding) -> None:
    holding(NET)
    other = "root" if os.geteuid() != 0 else "nobody"
    with pytest.raises((ValueError, PermissionError)):
        programs.command_for(["ip"], other, ("net_admin",))


async def test_interrupt_lets_a_program_report_before_it_exits() -> None:
    script = "trap 'echo interrupted; kill $!; exit 0' INT; sleep 5 >/dev/null & wait"
    done = await programs.run(["/bin/sh", "-c", script], user=None, timeout_s=5, interrupt_after_s=0.2)
    assert done.returncode == 0 and done.stdout.strip() == "interrupted"


async def test_interrupt_must_come_before_the_timeout() -> None:
    with pytest.raises(ValueError, match="interrupt_after_s"):
        await programs.run(["true"], user=None, timeout_s=1, interrupt_after_s=2)
