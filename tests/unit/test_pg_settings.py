"""PostgreSQL settings through failoverd (issue #15): [postgres.parameters]
and [postgres] hba are read strictly, written around failoverd's own
settings, and applied by a reload."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from failoverd.adapters.postgres import setup
from failoverd.config.load import FAILOVERD_PG_SETTINGS, ConfigError, PostgresSettings, load_config
from failoverd.runtime.reload import plan_reload

BASE = """
[cluster]
name = "c"
secret_file = "/etc/hosts"
[[nodes]]
name = "a"
peer = "127.0.0.1:7001"
[nodes.postgres]
host = "127.0.0.1"
data_dir = "/tmp/a"
[[nodes]]
name = "b"
peer = "127.0.0.1:7002"
[nodes.postgres]
host = "127.0.0.1"
port = 5433
data_dir = "/tmp/b"
[[nodes]]
name = "w"
kind = "witness"
peer = "127.0.0.1:7003"
"""


def load(tmp_path: Path, extra: str):
    path = tmp_path / "c.toml"
    path.write_text(extra + BASE)
    return load_config(path, "a")


def problems(tmp_path: Path, extra: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, extra)
    return error.value.problems


def test_parameters_and_hba_are_read_and_rendered_for_postgresql_conf(tmp_path):
    config = load(
        tmp_path,
        """
[postgres]
hba = ["host all app 10.0.0.0/8 scram-sha-256", "  hostssl all all all cert  "]
[postgres.parameters]
work_mem = "64MB"
Max_Connections = 200
log_checkpoints = true
random_page_cost = 1.1
"auto_explain.log_min_duration" = 250
application_name = "it's"
""",
    )
    assert config.pg_settings == PostgresSettings(
        parameters=(
            ("application_name", "'it''s'"),
            ("auto_explain.log_min_duration", "250"),
            ("log_checkpoints", "on"),
            ("max_connections", "200"),
            ("random_page_cost", "1.1"),
            ("work_mem", "'64MB'"),
        ),
        hba=("host all app 10.0.0.0/8 scram-sha-256", "hostssl all all all cert"),
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[postgres.parameters]\nport = 5555\n", r"postgres\.parameters\.port: is set by failoverd itself"),
        ('[postgres.parameters]\nsynchronous_standby_names = "x"\n', r"synchronous_standby_names: is set by failoverd"),
        ('[postgres.parameters]\nwork_mem = "1MB"\nWORK_MEM = "2MB"\n', r"WORK_MEM: is given twice"),
        ('[postgres.parameters]\n"bad name" = 1\n', r'"bad name": is not a PostgreSQL parameter name'),
        ('[postgres.parameters]\nwork_mem = ""\n', r"work_mem: \"\" is empty"),
        ("[postgres.parameters]\nwork_mem = [1]\n", r"work_mem: an array is not a string"),
        ('[postgres]\nhba = "host all all all trust"\n', r"postgres\.hba: .* is not an array"),
        ('[postgres]\nhba = ["trust everyone"]\n', r"postgres\.hba: .* line 1 does not start with a pg_hba\.conf type"),
        (
            '[postgres]\nhba = ["host all all all trust\\nlocal all all trust"]\n',
            r"line 1 contains a control character",
        ),
    ],
)
def test_bad_settings_are_refused_by_their_key(tmp_path, extra, expected):
    found = problems(tmp_path, extra)
    assert any(re.search(expected, p) for p in found), found


def test_failoverd_owns_every_setting_it_writes():
    text = setup.node_conf_text(
        member="a", host="h", port=5432, socket_dir=Path("/run/x"), primary_conninfo="", primary_slot_name=""
    )
    written = {line.split(" = ", 1)[0] for line in text.splitlines() if " = " in line and not line.startswith("#")}
    assert written <= FAILOVERD_PG_SETTINGS


def test_parameters_come_before_failoverds_own_settings_which_therefore_win():
    text = setup.node_conf_text(
        member="a",
        host="h",
        port=5432,
        socket_dir=Path("/run/x"),
        primary_conninfo="",
        primary_slot_name="",
        parameters=(("work_mem", "'64MB'"),),
    )
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0] == "work_mem = '64MB'" and lines.index("work_mem = '64MB'") < lines.index("port = 5432")


def test_the_managed_hba_block_is_rewritten_and_the_operators_lines_stay():
    own = "local all all trust\n# my rule\nhost all all all scram-sha-256\n"
    first = setup.with_managed_hba(own, ["host all app 10.0.0.0/8 reject"])
    assert first.splitlines()[:3] == [setup.HBA_BEGIN, "host all app 10.0.0.0/8 reject", setup.HBA_END]
    assert first.endswith(own)
    second = setup.with_managed_hba(first, ["host all app 10.1.0.0/16 reject"])
    assert "10.0.0.0/8" not in second and second.endswith(own)
    assert setup.with_managed_hba(second, []) == own  # no lines: no block


def test_a_reload_applies_changed_settings_live_and_nothing_else_is_flagged(tmp_path):
    old = load(tmp_path, '[postgres.parameters]\nwork_mem = "4MB"\n')
    new = dataclasses.replace(old, pg_settings=PostgresSettings(parameters=(("work_mem", "'64MB'"),)))
    plan = plan_reload(old, new)
    assert plan.pg_settings == new.pg_settings and plan.needs_restart == () and plan.changes_anything
    assert plan_reload(old, old).pg_settings is None
