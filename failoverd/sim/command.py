"""`failoverd simulate`: run the deterministic simulator from the command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from failoverd.config.load import ConfigError, load_config
from failoverd.core.node import SAFEGUARDS as CORE_SAFEGUARDS
from failoverd.core.spec import ClusterSpec, SpecError
from failoverd.runtime.supervisor import SAFEGUARDS as EXECUTOR_SAFEGUARDS
from failoverd.sim.runner import (
    LIVENESS_BOUND_S,
    SAFETY_S,
    SHAPES,
    SeedResult,
    Summary,
    preset_spec,
    run_seeds,
    summarize,
)


@click.command("simulate", short_help="Hammer the election protocol with faults in a deterministic simulator.")
@click.option(
    "--seeds",
    "seed_count",
    type=click.IntRange(1, 1_000_000),
    default=100,
    show_default=True,
    help="How many seeds to run (seeds 0..N-1, or from --first-seed).",
)
@click.option("--first-seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=None, help="Run this one seed and print its trace.")
@click.option(
    "--nodes",
    "data_nodes",
    type=click.IntRange(1, 8),
    default=3,
    show_default=True,
    help="Data members (ignored with --config).",
)
@click.option("--witness", is_flag=True, help="Add a witness member (ignored with --config).")
@click.option(
    "--sync-count", type=click.IntRange(1, 7), default=1, show_default=True, help="k in ANY k (ignored with --config)."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Use the members, replication and timing of this configuration file.",
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    type=click.Choice(["all", *SHAPES]),
    help="Run a named cluster shape instead of --nodes/--witness/--sync-count; repeatable; 'all' runs "
    "every shape, one summary line each.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Processes to use (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--disable-safeguard",
    "disabled",
    multiple=True,
    type=click.Choice(sorted(CORE_SAFEGUARDS | EXECUTOR_SAFEGUARDS)),
    hidden=True,
    help="Switch off one safety mechanism to show the simulator catches the result.",
)
def simulate_command(
    seed_count: int,
    first_seed: int,
    seed: int | None,
    data_nodes: int,
    witness: bool,
    sync_count: int,
    config_file: Path | None,
    shapes: tuple[str, ...],
    workers: int | None,
    as_json: bool,
    disabled: tuple[str, ...],
) -> None:
    """Run the real protocol core against simulated hosts, networks, clocks and
    PostgreSQL servers with random faults, checking the safety invariants after
    every step. Exits 1 on any violation and prints how to replay it."""
    seeds = [seed] if seed is not None else list(range(first_seed, first_seed + seed_count))
    if shapes:
        names = list(SHAPES) if "all" in shapes else list(dict.fromkeys(shapes))
        if config_file is not None or (seed is not None and len(names) > 1):
            raise click.UsageError("--shape runs preset shapes: not with --config, and --seed takes one shape")
        if len(names) > 1:
            _run_matrix(names, seeds, workers, as_json, disabled)
            return
        spec = preset_spec(**SHAPES[names[0]])
        shape_args = f"--shape {names[0]}"
    else:
        spec = _spec(config_file, data_nodes, witness, sync_count)
        shape_args = (
            f"--config {config_file}"
            if config_file
            else f"--nodes {data_nodes} --sync-count {sync_count}" + (" --witness" if witness else "")
        )
    started = time.monotonic()
    results = run_seeds(spec, seeds, frozenset(disabled), workers=workers, keep_traces=seed is not None)
    wall_s = time.monotonic() - started
    summary = summarize(results)
    if as_json:
        click.echo(json.dumps(_summary_dict(spec, summary, wall_s, disabled), indent=2))
    else:
        _print_summary(spec, summary, wall_s, disabled)
    if seed is not None and results[0].ok:
        click.echo("\ntrace (last events):")
        click.echo("\n".join(results[0].trace))
    if summary.first_violation is not None:
        _print_violation(summary.first_violation, shape_args, disabled)
        sys.exit(1)


def _run_matrix(
    names: list[str], seeds: list[int], workers: int | None, as_json: bool, disabled: tuple[str, ...]
) -> None:
    """Every named shape over the same seeds: one summary line per shape (as
    JSON lines with --json), each printed as soon as its shape is done, then
    the replay command of each shape's first violation. Exits 1 on any."""
    failed: list[tuple[str, Summary]] = []
    for name in names:
        spec = preset_spec(**SHAPES[name])
        started = time.monotonic()
        summary = summarize(run_seeds(spec, seeds, frozenset(disabled), workers=workers, keep_traces=False))
        wall_s = time.monotonic() - started
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "shape": name,
                        **_summary_dict(spec, summary, wall_s, disabled),
                        "violating_seeds": list(summary.violating_seeds),
                    }
                )
            )
        else:
            click.echo(
                f"{name:<15} seeds {summary.seeds} ({seeds[0]}..{seeds[-1]})  violations {summary.violations}"
                f"  failovers {summary.failovers}  failover median {_fmt(summary.failover_median_s)}"
                f" max {_fmt(summary.failover_max_s)}  recovery max {_fmt(summary.recovery_max_s)}"
                f"  wall {wall_s:.0f} s",
            )
        if summary.first_violation is not None:
            failed.append((name, summary))
    for name, summary in failed:
        click.echo(f"\n{name}: violating seeds {list(summary.violating_seeds)[:50]}", err=True)
        if summary.first_violation is not None:
            _print_violation(summary.first_violation, f"--shape {name}", disabled)
    if failed:
        sys.exit(1)


def _spec(config_file: Path | None, data_nodes: int, witness: bool, sync_count: int) -> ClusterSpec:
    if config_file is not None:
        try:
            return load_config(config_file, None).spec
        except ConfigError as error:
            for problem in error.problems:
                click.echo(f"{error.source}: {problem}", err=True)
            sys.exit(2)
    try:
        return preset_spec(data_nodes=data_nodes, witness=witness, sync_count=sync_count)
    except SpecError as error:
        raise click.UsageError(str(error)) from None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _print_summary(spec: ClusterSpec, s, wall_s: float, disabled) -> None:
    data = len(spec.data_members)
    click.echo(
        f"cluster            {data} data + {len(spec.members) - data} witness, "
        f"{spec.replication.mode.value} k={spec.replication.sync_count}, lease {spec.timing.lease_s:g} s, "
        f"election timeout {spec.timing.election_timeout_min_s:g}-{spec.timing.election_timeout_max_s:g} s"
    )
    if disabled:
        click.echo(f"safeguards off     {', '.join(disabled)}")
    click.echo(f"seeds run          {s.seeds} ({SAFETY_S:g} s of faults + healing each)")
    click.echo(f"failovers          {s.failovers}")
    click.echo(
        f"failover time      median {_fmt(s.failover_median_s)}, max {_fmt(s.failover_max_s)} "
        "(last acknowledged write on the old primary to first on the new, simulated time)"
    )
    click.echo(f"recovery on heal   max {_fmt(s.recovery_max_s)} (bound {LIVENESS_BOUND_S:g} s)")
    click.echo(f"violations         {s.violations}")
    click.echo(f"wall time          {wall_s:.1f} s")


def _summary_dict(spec: ClusterSpec, s, wall_s: float, disabled) -> dict:
    return {
        "members": [m.name for m in spec.members],
        "safeguards_disabled": list(disabled),
        "seeds": s.seeds,
        "failovers": s.failovers,
        "failover_median_s": s.failover_median_s,
        "failover_max_s": s.failover_max_s,
        "recovery_max_s": s.recovery_max_s,
        "violations": s.violations,
        "first_violation": None
        if s.first_violation is None
        else {"seed": s.first_violation.seed, "violation": s.first_violation.violation},
        "wall_s": round(wall_s, 2),
    }


def _print_violation(r: SeedResult, shape: str, disabled) -> None:
    click.echo(f"\nVIOLATION in seed {r.seed}: {r.violation}", err=True)
    click.echo("trace (last events before the violation):", err=True)
    click.echo("\n".join(r.trace), err=True)
    flags = "".join(f" --disable-safeguard {d}" for d in disabled)
    click.echo(f"\nreplay: failoverd simulate --seed {r.seed} {shape}{flags}", err=True)
