"""What the REST API says, as pure functions of a supervisor's status: the
member object (GET /health), the cluster view (GET /cluster), history and the
Prometheus text of GET /metrics. Shapes are documented in docs/api.md.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, overload

from failoverd import __version__
from failoverd.config.load import Config, NodeConfig
from failoverd.core.state import HistoryEntry, PgRole, Position, Role
from failoverd.core.status import MemberStatus
from failoverd.runtime.supervisor import SupervisorCounters

_LAG_RE = re.compile(r"([0-9]{1,19})\s*(B|kB|MB|GB|TB)?")
_UNITS = {None: 1, "B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
SCHEDULE_AHEAD_MAX_S = 30 * 86400.0
SCHEDULE_PAST_SLACK_S = 60.0  # an "at" this little in the past means now (clock skew, slow typing)


class BadRequest(ValueError):
    """The request is malformed; the message says how (answered 400)."""


# ------------------------------------------------------------------ parsing


def parse_lag(text: str) -> int:
    """`?lag=` in bytes, optionally with a PostgreSQL-style unit (16MB = 16 MiB)."""
    match = _LAG_RE.fullmatch(text.strip())
    if match is None:
        raise BadRequest(f"lag: {text[:40]!r} is not a number of bytes (e.g. 1048576 or 16MB)")
    return int(match[1]) * _UNITS[match[2]]


def parse_time(value: Any, now: float) -> float:
    """An `at`: seconds since the epoch, or an ISO 8601 time with a time zone."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest("at: not a time (seconds since the epoch or ISO 8601 with a time zone)")
    if isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"at: {value[:40]!r} is not an ISO 8601 time") from None
        if when.tzinfo is None:
            raise BadRequest("at: give a time zone (e.g. 2030-01-01T03:00:00+00:00): the members may not share one")
        seconds = when.timestamp()
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise BadRequest("at: not a finite time")
    if seconds < now - SCHEDULE_PAST_SLACK_S:
        raise BadRequest(f"at: {iso(seconds)} is in the past")
    if seconds > now + SCHEDULE_AHEAD_MAX_S:
        raise BadRequest(f"at: more than {SCHEDULE_AHEAD_MAX_S / 86400:g} days ahead")
    return seconds


def fields(
    body: Any, *, required: Mapping[str, type | tuple] | None = None, optional: Mapping[str, type | tuple] | None = None
) -> dict[str, Any]:
    """The body's fields, checked: an object with exactly these keys and types (null = absent)."""
    required, optional = required or {}, optional or {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        known = ", ".join([*required, *optional]) or "none"
        raise BadRequest(f"unknown field {unknown[0][:40]!r} (fields: {known})")
    out: dict[str, Any] = {}
    for key, kind in {**required, **optional}.items():
        value = body.get(key)
        if value is None:
            if key in required:
                raise BadRequest(f"{key}: missing")
            out[key] = None
            continue
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise BadRequest(f"{key}: not {_kind_name(kind)}")
        out[key] = value
    return out


def _kind_name(kind: type | tuple) -> str:
    names = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def member_name(config: Config, value: str, key: str) -> str:
    if not any(n.name == value for n in config.nodes):
        raise BadRequest(f"{key}: {value[:63]!r} is not a member (members: {', '.join(n.name for n in config.nodes)})")
    return value


# -------------------------------------------------------------------- views


@overload
def iso(wall_time: float) -> str: ...
@overload
def iso(wall_time: None) -> None: ...
@overload
def iso(wall_time: float | None) -> str | None: ...
def iso(wall_time: float | None) -> str | None:
    if wall_time is None:
        return None
    return datetime.datetime.fromtimestamp(wall_time, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lag_bytes(primary: Position | None, mine: Position | None) -> int | None:
    """How far `mine` trails the primary's WAL; None when it cannot be told
    (unknown, or another timeline: the standby has not followed yet)."""
    if primary is None or mine is None or primary.timeline != mine.timeline:
        return None
    return max(0, primary.lsn - mine.lsn)


def member_view(
    status: MemberStatus, node: NodeConfig, api: str, pending_restart: tuple[str, ...] = ()
) -> dict[str, Any]:
    """This member, as GET /health reports it."""
    pg = status.pg
    postgres = None
    if node.postgres is not None:
        position = None if pg is None else pg.position
        postgres = {
            "host": node.postgres.host,
            "port": node.postgres.port,
            "state": "unknown" if pg is None else pg.role.value,
            "timeline": None if position is None else position.timeline,
            "lsn": None if position is None else lsn_text(position.lsn),
            "lsn_bytes": None if position is None else position.lsn,
            "following": None if pg is None else pg.following,
            "streaming": status.streaming_standby,
            "observed_s_ago": None if status.pg_age_s is None else round(status.pg_age_s, 3),
            "pending_restart": list(pending_restart),  # settings that wait for a restart
            "restarting": status.restarting,
        }
    rebuild = status.rebuild
    failover = status.last_failover
    return {
        "name": status.name,
        "kind": node.kind.value,
        "api": api,
        "role": status.role.value,
        "term": status.term,
        "leader": status.leader,
        "leader_live": status.leader_live,
        "writable": status.writable,
        "primary_ready": status.primary_ready,
        "lease_remaining_s": None if status.lease_remaining_s is None else round(status.lease_remaining_s, 3),
        "promise_s": round(status.promise_s, 3),
        "postgres": postgres,
        "lag_bytes": lag_bytes(status.primary_position, None if pg is None else pg.position),
        "vip_held": status.vip_held,
        "vip_error": status.vip_error,
        "paused": status.paused,
        "switchover": switchover_view(status.switchover_to, status.switchover_at),
        "state_version": [status.state_stamp.written_term, status.state_stamp.version],
        "reinit": None
        if rebuild is None
        else {
            "from": rebuild.leader,
            "started": iso(rebuild.started_at),
            "finished": iso(rebuild.finished_at),
            "running": rebuild.running,
            "error": rebuild.error,
        },
        "last_failover": None
        if failover is None
        else {
            "term": failover.term,
            "reason": failover.reason,
            "duration_s": failover.outage_s,
            "wall_time": failover.wall_time,
            "time": iso(failover.wall_time),
        },
        "version": __version__,
    }


def switchover_view(to: str | None, at: float | None) -> dict[str, Any] | None:
    if to is None and at is None:
        return None
    return {"to": to, "at": at, "at_iso": iso(at)}


def history_view(history: Iterable[HistoryEntry]) -> list[dict[str, Any]]:
    return [
        {
            "term": h.term,
            "from": h.from_node,
            "to": h.to_node,
            "reason": h.reason,
            "position": None if h.position is None else str(h.position),
            "wall_time": h.wall_time,
            "time": iso(h.wall_time),
        }
        for h in history
    ]


def cluster_view(config: Config, members: list[dict[str, Any]], answered_by: str) -> dict[str, Any]:
    """The cluster from every member's own report (unreachable ones marked);
    lag is measured against the writable primary's WAL position."""
    reached = [m for m in members if m.get("reachable")]
    leaders = sorted((m for m in reached if m["role"] == "leader"), key=lambda m: -m["term"])
    primaries = [m for m in reached if m["writable"]]
    primary = primaries[0] if len(primaries) == 1 else None
    # The newest replicated state: the leader's, or the highest version any member holds.
    newest = leaders[0] if leaders else max(reached, key=lambda m: tuple(m["state_version"]), default=None)
    base = None
    if primary is not None and primary["postgres"] is not None and primary["postgres"]["lsn_bytes"] is not None:
        base = Position(primary["postgres"]["timeline"], primary["postgres"]["lsn_bytes"])
    for m in reached:
        pg = m["postgres"]
        if pg is None:
            continue
        mine = None if pg["lsn_bytes"] is None else Position(pg["timeline"], pg["lsn_bytes"])
        m["lag_bytes"] = 0 if m is primary else lag_bytes(base, mine)
    holders = [m["name"] for m in reached if m["vip_held"]]
    return {
        "cluster": config.spec.name,
        "answered_by": answered_by,
        "leader": leaders[0]["name"] if leaders else None,
        "primary": None if primary is None else primary["name"],
        "primaries": [m["name"] for m in primaries],
        "term": max((m["term"] for m in reached), default=None),
        "paused": None if newest is None else newest["paused"],
        "switchover": None if newest is None else newest["switchover"],
        "vip": None if config.vip is None else {"address": str(config.vip.address), "holders": holders},
        "members": members,
    }


# ------------------------------------------------------------------ metrics


class Metrics:
    """Prometheus text exposition (format 0.0.4), one family at a time."""

    def __init__(self, member: str) -> None:
        self.member = member
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        samples = list(samples)
        if not samples:
            return
        self.lines += [f"# HELP failoverd_{name} {help_text}", f"# TYPE failoverd_{name} {kind}"]
        for labels, value in samples:
            shown = ",".join(f'{k}="{_escape(v)}"' for k, v in {"member": self.member, **labels}.items())
            self.lines.append(f"failoverd_{name}{{{shown}}} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float | None, **labels: str) -> None:
        if value is not None:
            self.family(name, kind, help_text, [(labels, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value)) if math.isfinite(value) else ("NaN" if math.isnan(value) else "+Inf")


ROLES = ("follower", "pre_candidate", "candidate", "leader")


def metrics_text(
    status: MemberStatus,
    counters: SupervisorCounters,
    *,
    node: NodeConfig,
    peer_received: int,
    peer_rejected: Mapping[str, int],
    api_rejected: Mapping[str, int],
) -> str:
    m = Metrics(status.name)
    m.one("info", "gauge", "Always 1; labels carry the version.", 1, version=__version__)
    m.family(
        "role", "gauge", "1 for the member's protocol role.", [({"role": r}, r == status.role.value) for r in ROLES]
    )
    m.one(
        "primary", "gauge", "1 while this member is the writable primary (what GET /primary reports).", status.writable
    )
    m.one("term", "gauge", "Current term.", status.term)
    m.one("lease_remaining_seconds", "gauge", "Leader only: time left on the lease.", status.lease_remaining_s)
    m.one(
        "promise_seconds",
        "gauge",
        "The promise of the last heartbeat sent (leader) or taken: election timeouts and leases scale with it.",
        status.promise_s,
    )
    m.one("paused", "gauge", "1 while the cluster is paused.", status.paused)
    m.one("leader_live", "gauge", "1 while this member leads or heard its leader lately.", status.leader_live)
    m.one(
        "sync_count", "gauge", "k: standbys every commit waits for (quorum mode; 0 in async mode).", status.sync_count
    )
    m.one(
        "streaming_standbys",
        "gauge",
        "Leader only: standbys streaming from it, heard lately.",
        status.streaming_standbys,
    )
    m.one("vip_held", "gauge", "1 while this member holds the virtual IP.", status.vip_held)
    if node.postgres is not None:
        state = "unknown" if status.pg is None else status.pg.role.value
        m.family(
            "postgres_state",
            "gauge",
            "1 for the state of the local PostgreSQL.",
            [({"state": s}, s == state) for s in (*(r.value for r in PgRole), "unknown")],
        )
        position = None if status.pg is None else status.pg.position
        if position is not None:
            m.one("timeline", "gauge", "Timeline of the local PostgreSQL's WAL position.", position.timeline)
            m.one("wal_position_bytes", "gauge", "LSN of the local PostgreSQL's WAL position.", position.lsn)
        m.one(
            "replication_lag_bytes",
            "gauge",
            "Standby: bytes of WAL behind the primary as known here.",
            None if status.role is Role.LEADER else lag_bytes(status.primary_position, position),
        )
    events = counters.events
    m.one("elections_started_total", "counter", "Elections this member started.", events["election_started"])
    m.one("elections_won_total", "counter", "Elections this member won.", sum(counters.elected.values()))
    m.family(
        "promotions_total",
        "counter",
        "Promotions of the local PostgreSQL, by why this member led.",
        [({"reason": r}, n) for r, n in sorted(counters.promotions.items())],
    )
    m.one(
        "failovers_total",
        "counter",
        "Promotions here that replaced another primary (not the bootstrap).",
        counters.failovers,
    )
    failover = status.last_failover
    m.one(
        "last_failover_duration_seconds",
        "gauge",
        "Last failover to this member: last heartbeat of the previous leader to PostgreSQL seen writable.",
        None if failover is None else failover.outage_s,
    )
    m.one(
        "last_failover_timestamp_seconds",
        "gauge",
        "When the last failover to this member completed (epoch).",
        None if failover is None else failover.wall_time,
    )
    m.one("fences_total", "counter", "Fences of the local PostgreSQL asked for by the core.", events["fence"])
    m.one("leases_lost_total", "counter", "Leases this member lost while leading.", events["lease_lost"])
    m.one("votes_granted_total", "counter", "Votes granted.", events["vote_granted"])
    m.one("votes_refused_total", "counter", "Votes refused.", events["vote_refused"])
    m.family(
        "core_events_total",
        "counter",
        "Every structured event of the protocol core, by name.",
        [({"event": e}, n) for e, n in sorted(events.items())],
    )
    m.one("peer_messages_received_total", "counter", "Peer messages accepted.", peer_received)
    m.family(
        "peer_messages_rejected_total",
        "counter",
        "Peer messages refused, by reason.",
        [({"reason": r}, n) for r, n in sorted(peer_rejected.items())],
    )
    m.family(
        "api_requests_rejected_total",
        "counter",
        "API requests refused, by reason.",
        [({"reason": r}, n) for r, n in sorted(api_rejected.items())],
    )
    return m.text()
