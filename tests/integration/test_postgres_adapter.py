"""PostgresAdapter against real PostgreSQL servers on 127.0.0.1: bootstrap,
clone, quorum commit, fencing, promotion, re-pointing, rewind, re-clone.

One scenario runs the life of a three-member cluster in order, since each
step needs the state the previous one left; smaller tests cover the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from failoverd.adapters import processes, programs
from failoverd.adapters.postgres import setup
from failoverd.adapters.postgres.adapter import PostgresAdapter
from failoverd.config.load import NodeConfig
from failoverd.core.state import PgObservation, PgRole, Position
from tests.support import wait_for
from tests.support.postgres import SECRET, adapters, connect, make_config, prepare_node_dirs, query


async def probe(adapter: PostgresAdapter) -> PgObservation:
    return await adapter.probe(time.monotonic())


async def streaming_from(adapter: PostgresAdapter, leader: str, timeline: int) -> PgObservation | None:
    obs = await probe(adapter)
    ok = obs.role is PgRole.STANDBY and obs.following == leader and obs.position and obs.position.timeline == timeline
    return obs if ok else None


async def replayed(adapter: PostgresAdapter, lsn: int) -> bool:
    text = await query(adapter, "SELECT pg_last_wal_replay_lsn()::text")
    return text is not None and setup.parse_lsn(text) >= lsn


async def current_lsn(adapter: PostgresAdapter) -> int:
    return setup.parse_lsn(await query(adapter, "SELECT pg_current_wal_lsn()::text"))


async def test_probe_reports_absent_for_an_empty_directory(base_dir: Path, bin_dir: Path, os_user: str) -> None:
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user)
    db1 = adapters(config)["db1"]
    assert (await db1.probe(123.5)) == PgObservation(PgRole.ABSENT, 123.5)
    db1.data_dir.mkdir(parents=True)  # an empty directory is no cluster either
    assert (await probe(db1)).role is PgRole.ABSENT
    assert db1.postmaster_pid() is None
    await db1.stop("immediate")  # stopping nothing is fine
    (db1.data_dir / "notes.txt").write_text("not a cluster, and not ours to replace")
    with pytest.raises(FileExistsError, match="not replacing it"):
        await db1.bootstrap_primary()
    assert [p.name for p in db1.data_dir.iterdir()] == ["notes.txt"]


async def test_cluster_life(base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None) -> None:
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user)
    prepare_node_dirs(config, owner)
    pg = adapters(config)
    db1, db2, db3 = pg["db1"], pg["db2"], pg["db3"]
    members = {n.name: n for n in config.nodes}

    # Bootstrap: the core asks for sync settings before Promote, with no data directory yet.
    await db1.configure_sync(1, ("db2", "db3"))
    await db1.promote()
    obs = await probe(db1)
    assert obs.role is PgRole.PRIMARY and obs.position is not None and obs.position.timeline == 1
    assert obs.following is None
    assert (db1.data_dir / "PG_VERSION").exists() and db1.postmaster_pid() is not None
    if owner is not None:
        assert (db1.data_dir / setup.NODE_CONF).stat().st_uid == owner[0]
        assert (db1.passfile.stat().st_uid, db1.passfile.stat().st_mode & 0o777) == (owner[0], 0o600)
    assert await query(db1, "SELECT current_setting('synchronous_standby_names')") == 'ANY 1 ("db2", "db3")'
    assert await query(db1, "SHOW data_checksums") == "on"
    with pytest.raises(Exception, match="already holds a cluster"):
        await db1.bootstrap_primary()

    # Clones stream from the primary, each through its own slot.
    await asyncio.gather(db2.follow(members["db1"]), db3.follow(members["db1"]))
    for standby in (db2, db3):
        obs = await wait_for("standby streaming from db1", lambda s=standby: streaming_from(s, "db1", 1))
        assert obs.position is not None and obs.position >= Position(1, 0)
    pid = db2.postmaster_pid()
    await db2.follow(members["db1"])  # already streaming from db1: nothing to do
    assert db2.postmaster_pid() == pid
    await db1.ensure_slots(("db1", "db2", "db3"))
    slots = await query(
        db1, "SELECT string_agg(slot_name || ':' || active, ',' ORDER BY slot_name) FROM pg_replication_slots"
    )
    assert slots == "db2:true,db3:true"

    # Quorum commit: a write commits because one of the two standbys confirms it.
    async with connect(db1) as conn:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
        await asyncio.wait_for(conn.execute("INSERT INTO t VALUES (1, 'acknowledged')"), 10)
        states = await conn.fetchval("SELECT string_agg(sync_state, ',') FROM pg_stat_replication")
    assert states == "quorum,quorum"
    committed = await current_lsn(db1)
    for standby in (db2, db3):
        await wait_for("replay", lambda s=standby: replayed(s, committed))

    # db3 lets go of its upstream; db2 is promoted while db1 still runs, so that
    # db1 can then write WAL past the fork, as a primary cut off from its quorum would.
    await db3.start_standby(None)
    await wait_for("db3 detached", lambda: _following_none(db3))
    db3_pid = db3.postmaster_pid()
    await db2.configure_sync(1, ("db1", "db3"))  # on a standby: applies once promoted
    await db2.promote()
    obs = await probe(db2)
    assert obs.role is PgRole.PRIMARY and obs.position is not None
    assert obs.position.timeline == 2 and obs.position.lsn >= committed
    async with connect(db1, synchronous_commit="local") as conn:
        await conn.execute("INSERT INTO t VALUES (2, 'never acknowledged by a quorum')")
    diverged = await current_lsn(db1)

    # Fencing: an immediate stop; the position is the true end of WAL, not a checkpoint.
    await db1.stop("immediate")
    assert db1.postmaster_pid() is None
    obs = await probe(db1)
    assert obs.role is PgRole.STOPPED and obs.position is not None
    assert obs.position.timeline == 1 and obs.position.lsn >= diverged
    checkpoint = setup.parse_controldata(
        (await programs.run([str(bin_dir / "pg_controldata"), str(db1.data_dir)], user=os_user, timeout_s=10)).stdout
    )
    assert setup.parse_lsn(checkpoint["Latest checkpoint location"]) < obs.position.lsn
    await db1.stop("immediate")  # idempotent

    # db3 never went past the fork: it is re-pointed at db2 without a restart.
    await db3.follow(members["db2"])
    await wait_for("db3 streaming from db2", lambda: streaming_from(db3, "db2", 2))
    assert db3.postmaster_pid() == db3_pid

    # db1 diverged: it is rewound and streams from db2; its unacknowledged row is gone.
    await db1.follow(members["db2"])
    await wait_for("db1 streaming from db2", lambda: streaming_from(db1, "db2", 2))
    assert not list(base_dir.glob("db1/data.failed-*")), "rewind should have worked without a re-clone"
    # The slots db1 kept as a primary would pin WAL on it as a standby.
    assert await query(db1, "SELECT count(*) FROM pg_replication_slots") == 0
    async with connect(db2) as conn:
        await asyncio.wait_for(conn.execute("INSERT INTO t VALUES (3, 'after failover')"), 10)
    after = await current_lsn(db2)
    await wait_for("db1 replay", lambda: replayed(db1, after))
    assert await query(db1, "SELECT string_agg(id::text, ',' ORDER BY id) FROM t") == "1,3"
    assert await query(db2, "SELECT count(*) FROM pg_replication_slots WHERE active") == 2

    # A frozen postmaster is unresponsive, and a fence still stops it.
    pid = db3.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        obs = await probe(db3)
        assert obs.role is PgRole.UNRESPONSIVE and obs.position is None
        assert time.monotonic() - started < db3.probe_timeout_s + 0.5
        await db3.stop("immediate")
        assert db3.postmaster_pid() is None
    finally:
        with contextlib.suppress(ProcessLookupError):  # SIGKILLed by the fence, as it should be
            os.kill(pid, signal.SIGCONT)
    assert (await probe(db3)).role is PgRole.STOPPED


async def _following_none(adapter: PostgresAdapter) -> bool:
    obs = await probe(adapter)
    return obs.role is PgRole.STANDBY and obs.following is None


async def primary_and_standby(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> tuple[dict[str, PostgresAdapter], dict[str, NodeConfig]]:
    """Members db1-db3 configured; db1 a bootstrapped primary, db2 streaming from it, db3 nothing."""
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user)
    prepare_node_dirs(config, owner)
    pg = adapters(config)
    members = {n.name: n for n in config.nodes}
    await pg["db1"].bootstrap_primary()
    await pg["db2"].follow(members["db1"])
    await wait_for("db2 streaming from db1", lambda: streaming_from(pg["db2"], "db1", 1))
    return pg, members


async def test_rewind_failure_moves_the_directory_aside_and_reclones(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> None:
    pg, members = await primary_and_standby(base_dir, bin_dir, os_user, owner)
    db1, db2 = pg["db1"], pg["db2"]
    await db2.promote()
    async with connect(db1) as conn:
        await conn.execute("CREATE TABLE lost AS SELECT 1 AS x")
    await db1.stop("fast")
    # Take away WAL that pg_rewind needs to find the fork: rewinding must fail.
    for segment in (db1.data_dir / "pg_wal").glob("0" * 7 + "1*"):
        segment.unlink()
    await db1.follow(members["db2"])
    await wait_for("db1 streaming from db2", lambda: streaming_from(db1, "db2", 2))
    aside = list(base_dir.glob("db1/data.failed-*"))
    assert len(aside) == 1 and (aside[0] / "PG_VERSION").exists()
    assert await query(db1, "SELECT to_regclass('lost') IS NULL")


async def test_switchover_old_primary_follows_without_rewind(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> None:
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user)
    prepare_node_dirs(config, owner)
    members = {n.name: n for n in config.nodes}
    with capture_logs() as logs:
        pg = adapters(config)
        db1, db2 = pg["db1"], pg["db2"]
        await db1.configure_sync(1, ("db2", "db3"))
        await db1.promote()
        await db2.follow(members["db1"])
        await wait_for("db2 streaming", lambda: streaming_from(db2, "db1", 1))
        async with connect(db1) as conn:
            await asyncio.wait_for(conn.execute("CREATE TABLE t AS SELECT 1 AS x"), 10)
        # Demote: a fast shutdown hands all WAL to the standby, so the standby's
        # position reaches the stopped primary's final one (what the core waits for).
        await db1.stop("fast")
        final = (await probe(db1)).position
        assert final is not None and final.timeline == 1
        caught_up = await wait_for("db2 at db1's final position", lambda: _at_least(db2, final))
        assert caught_up.position == final
        await db2.promote()
        await db1.follow(members["db2"])
        await wait_for("db1 streaming from db2", lambda: streaming_from(db1, "db2", 2))
        pid = db1.postmaster_pid()
        await db1.follow(members["db2"])  # already following: nothing to do
        assert db1.postmaster_pid() == pid
    events = [entry["event"] for entry in logs]
    assert "pg_rewind_done" not in events and "pg_clone_done" in events
    assert events.count("pg_started") == 3  # db1 bootstrap, db2 clone, db1 as a standby


async def _at_least(adapter: PostgresAdapter, position: Position) -> PgObservation | None:
    obs = await probe(adapter)
    return obs if obs.position is not None and obs.position >= position else None


async def test_stop_fast_and_start_standby_round_trip(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> None:
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user)
    prepare_node_dirs(config, owner)
    db1 = adapters(config)["db1"]
    await db1.bootstrap_primary()
    await db1.ensure_slots(("db2", "db3"))
    await db1.ensure_slots(("db2", "db3"))  # idempotent
    assert await query(db1, "SELECT count(*) FROM pg_replication_slots") == 2
    written = await current_lsn(db1)
    await db1.stop("fast")
    obs = await probe(db1)
    assert obs.role is PgRole.STOPPED and obs.position is not None and obs.position.lsn >= written
    await db1.configure_sync(0, ())  # stopped: written for the next start
    # An existing directory is always started as a standby; only promote() makes it writable.
    await db1.start_standby(None)
    obs = await probe(db1)
    assert obs.role is PgRole.STANDBY and obs.following is None and obs.position is not None
    assert obs.position.lsn >= written
    assert await query(db1, "SELECT current_setting('synchronous_standby_names')") == ""
    assert await query(db1, "SELECT count(*) FROM pg_replication_slots") == 0  # a standby pins no WAL for others
    await db1.start_standby(None)  # already so: nothing to do
    await db1.promote()
    obs = await probe(db1)
    assert obs.role is PgRole.PRIMARY and obs.position is not None and obs.position.timeline == 2


async def test_follow_of_a_deaf_upstream_can_be_cancelled_while_it_only_asks(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> None:
    """An upstream whose host accepts connections but never answers (it can
    send but not receive) holds follow() until the connect timeout. Until it
    answers nothing local has changed: waiting_on_upstream says so, and
    cancelling then leaves the standby exactly as it was."""
    pg, members = await primary_and_standby(base_dir, bin_dir, os_user, owner)
    db2 = pg["db2"]
    pid = db2.postmaster_pid()
    deaf = members["db3"]  # nothing runs there: a socket that never answers takes its port
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((deaf.postgres.host, deaf.postgres.port))
    listener.listen(8)
    try:
        assert not db2.waiting_on_upstream
        task = asyncio.create_task(db2.follow(deaf))
        await wait_for("follow() asking the deaf upstream", lambda: _true_or_none(db2.waiting_on_upstream))
        await asyncio.sleep(0.3)
        assert db2.waiting_on_upstream and not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        listener.close()
    assert not db2.waiting_on_upstream
    assert db2.postmaster_pid() == pid
    obs = await streaming_from(db2, "db1", 1)
    assert obs is not None, await probe(db2)


async def _true_or_none(value: bool) -> bool | None:
    return True if value else None


# --- the file formats, without a server ----------------------------------------------


def test_sync_standby_names_quote_members() -> None:
    assert setup.sync_standby_names(0, ("db2",)) == ""
    assert setup.sync_standby_names(1, ("db2", "db-3")) == 'ANY 1 ("db2", "db-3")'
    with pytest.raises(ValueError):
        setup.sync_standby_names(2, ("db2",))


def test_slot_names_are_valid_and_distinct() -> None:
    assert setup.slot_name("db2") == "db2"
    dashed, underscored = setup.slot_name("db-1"), setup.slot_name("db_1")
    assert dashed != underscored and dashed.startswith("db_1_")
    assert len(setup.slot_name("a-" + "b" * 61)) <= 63


@pytest.mark.parametrize(
    ("stderr", "end"),
    [
        (
            "pg_waldump: error: error in WAL record at 0/3637000: invalid record length at 0/3637198: wanted 24, got 0",
            0x3637198,
        ),
        (
            "pg_waldump: error: error in WAL record at 0/5000028: invalid magic number 0000 in log segment "
            "000000010000000000000006, offset 8192",
            0x6002000,
        ),
        ('pg_waldump: error: could not find file "000000020000000100000002": No such file or directory', 0x102000000),
        ("pg_waldump: error: could not find a valid record after 0/5000000", None),
    ],
)
def test_end_of_wal_from_pg_waldump(stderr: str, end: int | None) -> None:
    assert setup.waldump_end(stderr, 16 * 1024 * 1024) == end


def test_compatibility_with_the_leaders_history() -> None:
    history = [(1, 0x3000100), (2, 0x5000000)]
    assert setup.compatible(1, 0x3000100, 3, 0x6000000, history)
    assert not setup.compatible(1, 0x3000101, 3, 0x6000000, history)
    assert setup.compatible(3, 0x6000000, 3, 0x6000000, history)
    assert not setup.compatible(4, 0x100, 3, 0x6000000, history)


def test_conninfo_and_conf_quoting() -> None:
    assert setup.conninfo(host="h", passfile="/a b/it's") == "host='h' passfile='/a b/it\\'s'"
    assert setup.conf_string("it's") == "'it''s'"
    auto = "# header\nprimary_conninfo = 'x'\nwork_mem = '8MB'\n"
    edited = setup.edit_auto_conf(auto, remove=setup.MEMBER_KEYS, set_values={"synchronous_standby_names": "a"})
    assert edited == "# header\nwork_mem = '8MB'\nsynchronous_standby_names = 'a'\n"


async def test_replication_password_is_derived_and_never_on_a_command_line() -> None:
    password = setup.replication_password(b"secret")
    assert password == setup.replication_password(b"secret") != setup.replication_password(b"other")
    verifier = setup.scram_verifier(password, salt=b"0123456789abcdef")
    assert verifier.startswith("SCRAM-SHA-256$4096:") and password not in verifier


async def test_programs_timeout_kills_the_process_group() -> None:
    started = time.monotonic()
    with pytest.raises(programs.CommandFailed) as caught:
        await programs.run(["/bin/sh", "-c", "sleep 30 & sleep 30"], user=None, timeout_s=0.5)
    assert caught.value.timed_out and time.monotonic() - started < 5
    with pytest.raises(programs.CommandFailed) as failed:
        await programs.run(["/bin/sh", "-c", "echo boom >&2; exit 3"], user=None, timeout_s=5)
    assert failed.value.returncode == 3 and failed.value.stderr_tail == "boom"
    done = await programs.run(["/bin/sh", "-c", "exit 4"], user=None, timeout_s=5, check=False)
    assert done.returncode == 4


async def test_programs_runs_as_the_postgres_user(os_user: str) -> None:
    done = await programs.run(["/usr/bin/id", "-un"], user=os_user, timeout_s=5, env={"X": "1"})
    assert done.stdout.strip() == os_user


async def test_an_immediate_stop_of_a_hung_server_sigkills_it_at_once(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> None:
    """Every process of the server SIGSTOPped (the e2e lab's hung server): an
    immediate stop does not wait IMMEDIATE_STOP_S for a SIGQUIT it cannot act
    on. The data survive the crash."""
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user, names=("db1", "db2", "db3"))
    prepare_node_dirs(config, owner)
    pg = PostgresAdapter(config, config.nodes[0], SECRET)
    try:
        await pg.bootstrap_primary()
        before = (await probe(pg)).position
        pid = pg.postmaster_pid()
        assert pid is not None and before is not None
        for victim in (pid, *processes.children_of(pid)):
            with contextlib.suppress(ProcessLookupError):  # a short-lived child may be gone
                os.kill(victim, signal.SIGSTOP)
        await wait_for("the SIGSTOP delivered", lambda: processes.is_stopped(pid), 5, interval_s=0.01)
        with capture_logs() as logs:
            await pg.stop("immediate")
        assert pg.postmaster_pid() is None
        assert any(e["event"] == "pg_stop_escalated" and "SIGKILL at once" in e["error"] for e in logs), logs
        stopped = await probe(pg)
        assert stopped.role is PgRole.STOPPED
        # At once: the killed postmaster may still be an unreaped zombie here,
        # whose lock files must not stop the start.
        await pg.start_standby(None)
        assert (await probe(pg)).role is PgRole.STANDBY, pg.logfile.read_text()[-3000:]
    finally:
        await pg.stop("immediate")


async def test_a_dying_postmaster_wakes_the_prober(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> None:
    """With watch_postmaster (the supervisor's): the postmaster's exit wakes
    the prober at once, and that probe says STOPPED with the end of WAL."""
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user, names=("db1", "db2", "db3"))
    prepare_node_dirs(config, owner)
    pg = PostgresAdapter(config, config.nodes[0], SECRET, keep_probe_connection=True)
    wakes = asyncio.Queue[float]()
    pg.watch_postmaster(lambda: wakes.put_nowait(time.monotonic()))
    try:
        await pg.bootstrap_primary()
        running = await probe(pg)
        assert running.role is PgRole.PRIMARY and running.position is not None
        pid = pg.postmaster_pid()
        assert pid is not None
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            woken_at = await wakes.get()
        assert woken_at - killed_at < 1.0  # liveness only: the loop's wakeup, not a poll
        stopped = await probe(pg)
        assert stopped.role is PgRole.STOPPED and stopped.position is not None
        assert stopped.position >= running.position
    finally:
        pg.close()
        await pg.stop("immediate")


async def test_a_postmaster_that_starts_no_backend_is_unresponsive_despite_the_kept_connection(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept connection's backend answers while its postmaster hangs; the
    bare new connection opened once a second does not. The postmaster is
    SIGSTOPped and the /proc check switched off, so that only the new
    connection can tell."""
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user, names=("db1", "db2", "db3"))
    prepare_node_dirs(config, owner)
    pg = PostgresAdapter(config, config.nodes[0], SECRET, keep_probe_connection=True, probe_timeout_s=0.5)
    try:
        await pg.bootstrap_primary()
        assert (await probe(pg)).role is PgRole.PRIMARY
        kept = pg._probe_conn
        pg._probe_conn_at = 0.0  # the once-a-second check is due
        assert (await probe(pg)).role is PgRole.PRIMARY and pg._probe_conn is kept  # checked, and kept
        monkeypatch.setattr(processes, "is_stopped", lambda pid: False)
        pid = pg.postmaster_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            assert (await probe(pg)).role is PgRole.PRIMARY  # its own backend still answers
            pg._probe_conn_at = 0.0
            assert (await probe(pg)).role is PgRole.UNRESPONSIVE
        finally:
            os.kill(pid, signal.SIGCONT)

        async def primary_again() -> bool:
            pg._probe_conn_at = 0.0
            return (await probe(pg)).role is PgRole.PRIMARY

        await wait_for("the postmaster answering again", primary_again, 10)
    finally:
        pg.close()
        await pg.stop("immediate")


async def test_kept_probe_connection_still_sees_a_frozen_or_restarted_server(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> None:
    """The daemon's probe keeps one connection (and checks once a second
    that the postmaster answers a new one): a SIGSTOPped postmaster is still
    unresponsive at once, a restart under the kept connection is a standby
    again on the next probe, not an error."""
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user, names=("db1", "db2", "db3"))
    prepare_node_dirs(config, owner)
    node = config.nodes[0]
    pg = PostgresAdapter(config, node, SECRET, keep_probe_connection=True)
    try:
        await pg.bootstrap_primary()
        first = await probe(pg)
        assert first.role is PgRole.PRIMARY
        kept = pg._probe_conn
        assert kept is not None and (await probe(pg)).role is PgRole.PRIMARY and pg._probe_conn is kept
        pid = pg.postmaster_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            # Signal delivery is asynchronous: wait until the kernel shows it stopped.
            await wait_for("the SIGSTOP delivered", lambda: processes.is_stopped(pid), 5, interval_s=0.01)
            assert (await probe(pg)).role is PgRole.UNRESPONSIVE
        finally:
            os.kill(pid, signal.SIGCONT)
        await pg.stop("fast")
        assert (await probe(pg)).role is PgRole.STOPPED
        await pg.start_standby(None)
        assert (await probe(pg)).role is PgRole.STANDBY
    finally:
        pg.close()
        await pg.stop("immediate")
