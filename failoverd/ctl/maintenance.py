"""`failoverctl reload` and `failoverctl restart`: PostgreSQL settings and
restarts through failoverd (docs/operations.md, "PostgreSQL settings").

`reload` asks every member to re-read its own configuration file (as SIGHUP
does) and prints what each applied and which PostgreSQL settings wait for a
restart. `restart` restarts standbys one at a time, each streaming again
before the next; with `--rolling` it then switches over to a restarted
standby, which stops the old primary and starts it again as a standby (a
restart: it is restarted once more only if a setting is still pending), so
that no two members are ever down at once and the primary is never restarted
in place.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click

from failoverd.api.client import ApiClient, Unreachable
from failoverd.ctl.context import (
    EXIT_AUTH,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CtlContext,
    CtlError,
    confirm,
    pass_ctl,
    run,
)

STEP_POLL_S = 0.5


@click.command("reload")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_ctl
def reload_command(ctl: CtlContext, as_json: bool) -> None:
    """Make every member re-read its configuration file (as SIGHUP does) and
    apply [postgres.parameters] and [postgres] hba to its PostgreSQL. Prints,
    per member, what was applied and the settings that wait for a restart
    (apply them with `failoverctl restart --rolling --pending-only`).
    Distribute the changed file to every host first. Exits 1 if a member
    could not be reached or refused the file."""

    async def main() -> int:
        async with ctl.client(admin=True) as client:
            answers = await asyncio.gather(*(_reload_one(client, name, address) for name, address in ctl.members()))
        if as_json:
            click.echo(json.dumps({"members": answers}, indent=2))
        else:
            for a in answers:
                click.echo(_reload_line(a))
        return EXIT_OK if all(a.get("ok") for a in answers) else EXIT_REFUSED

    run(main)


async def _reload_one(client: ApiClient, name: str, address: Any) -> dict[str, Any]:
    try:
        answer = await client.call(address, "POST", "/reload", body={}, timeout_s=30.0)
    except Unreachable as error:
        return {"member": name, "ok": False, "error": f"unreachable: {error.reason}"}
    if not isinstance(answer.body, dict):
        return {"member": name, "ok": False, "error": f"HTTP {answer.status}: {answer.error}"}
    if answer.status in (401, 403):
        raise CtlError(f"{name}: {answer.error}", EXIT_AUTH)
    return {"member": name, **answer.body}


def _reload_line(a: dict[str, Any]) -> str:
    if not a.get("ok") and "applied" not in a:
        return f"{a['member']}: {a.get('error')}" + "".join(f"\n  {p}" for p in a.get("problems", []))
    parts = [f"applied {', '.join(a['applied']) or 'nothing new'}"]
    if a.get("pending_restart"):
        parts.append(f"PostgreSQL restart pending for {', '.join(a['pending_restart'])}")
    if a.get("failoverd_needs_restart"):
        parts.append(f"failoverd restart needed for {', '.join(a['failoverd_needs_restart'])}")
    if a.get("refused"):
        parts.append("refused: " + "; ".join(a["refused"]))
    if a.get("error"):
        parts.append(f"error: {a['error']}")
    return f"{a['member']}: " + "; ".join(parts)


@click.command("restart")
@click.argument("nodes", nargs=-1, metavar="[NODE]...")
@click.option(
    "--rolling",
    is_flag=True,
    help="Every data member: standbys first, then a switchover, then the old primary.",
)
@click.option("--pending-only", is_flag=True, help="Only members whose PostgreSQL has settings pending a restart.")
@click.option("--force", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--step-timeout",
    type=click.FloatRange(5, 3600),
    default=120.0,
    show_default=True,
    help="Seconds each member may take to stream again (and a switchover to finish).",
)
@pass_ctl
def restart_command(
    ctl: CtlContext, nodes: tuple[str, ...], rolling: bool, pending_only: bool, force: bool, step_timeout: float
) -> None:
    """Restart PostgreSQL on standbys NODE... one at a time, each streaming
    again before the next; the primary only with --rolling, through a
    switchover, never two members down at once."""

    async def main() -> int:
        if bool(nodes) == rolling:
            raise CtlError("name the standbys to restart, or pass --rolling for every data member", EXIT_USAGE)
        async with ctl.client(admin=True) as client:
            view = await ctl.cluster(client)
            plan = _plan(view, nodes, rolling=rolling, pending_only=pending_only)
            if not plan.standbys and not plan.primary:
                click.echo("nothing to restart" + (" (no setting pending a restart)" if pending_only else ""))
                return EXIT_OK
            steps = [*plan.standbys, *([f"switch over, then {plan.primary}"] if plan.primary else [])]
            confirm(force, f"restart PostgreSQL on {', '.join(steps)}, one at a time?")
            started = time.monotonic()
            for name in plan.standbys:
                await _restart_standby(ctl, client, name, step_timeout)
            if plan.primary:
                old = plan.primary
                target = _switchover_target(await ctl.cluster(client), old, restarted=plan.standbys)
                click.echo(f"switching over from {old} to {target}")
                await ctl.admin(client, "POST", "/switchover", {"to": target})
                began = time.monotonic()
                # The switchover stops the old primary and starts it as a
                # standby: a restart already. Until it streams again it is
                # neither a standby to restart nor one to count on.
                view = await _until(
                    ctl,
                    client,
                    step_timeout,
                    f"{target} to be the primary and {old} to stream from it",
                    lambda v: v.get("primary") == target and _streams_again(v, old),
                )
                if _pending(view, old):
                    await _restart_standby(ctl, client, old, step_timeout)
                else:
                    click.echo(f"{old} streams again, restarted by the switchover ({time.monotonic() - began:.1f} s)")
            click.echo(f"done in {time.monotonic() - started:.1f} s")
            return EXIT_OK

    run(main)


class _Plan:
    def __init__(self, standbys: list[str], primary: str | None) -> None:
        self.standbys, self.primary = standbys, primary


def _plan(view: dict[str, Any], nodes: tuple[str, ...], *, rolling: bool, pending_only: bool) -> _Plan:
    """Which members to restart, standbys first; refused (CtlError) unless
    every data member is up, so that no restart ever leaves two down."""
    primary = view.get("primary")
    if primary is None:
        raise CtlError("no writable primary: restarts wait until the cluster is healthy", EXIT_REFUSED)
    data = [m for m in view["members"] if m.get("kind") == "data"]
    for m in data:
        if not m.get("reachable"):
            raise CtlError(f"{m['name']} is unreachable: restart nothing while a member is down", EXIT_REFUSED)
        if m["name"] != primary and not (m.get("postgres") or {}).get("streaming"):
            raise CtlError(f"{m['name']} is not streaming: restart nothing while a member is down", EXIT_REFUSED)
    known = {m["name"] for m in data}
    for name in nodes:
        if name not in known:
            raise CtlError(f"{name} is not a data member", EXIT_USAGE)
        if name == primary:
            raise CtlError(f"{name} is the primary: use --rolling, which switches over first", EXIT_USAGE)

    def pending(name: str) -> bool:
        return _pending(view, name)

    wanted = list(nodes) if nodes else [m["name"] for m in data if m["name"] != primary]
    standbys = [n for n in wanted if not pending_only or pending(n)]
    restart_primary = rolling and (not pending_only or pending(primary))
    if restart_primary and not any(m["name"] != primary for m in data):
        raise CtlError("no standby to switch over to: the primary cannot be restarted without an outage", EXIT_REFUSED)
    return _Plan(standbys, primary if restart_primary else None)


def _switchover_target(view: dict[str, Any], old: str, restarted: list[str]) -> str:
    """A streaming standby, one already restarted if any (its settings are new)."""
    streaming = [
        m["name"]
        for m in view["members"]
        if m.get("kind") == "data" and m["name"] != old and (m.get("postgres") or {}).get("streaming")
    ]
    if not streaming:
        raise CtlError("no streaming standby to switch over to", EXIT_REFUSED)
    preferred = [n for n in streaming if n in restarted]
    return (preferred or streaming)[0]


async def _restart_standby(ctl: CtlContext, client: ApiClient, name: str, timeout_s: float) -> None:
    began = time.monotonic()
    click.echo(f"restarting {name}")
    await ctl.admin(client, "POST", "/restart", {"node": name})

    def back(view: dict[str, Any]) -> bool:
        return _streams_again(view, name)

    # The restart is asked for; give the member a moment to have stopped before
    # "streaming" can count as "streaming again".
    await asyncio.sleep(STEP_POLL_S)
    await _until(ctl, client, timeout_s, f"{name} to stream again", back)
    click.echo(f"{name} streams again ({time.monotonic() - began:.1f} s)")


async def _until(ctl: CtlContext, client: ApiClient, timeout_s: float, what: str, check: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            view = await ctl.cluster(client)
            if check(view):
                return view
        except CtlError:
            pass
        if time.monotonic() >= deadline:
            raise CtlError(f"gave up waiting for {what} after {timeout_s:g} s; nothing further restarted", EXIT_REFUSED)
        await asyncio.sleep(STEP_POLL_S)


def _member(view: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in view["members"] if m["name"] == name and m.get("reachable")), None)


def _streams_again(view: dict[str, Any], name: str) -> bool:
    m = _member(view, name)
    pg = None if m is None else m.get("postgres") or {}
    return bool(m and pg and pg.get("streaming") and not pg.get("restarting"))


def _pending(view: dict[str, Any], name: str) -> bool:
    member = _member(view, name)
    return bool(member and (member.get("postgres") or {}).get("pending_restart"))
