"""How soon the supervisor probes the local PostgreSQL again (docs/design.md
§11, "Probe cadence").

A probe is the largest part of an idle member's cost. A member whose server
is doing what the cluster expects of it (the leader's primary is promoted and
answering; a follower's standby streams from the leader and has reported a
fresh position) probes every `Timing.healthy_probe_interval_s`; anything else
is watched every heartbeat, so a server that stops answering is seen stalled
or unresponsive at the usual pace once a probe has noticed it. A crash of the
postmaster does not wait for either: its pidfd wakes the prober at once.
"""

from __future__ import annotations

from failoverd.core.context import Context
from failoverd.core.state import PgRole, Role


def probe_interval(ctx: Context) -> float:
    """Seconds from the end of one probe to the start of the next."""
    timing = ctx.timing
    return timing.healthy_probe_interval_s if settled(ctx) else timing.heartbeat_interval_s


def settled(ctx: Context) -> bool:
    """Nothing about the local server is in question: it holds the role the
    cluster gives it, and no switchover, restart or rebuild is under way. (An
    action that stops or restarts it shows in the probes: stopped, or not
    streaming from the leader.)"""
    pg = ctx.pg
    if pg is None or ctx.restarting or (ctx.rebuild is not None and ctx.rebuild.running):
        return False
    if ctx.state.switchover_to is not None:
        return False
    if ctx.role is Role.LEADER:
        lead = ctx.leading()
        return lead.primary_ready and lead.transfer is None and pg.role is PgRole.PRIMARY
    if ctx.role is Role.FOLLOWER:
        return (
            ctx.leader is not None
            and ctx.leader_primary_ready
            and pg.role is PgRole.STANDBY
            and pg.following == ctx.leader
            and ctx.position_fresh()
        )
    return False
