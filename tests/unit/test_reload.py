"""What a SIGHUP applies live, what needs a restart, and the rolling-reload timing rule."""

from __future__ import annotations

import copy

import pytest
from test_config import base, parse

from failoverd.config.load import HooksConfig, LoggingConfig
from failoverd.core.spec import Timing
from failoverd.runtime.reload import lease_fits, plan_reload


def changed(**sections) -> tuple:
    old = base()
    new = copy.deepcopy(old)
    for key, value in sections.items():
        new[key] = value
    return parse(old), parse(new)


def test_nothing_changed_plans_nothing():
    old, new = changed()
    plan = plan_reload(old, new)
    assert not plan.changes_anything and plan.needs_restart == () and plan.refused == ()


def test_hooks_and_logging_apply_live():
    old, new = changed(
        hooks={"on_role_change": "/usr/local/bin/notify", "timeout_s": 3}, logging={"level": "debug", "format": "json"}
    )
    plan = plan_reload(old, new)
    assert plan.hooks == HooksConfig(on_role_change="/usr/local/bin/notify", timeout_s=3)
    assert plan.logging == LoggingConfig("debug", "json")
    assert plan.needs_restart == ()


def test_a_timing_change_safe_in_a_mixed_cluster_applies():
    old, new = changed(timing={"lease_s": 0.7, "heartbeat_interval_s": 0.15})
    plan = plan_reload(old, new)
    assert plan.timing is not None and plan.timing.lease_s == 0.7 and plan.timing.heartbeat_interval_s == 0.15


def test_a_timing_change_unsafe_while_members_differ_is_refused():
    # Each timing is valid alone; a new 1.7 s lease against an old 1.0 s election timeout is not.
    old, new = changed(timing={"lease_s": 1.7, "election_timeout_min_s": 2.0, "election_timeout_max_s": 2.5})
    plan = plan_reload(old, new)
    assert plan.timing is None and len(plan.refused) == 1 and "two reloads" in plan.refused[0]


def test_the_two_step_route_is_accepted():
    step1_old, step1_new = changed(
        timing={"lease_s": 0.8, "election_timeout_min_s": 2.0, "election_timeout_max_s": 2.5}
    )
    assert plan_reload(step1_old, step1_new).timing is not None
    step2_new = base() | {"timing": {"lease_s": 1.7, "election_timeout_min_s": 2.0, "election_timeout_max_s": 2.5}}
    assert plan_reload(step1_new, parse(step2_new)).timing is not None


@pytest.mark.parametrize(
    ("section", "value", "label"),
    [
        ("vip", {"address": "198.18.0.101/24", "interface": "eth0"}, "vip"),
        ("api", {"listen": "0.0.0.0:8009"}, "api"),
        ("postgres", {"port": 5433}, "postgres"),
        ("replication", {"mode": "quorum", "sync_count": 2}, "cluster membership or replication"),
    ],
)
def test_other_changes_need_a_restart_and_are_not_applied(section, value, label):
    old, new = changed(**{section: value})
    plan = plan_reload(old, new)
    assert label in plan.needs_restart and not plan.changes_anything


def test_member_list_change_needs_a_restart():
    doc = base()
    doc["nodes"][2]["peer"] = "198.18.0.19:7400"
    plan = plan_reload(parse(base()), parse(doc))
    assert "nodes" in plan.needs_restart


def test_lease_fits_is_the_timing_rule():
    t = Timing()
    assert lease_fits(t, t)
    long_lease = Timing(lease_s=1.7, election_timeout_min_s=2.0, election_timeout_max_s=2.5)
    assert not lease_fits(long_lease, t) and lease_fits(t, long_lease)
