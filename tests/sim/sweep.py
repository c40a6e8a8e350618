"""The seed sweep of `make test`, run in the background at the lowest CPU
priority from the moment pytest has collected it, so that its CPU-bound
seeds use the time the integration and end-to-end tests spend waiting; each
shape's test then only reads the result.

    python -m tests.sim.sweep OUT SHAPE=COUNT [SHAPE=COUNT ...]

writes one JSON line per shape to OUT as soon as that shape is done.

SCHED_IDLE, nice 19 and an autogroup at nice 19 leave the timing-sensitive
tests the CPU whenever they want it. A
run that did not start the sweep (a single test selected by hand) runs the
shape in the test's own process, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from failoverd.sim.runner import SHAPES, preset_spec, run_seeds, summarize

POLL_S = 1.0


def sweep_shape(shape: str, count: int) -> dict:
    results = run_seeds(preset_spec(**SHAPES[shape]), list(range(count)), keep_traces=False)
    summary = summarize(results)
    bad = [r for r in results if not r.ok]
    explain = ""
    if bad:
        first = bad[0]
        explain = f"{len(bad)} seeds violated; first seed {first.seed}: {first.violation}\n" + "\n".join(first.trace)
    return {
        "shape": shape,
        "seeds": summary.seeds,
        "violations": summary.violations,
        "failovers": summary.failovers,
        "unrecovered": sum(1 for r in results if r.recovered_after_s is None),
        "explain": explain,
    }


def _lowest_priority() -> None:
    # SCHED_IDLE: any other runnable process preempts these at once, which
    # matters to the tests that sample every 50 ms; inherited by the pool.
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    os.nice(19)
    with contextlib.suppress(OSError):  # no autogroup scheduling: the policy is enough
        Path("/proc/self/autogroup").write_text("19")


class Background:
    """The sweep's process and the file it writes."""

    def __init__(self, out: Path, counts: dict[str, int]) -> None:
        self.out = out
        argv = [sys.executable, "-m", "tests.sim.sweep", str(out), *(f"{s}={n}" for s, n in counts.items())]
        root = Path(__file__).resolve().parents[2]
        # A session of its own (its pool's workers are stopped with it), whose
        # scheduling group is made nice too: under autogroup, nice alone only
        # orders the processes of one session, and the supervisors the tests
        # start run in sessions of their own.
        self.proc = subprocess.Popen(argv, cwd=root, start_new_session=True, preexec_fn=_lowest_priority)

    def result(self, shape: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.out.read_text().splitlines() if self.out.exists() else []:
                row = json.loads(line)
                if row["shape"] == shape:
                    return row
            if self.proc.poll() is not None and self.proc.returncode != 0:
                raise AssertionError(f"the background sweep failed (exit {self.proc.returncode})")
            if time.monotonic() > deadline:
                raise AssertionError(f"no result for {shape} from the background sweep within {timeout_s:g} s")
            time.sleep(POLL_S)

    def stop(self) -> None:
        # By the process group we made, whose id is the recorded pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    for item in argv[1:]:
        shape, _, count = item.partition("=")
        row = sweep_shape(shape, int(count))
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
