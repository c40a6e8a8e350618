"""What a SIGHUP may change in a running supervisor, decided without side effects.

Live: protocol timing (under the rule below), hooks, log level and format,
and [postgres.parameters] / [postgres] hba (written and reloaded into the
local PostgreSQL; some of its settings then wait for its restart).
Everything else (members, addresses, paths, the other [postgres] keys, the
VIP, the API) needs a restart of failoverd; a reload logs which keys changed
and keeps running with the old values for them.

Timing and the rolling reload. Operators reload one member after another, so
for a while some members run the old timing and some the new. The lease rule
must then hold across them: a leader on either timing, acknowledged by a
voter on either timing. So a timing change is applied only if

    new lease fits old election timeout   and   old lease fits new election timeout

(each "fits" being the Timing rule `lease/(1-drift) + fence_margin <=
election_timeout_min/(1+drift)` with the larger drift). A change that fails it
is refused with the two-step route that works: raise election timeouts first,
reload everywhere, then lengthen the lease (and the reverse to shorten).
"""

from __future__ import annotations

import dataclasses

from failoverd.config.load import Config, HooksConfig, LoggingConfig, PostgresSettings
from failoverd.core.spec import Timing


@dataclasses.dataclass(frozen=True, slots=True)
class ReloadPlan:
    timing: Timing | None  # apply this timing (None: unchanged or refused)
    hooks: HooksConfig | None
    logging: LoggingConfig | None
    pg_settings: PostgresSettings | None  # PostgreSQL parameters and hba lines to apply
    needs_restart: tuple[str, ...]  # changed sections that only a restart applies
    refused: tuple[str, ...]  # changes that were refused, with the reason

    @property
    def changes_anything(self) -> bool:
        return any(x is not None for x in (self.timing, self.hooks, self.logging, self.pg_settings))


def lease_fits(leader: Timing, voter: Timing) -> bool:
    """Whether a lease taken under `leader`'s timing expires, with the fence
    margin, before a voter on `voter`'s timing may vote again."""
    drift = max(leader.clock_drift_max, voter.clock_drift_max)
    return leader.lease_s / (1 - drift) + leader.fence_margin_s < voter.election_timeout_min_s / (1 + drift)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    needs_restart: list[str] = []
    refused: list[str] = []
    if dataclasses.replace(old.spec, timing=new.spec.timing) != new.spec:
        needs_restart.append("cluster membership or replication")
    for section in ("cluster", "nodes", "local", "postgres_defaults", "vip", "api"):
        if getattr(old, section) != getattr(new, section):
            needs_restart.append({"postgres_defaults": "postgres", "local": "local member"}.get(section, section))
    timing = None
    if new.spec.timing != old.spec.timing:
        a, b = old.spec.timing, new.spec.timing
        if lease_fits(b, a) and lease_fits(a, b):
            timing = b
        else:
            refused.append(
                "timing: while members reload one by one, a lease of "
                f"{max(a.lease_s, b.lease_s)} s would not be safe against an election timeout of "
                f"{min(a.election_timeout_min_s, b.election_timeout_min_s)} s; change election timeouts "
                "and the lease in two reloads (to lengthen the lease, raise the timeouts first)"
            )
    hooks = new.hooks if new.hooks != old.hooks else None
    logging = new.logging if new.logging != old.logging else None
    pg_settings = new.pg_settings if new.pg_settings != old.pg_settings else None
    return ReloadPlan(timing, hooks, logging, pg_settings, tuple(needs_restart), tuple(refused))
