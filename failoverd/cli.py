"""The `failoverd` command: click parses, the library does the work."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import click

from failoverd import __version__
from failoverd.config.load import Config, ConfigError, load_config
from failoverd.core.spec import ClusterSpec, ReplicationMode, Timing
from failoverd.sim.command import simulate_command

EX_CONFIG = 78  # sysexits.h: the unit's RestartPreventExitStatus= stops restarts on it


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="failoverd")
def failoverd_main() -> None:
    """The failoverd supervisor of one host of a PostgreSQL cluster."""


def load_config_or_exit(file: Path, node: str | None, exit_code: int = 1) -> Config:
    """The configuration, or every problem with it on stderr and exit."""
    try:
        return load_config(file, node)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(f"{error.source}: {problem}", err=True)
        sys.exit(exit_code)


@failoverd_main.command("check-config", short_help="Check a configuration file and summarise the cluster.")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--node", metavar="NAME", help="The member this host is. Default: the member named like this host.")
def check_config(file: Path, node: str | None) -> None:
    """Check the configuration FILE and summarise the cluster it describes.

    Exits 1, with one line per problem on stderr, if the file cannot be used.
    """
    click.echo(summary(load_config_or_exit(file, node)))


@failoverd_main.command("run", short_help="Run the supervisor of this member in the foreground.")
@click.option(
    "--config", "config_file", required=True, type=click.Path(path_type=Path), help="The cluster's configuration file."
)
@click.option("--node", metavar="NAME", help="The member this host is. Default: the member named like this host.")
@click.pass_context
def run(ctx: click.Context, config_file: Path, node: str | None) -> None:
    """Run the supervisor: health checks, elections, promotion and fencing.

    Stops in order on SIGTERM or SIGINT: a leader hands over (fencing its
    PostgreSQL) before the process exits. Exits 78 (EX_CONFIG) when the
    configuration file is invalid, 1 with a one-line reason when the member
    cannot start safely. SIGHUP reloads the file (see docs/operations.md).
    """
    import asyncio

    from failoverd.daemon import StartupError, configure_logging, run_daemon

    config = load_config_or_exit(config_file, node, exit_code=EX_CONFIG)
    configure_logging(config)
    try:
        asyncio.run(run_daemon(config))
    except StartupError as error:
        click.echo(f"failoverd: cannot start: {error}", err=True)
        ctx.exit(1)


def summary(config: Config) -> str:
    """One screen on what the configured cluster is and what it survives."""
    spec = config.spec
    data = len(spec.data_members)
    lines = [
        f"cluster      {spec.name} ({config.source})",
        f"members      {len(spec.members)} ({data} data, {len(spec.members) - data} witness); "
        f"a majority is {spec.majority}",
        "",
        *_members_table(config),
        "",
        f"replication  {_replication_line(spec)}",
        *_timing_lines(spec.timing),
        f"vip          {f'{config.vip.address} on {config.vip.interface}' if config.vip else 'none'}",
        f"api          listen {config.api.listen}",
        f"state        {config.cluster.state_dir}",
    ]
    if config.local is None:
        lines.append("local        none: no --node given and no member is named like this host")
    return "\n".join(lines)


def _members_table(config: Config) -> list[str]:
    rows = [("name", "kind", "peer", "postgres", "priority", "nofailover", "local")]
    for node in config.nodes:
        rows.append(
            (
                node.name,
                node.kind.value,
                str(node.peer),
                str(node.postgres) if node.postgres else "-",
                str(node.priority),
                "yes" if node.nofailover else "no",
                "yes" if node is config.local else "",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _replication_line(spec: ClusterSpec) -> str:
    replication = spec.replication
    data = len(spec.data_members)
    if replication.mode is ReplicationMode.QUORUM:
        k = replication.sync_count
        what = f"quorum mode, ANY {k}: every commit on {k + 1} of {data} data members"
    else:
        what = f"async mode: a failover may lose up to {replication.max_lag_bytes} bytes of WAL"
    return f"{what}; {_survival(spec)}"


def _survival(spec: ClusterSpec) -> str:
    survived = _failures_survived(spec)
    if survived:
        return f"survives the loss of {survived} member{'s' if survived > 1 else ''}"
    spare = [m.name for m in spec.members if _survives(spec, {m.name})]
    if not spare:
        return "cannot lose any member without stopping writes"
    others = " or ".join(m.name for m in spec.members if m.name not in spare)
    return f"survives the loss of {' or '.join(spare)} only; losing {others} stops writes until it returns"


def _failures_survived(spec: ClusterSpec) -> int:
    """The most members that can fail, whichever they are, with writes going on.

    At most 9 members, so trying every set of lost members is cheap and
    leaves no room for a wrong closed formula.
    """
    names = [m.name for m in spec.members]
    survived = 0
    for count in range(1, len(names) + 1):
        if not all(_survives(spec, set(lost)) for lost in itertools.combinations(names, count)):
            break
        survived = count
    return survived


def _survives(spec: ClusterSpec, lost: set[str]) -> bool:
    """Whether writes continue (after an election if the primary may be lost) without the `lost` members."""
    remaining = [m for m in spec.members if m.name not in lost]
    if len(remaining) < spec.majority or not any(m.can_lead for m in remaining):
        return False
    data_left = sum(m.is_data for m in remaining)
    primary_may_be_lost = any(m.can_lead for m in spec.members if m.name in lost)
    # A commit needs the primary and k standbys; a new primary needs enough
    # data members to vouch for its WAL (D - k in quorum mode, itself in async).
    k = spec.replication.sync_count if spec.replication.mode is ReplicationMode.QUORUM else 0
    electable = not primary_may_be_lost or data_left >= spec.data_votes_needed(k)
    return data_left >= k + 1 and electable


def _timing_lines(t: Timing) -> list[str]:
    return [
        f"timing       heartbeat {t.heartbeat_interval_s:g} s, election timeout {t.election_timeout_min_s:g}-"
        f"{t.election_timeout_max_s:g} s, lease {t.lease_s:g} s",
        f"             safe lease bound {t.lease_limit_s:.4f} s (clock drift {t.clock_drift_max * 100:g}%, "
        f"fence margin {t.fence_margin_s:g} s)",
        _adaptive_line(t),
    ]


def _adaptive_line(t: Timing) -> str:
    floor = t.promise_floor_s
    if floor >= t.election_timeout_min_s:
        return "             adaptive promises off: election timeouts and lease as above"
    scale = floor / t.election_timeout_min_s
    return (
        f"             on a quick network: promise {floor:g} s, election timeout {t.election_timeout_min_s * scale:.3g}-"
        f"{t.election_timeout_max_s * scale:.3g} s, lease {t.lease_for(floor):.3g} s "
        f"(after {t.promise_window_s:g} s of quick acknowledgements)"
    )


# The simulator lives in its own package; registered here so that `failoverd
# --help` lists it beside the daemon's commands.
failoverd_main.add_command(simulate_command)
