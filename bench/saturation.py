"""Saturation: a primary that is merely slow is never replaced. The namespace
lab at default timing, every host saturated at once for --seconds (see
tests/support/e2e/saturation.py: pgbench through the VIP, CPU burners, an
fsync-ing disk writer).

    sudo .venv/bin/python bench/saturation.py [--seconds 180] [--clients 8] [--cpu-burners 4] [--json PATH]

The goal (issue #14) is 0 elections and 0 failovers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support, the helpers shared with the tests

from tests.support.postgres import require_bin_dir


async def run(bin_dir: Path, seconds: float, clients: int, burners: int) -> dict:
    from tests.support.e2e.lab import DATA, E2ELab, lab_dir
    from tests.support.e2e.saturation import prepare_pgbench, run_saturation

    with lab_dir("failoverd-saturation-") as base:
        lab = E2ELab(base, bin_dir, modes=dict.fromkeys(DATA, "caps"))
        try:
            lab.build()
            lab.start_all()
            primary = await lab.wait_for("bootstrap", lab.healthy, 180)
            await lab.create_writer_role(primary)
            await asyncio.to_thread(prepare_pgbench, lab, primary)
            await asyncio.sleep(3.0)
            return await run_saturation(lab, seconds, clients, burners)
        finally:
            lab.close()


def main() -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=8, help="pgbench connections through the VIP")
    parser.add_argument("--cpu-burners", type=int, default=2 * (os.cpu_count() or 1), help="busy-loop processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    from tests.support.e2e.lab import lab_unsupported_reason
    from tests.support.e2e.saturation import describe

    reason = lab_unsupported_reason()
    if reason is not None:
        print(f"the namespace lab cannot run here: {reason}", file=sys.stderr)
        return 2
    result = asyncio.run(run(require_bin_dir(), args.seconds, args.clients, args.cpu_burners))
    print(describe(result))
    changed = result["term_after"] != result["term_before"] or result["primary_after"] != result["primary_before"]
    met = not changed and result["events"]["election_started"] == 0
    print(f"goal (0 elections, 0 failovers): {'met' if met else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
