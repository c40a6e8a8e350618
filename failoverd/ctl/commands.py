"""`failoverctl`: the operator's command line, a client of the members' REST APIs.

It reads the same configuration file as the daemon to find the members'
APIs (and the admin token), asks whichever member answers first, and so
keeps working while any one member is down: members forward admin requests
to the leader. Exit codes (docs/api.md lists them too):

    0  done
    1  refused by the cluster, or it did not complete in time
    2  usage error (bad options or arguments)
    3  local problem: the configuration or the token file cannot be used
    4  no member could be reached
    5  authentication failed (401/403)

More commands are click commands using `CtlContext` through `pass_ctl`,
added with `failoverctl_main.add_command`. The failover drill's logic lives
in `failoverd.ctl.drill`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from failoverd import __version__
from failoverd.api.client import ApiClient
from failoverd.api.views import iso
from failoverd.ctl import drill, maintenance
from failoverd.ctl.context import (
    DEFAULT_CONFIG,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CtlContext,
    CtlError,
    confirm,
    pass_ctl,
    run,
)


def _json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="failoverctl")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="FAILOVERD_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The cluster's configuration file ($FAILOVERD_CONFIG).",
)
@click.option("--token-file", type=click.Path(path_type=Path), help="Admin token file. Default: [api] token_file.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.1, 600),
    default=3.0,
    show_default=True,
    help="Seconds to wait for one member's answer to a read.",
)
@click.option("--ca", type=click.Path(path_type=Path), help="CA to verify members with (TLS). Default: [api] tls_ca.")
@click.option("--cert", type=click.Path(path_type=Path), help="Client certificate (TLS). Default: [api] tls_cert.")
@click.option("--key", type=click.Path(path_type=Path), help="Client key (TLS). Default: [api] tls_key.")
@click.pass_context
def failoverctl_main(
    ctx: click.Context,
    config_path: Path,
    token_file: Path | None,
    timeout_s: float,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
) -> None:
    """Show and operate a failoverd cluster through its members' REST APIs."""
    ctx.obj = CtlContext(config_path, token_file, timeout_s, {"ca": ca, "cert": cert, "key": key})


# ------------------------------------------------------------------ reads


@failoverctl_main.command("list")
@_json_option
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until interrupted.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True)
@pass_ctl
def list_command(ctl: CtlContext, as_json: bool, watch: bool, interval: float) -> None:
    """The members: role, state, timeline, WAL position, lag, term, VIP."""

    async def main() -> None:
        async with ctl.client(admin=False) as client:
            while True:
                try:
                    view = await ctl.cluster(client)
                    text = json.dumps(view, indent=2) if as_json else render_cluster(view)
                except CtlError as error:
                    if not watch:
                        raise
                    text = f"failoverctl: {error}"
                if watch:
                    click.clear()
                    click.echo(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  (every {interval:g} s; Ctrl-C to stop)")
                click.echo(text)
                if not watch:
                    return
                await asyncio.sleep(interval)

    try:
        run(main)
    except SystemExit as done:
        if watch and done.code == 130:
            sys.exit(EXIT_OK)  # Ctrl-C is how --watch ends
        raise


@failoverctl_main.command("history")
@_json_option
@pass_ctl
def history_command(ctl: CtlContext, as_json: bool) -> None:
    """Leadership changes and notes kept in the replicated cluster state."""

    async def main() -> None:
        async with ctl.client(admin=False) as client:
            view = await ctl.cluster(client)
            # The leader holds the newest state; any member's copy will do without one.
            name, answer = await ctl.ask(client, "GET", "/history", prefer=view.get("leader"))
            if answer.status != 200 or not isinstance(answer.body, dict):
                raise CtlError(f"{name}: {answer.error}", EXIT_REFUSED)
            entries = answer.body["history"]
            if as_json:
                click.echo(json.dumps(answer.body, indent=2))
                return
            rows = [("time", "term", "from", "to", "reason", "position")]
            rows += [
                (e["time"] or "-", str(e["term"]), e["from"] or "-", e["to"], e["reason"], e["position"] or "-")
                for e in entries
            ]
            click.echo(_table(rows))

    run(main)


@failoverctl_main.command("dsn")
@_json_option
@click.option("--user", help="user= in the DSN (default: none, libpq's default).")
@click.option("--dbname", help="Database. Default: [postgres] database.")
@pass_ctl
def dsn_command(ctl: CtlContext, as_json: bool, user: str | None, dbname: str | None) -> None:
    """A libpq multi-host DSN that finds the writable primary (works with every member down too)."""
    try:
        config = ctl.config
    except CtlError as error:
        click.echo(f"failoverctl: {error}", err=True)
        sys.exit(error.code)
    hosts = [n.postgres for n in config.nodes if n.postgres is not None]
    database = dbname or config.postgres_defaults.database
    netloc = ",".join(f"[{h.host}]:{h.port}" if ":" in h.host else f"{h.host}:{h.port}" for h in hosts)
    who = f"{quote(user, safe='')}@" if user else ""
    dsn = f"postgresql://{who}{netloc}/{quote(database, safe='')}?target_session_attrs=read-write"
    if as_json:
        click.echo(
            json.dumps(
                {
                    "dsn": dsn,
                    "hosts": [{"host": h.host, "port": h.port} for h in hosts],
                    "dbname": database,
                    "user": user,
                }
            )
        )
    else:
        click.echo(dsn)


# ------------------------------------------------------------------ admin


@failoverctl_main.command("switchover")
@click.option("--to", "target", metavar="NODE", help="The new primary. Default: the best standby.")
@click.option("--at", "at", metavar="TIME", help="When: ISO 8601 (local time unless a zone is given). Default: now.")
@click.option("--cancel", is_flag=True, help="Cancel a scheduled switchover instead.")
@click.option("--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the new primary.")
@click.option("--wait-timeout", type=click.FloatRange(1, 3600), default=90.0, show_default=True)
@pass_ctl
def switchover_command(
    ctl: CtlContext, target: str | None, at: str | None, cancel: bool, force: bool, wait: bool, wait_timeout: float
) -> None:
    """Planned switchover: checkpoint, stop the primary cleanly, promote the
    target once it has every WAL record, restart the old primary as its standby."""
    if cancel and (target or at):
        raise click.UsageError("--cancel takes neither --to nor --at")
    when = None if at is None else _parse_at(at)

    async def main() -> int:
        async with ctl.client(admin=True) as client:
            if cancel:
                click.echo((await ctl.admin(client, "DELETE", "/switchover"))["message"])
                return EXIT_OK
            view = await ctl.cluster(client)
            old = view.get("primary")
            what = f"switch over from {old or '(no primary)'} to {target or 'the best standby'}"
            confirm(force, f"{what} {'at ' + iso(when) if when else 'now'}?")
            body = {"to": target, "at": when}
            done = await ctl.admin(client, "POST", "/switchover", {k: v for k, v in body.items() if v is not None})
            click.echo(done["message"])
            if when is not None or not wait:
                return EXIT_OK
            return await _wait_new_primary(ctl, client, old, target, wait_timeout)

    run(main)


@failoverctl_main.command("failover")
@click.option("--to", "target", metavar="NODE", required=True, help="The member to make primary.")
@click.option(
    "--allow-data-loss",
    is_flag=True,
    help="Let voters waive the WAL check: the new primary may miss acknowledged commits.",
)
@click.option("--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the new primary.")
@click.option("--wait-timeout", type=click.FloatRange(1, 3600), default=90.0, show_default=True)
@pass_ctl
def failover_command(
    ctl: CtlContext, target: str, allow_data_loss: bool, force: bool, wait: bool, wait_timeout: float
) -> None:
    """Make NODE the primary now: also while paused, with a lagging target, or with no leader alive."""

    async def main() -> int:
        async with ctl.client(admin=True) as client:
            loss = " ACCEPTING THE LOSS OF ACKNOWLEDGED COMMITS" if allow_data_loss else ""
            confirm(force, f"fail over to {target}{loss}?")
            try:
                old = (await ctl.cluster(client)).get("primary")
            except CtlError:
                old = None  # the failover may be exactly what brings the cluster back
            done = await ctl.admin(client, "POST", "/failover", {"to": target, "allow_data_loss": allow_data_loss})
            click.echo(done["message"])
            if not wait:
                return EXIT_OK
            return await _wait_new_primary(ctl, client, old, target, wait_timeout)

    run(main)


def _simple_admin(name: str, path: str, help_text: str) -> None:
    @failoverctl_main.command(name, help=help_text)
    @pass_ctl
    def command(ctl: CtlContext) -> None:
        async def main() -> None:
            async with ctl.client(admin=True) as client:
                click.echo((await ctl.admin(client, "POST", path))["message"])

        run(main)


failoverctl_main.add_command(maintenance.reload_command)
failoverctl_main.add_command(maintenance.restart_command)

_simple_admin("pause", "/pause", "Stop automatic failover (lease fencing stays on).")
_simple_admin("resume", "/resume", "Resume automatic failover.")


@failoverctl_main.command("reinit")
@click.argument("node")
@click.option("--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it streams again.")
@click.option("--wait-timeout", type=click.FloatRange(1, 86400), default=600.0, show_default=True)
@pass_ctl
def reinit_command(ctl: CtlContext, node: str, force: bool, wait: bool, wait_timeout: float) -> None:
    """Rebuild NODE's standby from the primary (its data directory is kept aside)."""

    async def main() -> int:
        async with ctl.client(admin=True) as client:
            confirm(force, f"rebuild {node} from the primary?")
            click.echo((await ctl.admin(client, "POST", "/reinit", {"node": node}))["message"])
            if not wait:
                return EXIT_OK
            return await _wait_reinit(ctl, client, node, wait_timeout)

    run(main)


@failoverctl_main.command("drill")
@click.option("--to", "target", metavar="NODE", help="The new primary. Default: the best standby.")
@click.option(
    "--writes-per-s",
    type=click.FloatRange(1, 500),
    default=50.0,
    show_default=True,
    help="Probe writes per second (one at a time).",
)
@click.option(
    "--dsn",
    metavar="URI",
    envvar="FAILOVERD_DRILL_DSN",
    help="libpq URI of the write endpoint ($FAILOVERD_DRILL_DSN). Default: the VIP, else every member.",
)
@click.option("--user", help="Database user. Default: $PGUSER, else [postgres] superuser.")
@click.option("--dbname", help="Database. Default: [postgres] database.")
@click.option("--force", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--wait-timeout",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="Seconds to wait for a probe write on the new primary.",
)
@_json_option
@pass_ctl
def drill_command(
    ctl: CtlContext,
    target: str | None,
    writes_per_s: float,
    dsn: str | None,
    user: str | None,
    dbname: str | None,
    force: bool,
    wait_timeout: float,
    as_json: bool,
) -> None:
    """Failover drill: probe writes go to a scratch table (failoverd_drill)
    through the write endpoint while a planned switchover runs; prints the
    timeline, the write pause and the acknowledged writes lost, and records
    the result in the history. Exits 1 if the switchover failed or a write was lost."""

    async def main() -> int:
        try:
            endpoint = drill.write_endpoint(ctl.config, dsn, user, dbname)
        except ValueError as error:
            raise CtlError(str(error), EXIT_USAGE) from None
        result = await drill.run_drill(
            ctl,
            target=target,
            writes_per_s=writes_per_s,
            endpoint=endpoint,
            timeout_s=wait_timeout,
            confirm=lambda q: confirm(force, q),
        )
        click.echo(json.dumps(result.as_dict(), indent=2) if as_json else drill.render(result))
        return EXIT_OK if result.ok and result.recorded else EXIT_REFUSED

    run(main)


# ---------------------------------------------------------------- helpers


def _parse_at(text: str) -> float:
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 time, e.g. 2030-01-01T03:00", param_hint="--at"
        ) from None
    return (when if when.tzinfo else when.astimezone()).timestamp()


async def _wait_new_primary(
    ctl: CtlContext, client: ApiClient, old: str | None, target: str | None, timeout_s: float
) -> int:
    started = time.monotonic()
    seen = None
    while time.monotonic() - started < timeout_s:
        await asyncio.sleep(0.5)
        try:
            seen = (await ctl.cluster(client)).get("primary")
        except CtlError:
            continue
        if seen is not None and seen != old and (target is None or seen == target):
            click.echo(f"{seen} is the primary ({time.monotonic() - started:.1f} s)")
            return EXIT_OK
    click.echo(f"failoverctl: no new primary within {timeout_s:g} s (primary now: {seen or 'none'})", err=True)
    return EXIT_REFUSED


async def _wait_reinit(ctl: CtlContext, client: ApiClient, node: str, timeout_s: float) -> int:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        await asyncio.sleep(1.0)
        try:
            view = await ctl.cluster(client)
        except CtlError:
            continue
        member = next((m for m in view["members"] if m["name"] == node), None)
        if member is None or not member.get("reachable"):
            continue
        reinit = member.get("reinit")
        if reinit is None or reinit["running"]:
            continue
        if reinit["error"] is not None:
            click.echo(f"failoverctl: rebuilding {node} failed: {reinit['error']}", err=True)
            return EXIT_REFUSED
        if member["postgres"]["streaming"]:
            click.echo(f"{node} is streaming again ({time.monotonic() - started:.1f} s)")
            return EXIT_OK
    click.echo(f"failoverctl: {node} did not stream again within {timeout_s:g} s", err=True)
    return EXIT_REFUSED


def render_cluster(view: dict[str, Any]) -> str:
    lines = [_headline(view)]
    rows = [("member", "host", "role", "state", "tl", "lsn", "lag", "term", "vip")]
    for m in view["members"]:
        pg = m.get("postgres")
        host = (
            "-"
            if pg is None
            else (f"[{pg['host']}]:{pg['port']}" if ":" in pg["host"] else f"{pg['host']}:{pg['port']}")
        )
        if not m.get("reachable"):
            rows.append((m["name"], host, "?", "unreachable", "-", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                m["name"],
                host,
                _role(m),
                _state(m),
                _dash(pg and pg["timeline"]),
                _dash(pg and pg["lsn"]),
                _lag(m.get("lag_bytes"), pg),
                str(m["term"]),
                "*" if m["vip_held"] else "",
            )
        )
    lines.append(_table(rows))
    for m in view["members"]:
        if not m.get("reachable"):
            lines.append(f"{m['name']}: {m.get('error', 'unreachable')}")
    return "\n".join(lines)


def _headline(view: dict[str, Any]) -> str:
    parts = [f"cluster {view['cluster']}", f"leader {view['leader'] or 'none'}", f"term {view['term']}"]
    parts.append(f"primary {view['primary'] or 'none'}")
    if view.get("paused"):
        parts.append("PAUSED (no automatic failover)")
    switchover = view.get("switchover")
    if switchover and switchover.get("at") is not None:
        parts.append(f"switchover to {switchover['to'] or 'the best standby'} scheduled at {switchover['at_iso']}")
    elif switchover:
        parts.append(f"switchover to {switchover['to']} running")
    if len(view.get("primaries", [])) > 1:
        parts.append(f"WARNING: several writable primaries reported: {', '.join(view['primaries'])}")
    return ", ".join(parts)


def _role(m: dict[str, Any]) -> str:
    if m["kind"] == "witness":
        return "witness (leader)" if m["role"] == "leader" else "witness"
    if m["writable"]:
        return "primary"
    if m["role"] == "leader":
        return "leader"
    if m["role"] in ("pre_candidate", "candidate"):
        return "candidate"
    state = m["postgres"]["state"]
    return "standby" if state == "standby" else "-"


def _state(m: dict[str, Any]) -> str:
    pg = m.get("postgres")
    if pg is None:
        return "running"
    if pg["streaming"]:
        return f"streaming from {pg['following']}"
    if pg["state"] == "primary":
        return "running"
    if m.get("reinit") and m["reinit"]["running"]:
        return f"{pg['state']} (rebuilding)"
    return pg["state"]


def _lag(lag: int | None, pg: dict[str, Any] | None) -> str:
    if pg is None or lag is None:
        return "-"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if lag >= size:
            return f"{lag / size:.1f} {unit}"
    return f"{lag} B"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main() -> None:
    failoverctl_main(prog_name=os.path.basename(sys.argv[0]) or "failoverctl")


if __name__ == "__main__":
    main()
