"""HAProxy and PgBouncer in front of the e2e lab's cluster, from the files
operators copy (deploy/haproxy.cfg, deploy/pgbouncer.ini; rendered with the
lab's addresses by tests/support/e2e/proxies.py), run as the real Debian
programs in the client namespace as unprivileged users.

* HAProxy's write port follows GET /primary: only the primary is up there;
  its read port follows GET /replica?lag=16MB: only standbys, and a standby
  that falls more than 16 MiB behind is taken out.
* A failover (SIGKILL of the primary's postmaster; link of its host down)
  with writers through the VIP, HAProxy, PgBouncer -> VIP and PgBouncer ->
  HAProxy at once: no acknowledged write lost on any path, writes resume on
  the new primary on every path, and each path's write gap is recorded next
  to the VIP's (printed at the end of the session; `bench/proxies.py`
  measures them over several runs).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from tests.support import wait_for
from tests.support.e2e.checker import VipMonitor
from tests.support.e2e.lab import DATA, E2ELab, lab_dir
from tests.support.e2e.proxies import (
    FIRST_WRITE_BOUND_S,
    PATHS,
    READ_BACKEND,
    READ_LAG_BYTES,
    READ_PORT,
    WRITE_BACKEND,
    WRITE_PORT,
    Proxies,
    describe,
    proxies_unsupported_reason,
    run_paths,
)
from tests.support.e2e.scenarios import FAULTS, REPORT
from tests.support.postgres import find_bin_dir

REASON = proxies_unsupported_reason()
pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
    pytest.mark.skipif(REASON is not None, reason=f"proxies unavailable: {REASON}"),
]
_ids = itertools.count(50_000_000, 1_000_000)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab() -> AsyncIterator[tuple[E2ELab, VipMonitor, Proxies]]:
    bin_dir = find_bin_dir()
    assert bin_dir is not None  # skipped otherwise (conftest)
    with lab_dir() as base:
        e2e = E2ELab(base, bin_dir)
        monitor = VipMonitor(e2e)
        proxies = Proxies(e2e)
        try:
            e2e.build()
            e2e.start_all()
            primary = await e2e.wait_for(
                "bootstrap: a primary with the VIP and two streaming standbys", e2e.healthy, 180
            )
            await e2e.create_writer_role(primary)
            monitor.start()
            proxies.start()
            yield e2e, monitor, proxies
        finally:
            proxies.stop()
            monitor.stop()
            e2e.close()


def _uid(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return int(line.split()[1])


async def test_health_checks_follow_roles(lab: tuple[E2ELab, VipMonitor, Proxies]) -> None:
    e2e, _, proxies = lab
    primary = await e2e.wait_for("a healthy cluster", e2e.healthy, 120)
    # Writes to the primary only, reads to the standbys only.
    await proxies.wait_backends(primary)
    standbys = {n for n in DATA if n != primary}
    assert proxies.servers_up(WRITE_BACKEND) == {primary}
    assert proxies.servers_up(READ_BACKEND) == standbys
    for name in standbys:  # a standby is down on the write port because /primary said 503

        def refused(name: str = name) -> dict[str, str] | None:
            row = proxies.server_row(WRITE_BACKEND, name)
            return row if row["check_status"] == "L7STS" and row["check_code"] == "503" else None

        await e2e.wait_for(f"HAProxy's last check of {name} on the write port: 503", refused, 10)
    # The proxies run unprivileged, as started (by PID).
    for name, pid in proxies.pids().items():
        assert _uid(pid) != 0, name
    # Each port leads where its check says.
    assert {m for m, rec in proxies.read_through(WRITE_PORT, 3)} == {primary}
    assert all(not rec for _, rec in proxies.read_through(WRITE_PORT, 3))


async def test_read_port_serves_standbys_within_lag(lab: tuple[E2ELab, VipMonitor, Proxies]) -> None:
    e2e, _, proxies = lab
    primary = await e2e.wait_for("a healthy cluster", e2e.healthy, 120)
    await proxies.wait_backends(primary)
    standbys = sorted(n for n in DATA if n != primary)
    answers = proxies.read_through(READ_PORT, 8)
    assert all(rec for _, rec in answers), answers  # only servers in recovery
    assert {m for m, _ in answers} == set(standbys), answers  # both standbys share the reads

    # One standby stops receiving WAL (its replication connection blackholed
    # in its namespace; failoverd's peer traffic still flows, so it keeps
    # hearing the leader's position), and the primary writes more than the
    # read check's bound of WAL.
    lagging, current = standbys
    primary_address = e2e.address(primary)
    e2e.run_in(
        lagging,
        ["nft", "-f", "-"],
        stdin=f"""table inet fo_fault {{
  chain input {{ type filter hook input priority filter; policy accept; ip saddr {primary_address} tcp sport 5432 drop; }}
  chain output {{ type filter hook output priority filter; policy accept; ip daddr {primary_address} tcp dport 5432 drop; }}
}}
""",
    )
    try:
        await _write_wal(e2e, primary, READ_LAG_BYTES + 2 * 16 * 1024 * 1024)

        async def lagging_down() -> bool | None:
            return True if proxies.servers_up(READ_BACKEND) == {current} else None

        await e2e.wait_for(f"HAProxy takes {lagging} out of the reads", lagging_down, 30)
        status, body = proxies.api_get(lagging, "/replica?lag=16MB")
        assert status == 503 and body["name"] == lagging, body
        assert body["lag_bytes"] is None or body["lag_bytes"] > READ_LAG_BYTES, body

        # HAProxy's reason is the API's 503. Waited for, not read once: a
        # check can be in flight or cut short by a loaded machine (CI saw one
        # row with check_code 0); the next one, 250 ms later, answers 503.
        async def checked_503() -> bool | None:
            row = proxies.server_row(READ_BACKEND, lagging)
            return True if (row["check_status"], row["check_code"]) == ("L7STS", "503") else None

        await wait_for(
            f"HAProxy's check of {lagging} answered 503",
            checked_503,
            10,
            interval_s=0.1,
            detail=lambda: str(proxies.server_row(READ_BACKEND, lagging)),
        )
        answers = proxies.read_through(READ_PORT, 6)
        assert answers == [(current, True)] * 6, answers
        # Writes are unaffected (ANY 1: the other standby acknowledges).
        assert proxies.servers_up(WRITE_BACKEND) == {primary}
    finally:
        e2e.clear_filters(lagging)
    await proxies.wait_backends(primary, timeout_s=90)  # caught up: back in the reads
    answers = proxies.read_through(READ_PORT, 6)
    assert {m for m, _ in answers} == set(standbys) and all(rec for _, rec in answers), answers


async def _write_wal(e2e: E2ELab, primary: str, nbytes: int) -> None:
    """At least `nbytes` of WAL on `primary`: a WAL message then a segment
    switch, which moves the position to the next 16 MiB boundary."""
    a = e2e.adapters[primary]
    conn = await asyncpg.connect(
        host=str(a.socket_dir), port=a.pg.port, user="postgres", database="postgres", timeout=10
    )
    try:
        start = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        while await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn") - start < nbytes:
            await conn.execute("SELECT pg_logical_emit_message(false, 'failoverd-test', 'x')")
            await conn.execute("SELECT pg_switch_wal()")
    finally:
        await conn.close()


@pytest.mark.parametrize("name", ["kill-postmaster", "isolate-primary"])
async def test_failover_through_proxies(lab: tuple[E2ELab, VipMonitor, Proxies], name: str) -> None:
    e2e, monitor, proxies = lab
    r = await run_paths(e2e, monitor, proxies, FAULTS[name], next(_ids))
    REPORT.extend(describe(r))
    assert r.problems == [], (r.problems, e2e.log_tails())
    assert r.dual_primary_samples == 0 and r.dual_vip == 0
    assert r.new_primary != r.old_primary and r.term_after > r.term_before, r
    assert set(r.paths) == {p.name for p in PATHS}
    for p in r.paths.values():
        assert p.lost == 0, p
        # Writes resumed on the new primary through every path (liveness
        # only: the gap is recorded, not judged).
        assert p.first_write_s is not None and p.first_write_s < FIRST_WRITE_BOUND_S, p
        assert r.new_primary in p.members_after, p
