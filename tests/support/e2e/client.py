"""The lab's client: writers that know only the VIP. Run inside the client
namespace (the lab starts it with `ip netns exec`):

    client.py --host VIP --port 5432 --user writer --first-id N [--writers 4] ...

The password comes from the environment (E2E_PASSWORD), never the command
line. Each writer keeps one connection, inserts one row per transaction
(a unique id, never reused, even after a failed attempt) and prints a line
per COMMIT acknowledged to it:

    A <id> <CLOCK_MONOTONIC seconds> <member that acknowledged it>

and one per failure, `E <seconds> <kind>`. CLOCK_MONOTONIC is the same clock
in every process on the machine, so the lab compares these times with the
instant it injected a fault. Short timeouts make a writer give up on a server
that went silent (an isolated host) and reconnect, so the first write after a
failover is seen within a few tens of milliseconds; the writers are
staggered so their retries do not march in step.

With --pooled (a transaction-pooling PgBouncer in between) the server
behind a connection may change at every transaction: the member is then read
in the same statement as each insert (RETURNING), and asyncpg's statement
cache is off (PgBouncer 1.18 does not keep prepared statements).

Stops on SIGTERM or SIGINT, and in any case after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time

import asyncpg


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def writer(args: argparse.Namespace, ids: itertools.count, stop: asyncio.Event, offset_s: float) -> None:
    """`offset_s` staggers this writer against the others, at start and again
    whenever its connection fails: all writers lose their connections at the
    same instant in a failover, and would otherwise retry in lockstep, leaving
    a connect timeout between attempts."""
    password = os.environ.get("E2E_PASSWORD", "")
    await asyncio.sleep(offset_s)
    conn: asyncpg.Connection | None = None
    member = "?"
    failures = 0
    while not stop.is_set():
        try:
            if conn is None:
                conn = await asyncpg.connect(
                    host=args.host,
                    port=args.port,
                    user=args.user,
                    password=password,
                    database="postgres",
                    timeout=args.connect_timeout,
                    statement_cache_size=0 if args.pooled else 100,
                )
                if not args.pooled:
                    async with asyncio.timeout(args.command_timeout):
                        member = await conn.fetchval("SELECT current_setting('cluster_name')")
            wid = next(ids)
            async with asyncio.timeout(args.command_timeout):
                if args.pooled:
                    member = await conn.fetchval(
                        "INSERT INTO acked (id) VALUES ($1) RETURNING current_setting('cluster_name')", wid
                    )
                else:
                    await conn.execute("INSERT INTO acked (id) VALUES ($1)", wid)
            emit(f"A {wid} {time.monotonic():.6f} {member}")
            failures = 0
            await asyncio.sleep(args.pause)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            emit(f"E {time.monotonic():.6f} {type(error).__name__}")
            if conn is not None:
                conn.terminate()
            conn = None
            failures += 1
            await asyncio.sleep(args.retry_pause + (offset_s if failures == 1 else 0.0))
    if conn is not None:
        conn.terminate()


async def main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ids = itertools.count(args.first_id)
    spread = args.connect_timeout / max(1, args.writers)
    tasks = [asyncio.create_task(writer(args, ids, stop, i * spread)) for i in range(args.writers)]
    emit(f"S {time.monotonic():.6f} {os.getpid()}")
    with_deadline = asyncio.create_task(asyncio.wait_for(stop.wait(), args.max_seconds))
    try:
        await with_deadline
    except TimeoutError:
        stop.set()
    # Each writer ends its current attempt, bounded by its own timeouts.
    _, pending = await asyncio.wait(tasks, timeout=args.connect_timeout + args.command_timeout + 1)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    emit(f"X {time.monotonic():.6f}")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=5432)
    p.add_argument("--user", required=True)
    p.add_argument("--first-id", type=int, required=True)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--connect-timeout", type=float, default=0.3)
    p.add_argument("--command-timeout", type=float, default=0.5)
    p.add_argument("--pause", type=float, default=0.02, help="between a writer's acknowledged inserts")
    p.add_argument("--retry-pause", type=float, default=0.02, help="after a failed attempt")
    p.add_argument("--max-seconds", type=float, default=1800.0)
    p.add_argument("--pooled", action="store_true", help="through a transaction-pooling PgBouncer")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
