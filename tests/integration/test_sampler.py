"""The dual-primary sampler every cluster and e2e test relies on for "never
two primaries" must be able to see two: two unrelated PostgreSQL primaries
(two bootstrapped members that never replicate) are reported at every
sample, and no longer once one of them stops."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

from tests.support import wait_for
from tests.support.cluster import DualPrimarySampler
from tests.support.postgres import adapters, make_config, prepare_node_dirs


async def test_sampler_reports_two_primaries_and_keeps_its_pace(
    base_dir: Path, bin_dir: Path, os_user: str, owner: tuple[int, int] | None
) -> None:
    config = make_config(base_dir, bin_dir=bin_dir, os_user=os_user)
    prepare_node_dirs(config, owner)
    pg = adapters(config)
    await asyncio.gather(pg["db1"].bootstrap_primary(), pg["db2"].bootstrap_primary())
    sampler = DualPrimarySampler(types.SimpleNamespace(adapters=pg))
    sampler.start()
    try:
        # Counted, not timed: a loaded machine samples more slowly, and the
        # pace is checked below on its own.
        await wait_for("10 samples with both primaries", lambda: len(sampler.dual) >= 10, 30, interval_s=0.05)
        both = len(sampler.dual)
        assert sampler.samples == both  # every sample so far saw both
        await pg["db2"].stop("fast")
        stopped_at = asyncio.get_running_loop().time()
        after = sampler.samples
        await wait_for("10 samples after db2 stopped", lambda: sampler.samples >= after + 10, 30, interval_s=0.05)
    finally:
        await sampler.stop()
    assert all(sorted(names) == ["db1", "db2"] for _, names in sampler.dual)
    assert sampler.dual[-1][0] < stopped_at  # none after db2 stopped
    assert sampler.max_gap_s() < 0.1, (sampler.samples, sampler.max_gap_s())
