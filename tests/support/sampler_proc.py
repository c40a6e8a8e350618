"""The dual-primary sampler's own process (tests.support.cluster.DualPrimarySampler),
run as a script by its path.

Asks every server `pg_is_in_recovery()` every --interval seconds over a kept
connection and prints one line per sample:

    S <CLOCK_MONOTONIC seconds> <names out of recovery, comma-separated, or ->

until stdin closes or SIGTERM. A server that does not answer within the
interval counts as not primary for that sample (it cannot be taking writes
from us either).

It is a process of its own, not a thread of the test, because the test's
interpreter also runs writers, fault injection and log parsing: sharing its
GIL and CPU time made samples late under load. CLOCK_MONOTONIC is the same
clock in every process, so the times compare with the test's.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import asyncpg


async def is_primary(
    conns: dict[str, asyncpg.Connection | None], name: str, socket_dir: str, port: int, timeout_s: float
) -> bool:
    conn = conns.get(name)
    try:
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(
                host=socket_dir, port=port, user="postgres", database="postgres", timeout=timeout_s
            )
            conns[name] = conn
        return not await conn.fetchval("SELECT pg_is_in_recovery()", timeout=timeout_s)
    except Exception:
        if conn is not None:
            conn.terminate()
        conns[name] = None
        return False


async def main(args: argparse.Namespace) -> int:
    targets = []
    for spec in args.target:
        name, socket_dir, port = spec.rsplit(":", 2)
        targets.append((name, socket_dir, int(port)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(4096) else None)
    conns: dict[str, asyncpg.Connection | None] = {}
    try:
        while not stop.is_set():
            started = time.monotonic()
            answers = await asyncio.gather(*(is_primary(conns, *t, args.interval) for t in targets))
            primaries = [t[0] for t, p in zip(targets, answers, strict=True) if p]
            sys.stdout.write(f"S {started:.6f} {','.join(primaries) or '-'}\n")
            sys.stdout.flush()
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, args.interval - (time.monotonic() - started)))
            except TimeoutError:
                pass
    finally:
        for conn in conns.values():
            if conn is not None:
                conn.terminate()
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--target", action="append", required=True, help="NAME:SOCKET_DIR:PORT, repeated")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
