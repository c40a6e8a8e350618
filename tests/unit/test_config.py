"""The TOML loader: the examples load, and every kind of mistake is reported
under the key path the user wrote."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import math
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failoverd.config.load import (
    ApiConfig,
    Config,
    ConfigError,
    HooksConfig,
    HostPort,
    LoggingConfig,
    PostgresDefaults,
    load_config,
    parse_config,
)
from failoverd.core.spec import MemberKind, Replication, ReplicationMode, Timing

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.toml"))


def toml(value: Any) -> str:
    """A document or value as TOML, using inline tables so any nesting is one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)  # repr gives inf, -inf, 1e+100
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(key)} = {toml(item)}" for key, item in value.items()) + "}"


def document(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(key)} = {toml(value)}\n" for key, value in doc.items())


def base() -> dict[str, Any]:
    return {
        "cluster": {"name": "main", "secret_file": "/etc/failoverd/secret"},
        "timing": {"lease_s": 0.8},
        "replication": {"mode": "quorum", "sync_count": 1},
        "postgres": {"port": 5432},
        "vip": {"address": "198.18.0.100/24", "interface": "eth0"},
        "api": {"listen": "0.0.0.0:8008"},
        "hooks": {"timeout_s": 10},
        "logging": {"level": "info"},
        "nodes": [
            {"name": f"db{i}", "peer": f"198.18.0.1{i}:7400", "postgres": {"data_dir": "/var/lib/pg"}}
            for i in (1, 2, 3)
        ],
    }


def problems_of(doc: dict[str, Any] | str, node: str | None = "db1") -> list[str]:
    text = doc if isinstance(doc, str) else document(doc)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="test.toml", node=node)
    assert caught.value.source == "test.toml"
    return caught.value.problems


def parse(doc: dict[str, Any], node: str | None = "db1") -> Config:
    return parse_config(document(doc), source="test.toml", node=node)


# --- the examples ---


def test_there_are_three_examples() -> None:
    assert {p.name for p in EXAMPLES} == {"three-nodes-quorum.toml", "two-nodes-witness.toml", "async.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    config = load_config(path, node="db1")
    assert config.local is not None and config.local.name == "db1"
    assert config.source == str(path)
    assert [n.name for n in config.nodes] == [m.name for m in config.spec.members]
    for node in config.nodes:
        assert (node.postgres is None) == (node.kind is MemberKind.WITNESS)


def test_three_nodes_example_shows_every_key() -> None:
    text = (CONFIGS / "three-nodes-quorum.toml").read_text()
    keys = {
        "cluster": ["name", "secret_file", "state_dir"],
        "timing": [f.name for f in dataclasses.fields(Timing)],
        "replication": ["mode", "sync_count", "max_lag_bytes"],
        "postgres": [
            *("port", "bin_dir", "os_user", "superuser", "replication_user", "database"),
            *("socket_dir", "reclone_on_rewind_failure", "probe_timeout_s", "command_timeout_s"),
        ],
        "vip": ["address", "interface"],
        "api": ["listen", "token_file", "health_auth", "tls_cert", "tls_key", "tls_ca", "tls_client_ca"],
        "hooks": ["on_role_change", "on_vip_change", "pre_promote", "timeout_s"],
        "logging": ["level", "format"],
        "nodes": ["name", "kind", "peer", "api", "priority", "nofailover"],
        "nodes.postgres": ["host", "port", "data_dir", "bin_dir", "os_user"],
    }
    assigned = set(re.findall(r"^\s*(?:# )?(\w+) = ", text, re.MULTILINE))
    for section, names in keys.items():
        assert f"[{section}]" in text or f"[[{section}]]" in text
        assert set(names) <= assigned, (section, set(names) - assigned)


def test_three_nodes_example_commented_out_keys_are_valid() -> None:
    text = (CONFIGS / "three-nodes-quorum.toml").read_text()
    uncommented = re.sub(r"^(\s*)# (\w+ = .*)$", r"\1\2", text, flags=re.MULTILINE)
    assert uncommented != text
    config = parse_config(uncommented, source="uncommented", node="db1")
    assert config.hooks.pre_promote is not None and config.api.token_file is not None


# --- what the loader builds ---


def test_defaults() -> None:
    doc = base()
    for section in ("timing", "replication", "postgres", "vip", "api", "hooks", "logging"):
        del doc[section]
    config = parse(doc)
    assert config.spec.timing == Timing()
    assert config.spec.replication == Replication()
    assert config.postgres_defaults == PostgresDefaults()
    assert config.cluster.state_dir == Path("/var/lib/failoverd")
    assert config.vip is None
    assert config.api == ApiConfig(HostPort("0.0.0.0", 8008), None)
    assert config.hooks == HooksConfig(None, None, None, 10.0)
    assert config.logging == LoggingConfig("info", "auto")
    db1 = config.nodes[0]
    assert (db1.kind, db1.api, db1.priority, db1.nofailover) == (MemberKind.DATA, None, 100, False)
    assert db1.postgres is not None
    assert (db1.postgres.host, db1.postgres.port, db1.postgres.bin_dir) == ("198.18.0.11", 5432, None)
    assert (db1.postgres.os_user, db1.postgres.superuser) == ("postgres", "postgres")
    assert (db1.postgres.replication_user, db1.postgres.database) == ("replicator", "postgres")


def test_node_settings_override_postgres_defaults() -> None:
    doc = base()
    doc["postgres"] = {"port": 5433, "bin_dir": "/opt/pg/bin", "os_user": "pg", "superuser": "admin"}
    doc["nodes"][1]["postgres"] = {"data_dir": "/d2", "host": "127.0.0.1", "port": 6000, "os_user": "pg2"}
    doc["nodes"][2] = {"name": "w1", "kind": "witness", "peer": "[2001:db8::3]:7400", "api": "w1:8008"}
    config = parse(doc)
    db1, db2, w1 = config.nodes
    assert db1.postgres and (db1.postgres.port, db1.postgres.bin_dir, db1.postgres.os_user) == (
        5433,
        Path("/opt/pg/bin"),
        "pg",
    )
    assert db2.postgres and (db2.postgres.host, db2.postgres.port, db2.postgres.os_user) == ("127.0.0.1", 6000, "pg2")
    assert db2.postgres.superuser == "admin" and db2.postgres.data_dir == Path("/d2")
    assert (w1.kind, w1.postgres, w1.peer, w1.api) == (
        MemberKind.WITNESS,
        None,
        HostPort("2001:db8::3", 7400),
        HostPort("w1", 8008),
    )
    assert str(w1.peer) == "[2001:db8::3]:7400"


def test_postgres_adapter_settings() -> None:
    assert parse(base()).postgres_defaults.socket_dir is None
    doc = base()
    doc["postgres"] = {
        "socket_dir": "/run/failoverd",
        "reclone_on_rewind_failure": False,
        "probe_timeout_s": 2,
        "command_timeout_s": 600.5,
    }
    defaults = parse(doc).postgres_defaults
    assert defaults.socket_dir == Path("/run/failoverd")
    assert defaults.reclone_on_rewind_failure is False
    assert defaults.probe_timeout_s == 2.0 and isinstance(defaults.probe_timeout_s, float)
    assert defaults.command_timeout_s == 600.5


def test_timing_and_replication_reach_the_spec() -> None:
    doc = base()
    doc["timing"] = {"heartbeat_interval_s": 0.2, "election_timeout_min_s": 2, "election_timeout_max_s": 3}
    doc["replication"] = {"mode": "async", "max_lag_bytes": 1024}
    config = parse(doc)
    expected = Timing(heartbeat_interval_s=0.2, election_timeout_min_s=2.0, election_timeout_max_s=3.0)
    assert config.spec.timing == expected
    assert config.spec.replication.mode is ReplicationMode.ASYNC
    assert config.spec.replication.max_lag_bytes == 1024
    assert config.vip is not None and config.vip.address == ipaddress.IPv4Interface("198.18.0.100/24")


def test_local_member_from_the_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "DB2.example.net")
    local = parse(base(), node=None).local
    assert local is not None and local.name == "db2"
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    assert parse(base(), node=None).local is None


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("db1:7400", "db1", 7400),
        ("198.18.0.1:1", "198.18.0.1", 1),
        ("[::1]:65535", "::1", 65535),
        ("db-1.example.net:80", "db-1.example.net", 80),
    ],
)
def test_host_port_parses(text: str, host: str, port: int) -> None:
    parsed = HostPort.parse(text)
    assert (parsed.host, parsed.port) == (host, port)
    assert str(parsed) == text


@pytest.mark.parametrize("text", ["db1", "db1:", ":80", "db1:0", "db1:65536", "db1:+80", "::1:80", "[::1]80", "[x]:80"])
def test_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        HostPort.parse(text)


# --- problems ---

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """Set a value at a dotted path; "nodes.2.peer" indexes into lists."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
        target[int(last) if isinstance(target, list) else last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        del target[last]

    return mutate


def _two_data_members(doc: dict[str, Any]) -> None:
    del doc["nodes"][2]


def _ten_members(doc: dict[str, Any]) -> None:
    doc["nodes"] += [{"name": f"w{i}", "kind": "witness", "peer": f"w{i}:7400"} for i in range(7)]


def _same_peer_spelt_twice(doc: dict[str, Any]) -> None:
    doc["nodes"][1]["peer"] = "[2001:db8:0:0::1]:7400"
    doc["nodes"][2]["peer"] = "[2001:db8::1]:7400"


def _all_nofailover(doc: dict[str, Any]) -> None:
    for node in doc["nodes"]:
        node["nofailover"] = True


PROBLEMS: list[tuple[str, Mutation, str]] = [
    ("no cluster", _delete("cluster"), "cluster: missing (a required table)"),
    ("cluster not a table", _set("cluster", 5), "cluster: 5 is not a table"),
    ("no cluster name", _delete("cluster.name"), "cluster.name: missing (a required string)"),
    ("bad cluster name", _set("cluster.name", "Main!"), "cluster.name: 'Main!' is not a cluster name"),
    ("no secret", _delete("cluster.secret_file"), "cluster.secret_file: missing (a required absolute path)"),
    ("relative secret", _set("cluster.secret_file", "s"), 'cluster.secret_file: "s" is not an absolute path'),
    ("empty state_dir", _set("cluster.state_dir", ""), 'cluster.state_dir: "" is empty'),
    ("timing not a table", _set("timing", [1]), "timing: an array is not a table"),
    ("lease a word", _set("timing.lease_s", "fast"), 'timing.lease_s: "fast" is not a number'),
    ("lease a bool", _set("timing.lease_s", True), "timing.lease_s: true is not a number"),
    ("lease inf", _set("timing.lease_s", math.inf), "timing.lease_s: inf is not a finite number"),
    (
        "lease too long",
        _set("timing.lease_s", 0.95),
        "timing.lease_s: 0.95 s is not shorter than 0.9307 s, the longest lease that is safe",
    ),
    ("max below min", _set("timing.election_timeout_max_s", 0.9), "timing.election_timeout_max_s: 0.9 s must be"),
    ("timing typo", _set("timing.lease", 1), 'timing.lease: unknown key (did you mean "lease_s"?)'),
    ("lag bytes float", _set("timing.switchover_max_lag_bytes", 1.5), "timing.switchover_max_lag_bytes: 1.5 is not an"),
    ("huge number", _set("timing.lease_s", 2**70), "timing.lease_s: an integer of 71 bits does not fit in 64 bits"),
    ("mode", _set("replication.mode", "sync"), 'replication.mode: "sync" is not one of "quorum", "async"'),
    ("k bool", _set("replication.sync_count", True), "replication.sync_count: true is not an integer"),
    ("k zero", _set("replication.sync_count", 0), "replication.sync_count: quorum mode needs sync_count >= 1"),
    ("k too big", _set("replication.sync_count", 3), "replication.sync_count: 3 synchronous standbys requested but"),
    ("lag negative", _set("replication.max_lag_bytes", -1), "replication.max_lag_bytes: -1 is not a non-negative"),
    ("pg port", _set("postgres.port", 70000), "postgres.port: 70000 is not a port (1..65535)"),
    ("pg port string", _set("postgres.port", "5432"), 'postgres.port: "5432" is not an integer'),
    ("pg user empty", _set("postgres.superuser", ""), 'postgres.superuser: "" is empty'),
    ("pg user control", _set("postgres.os_user", "pg\x01"), 'postgres.os_user: "pg\\u0001" contains a control'),
    ("pg typo", _set("postgres.data_dir", "/d"), "postgres.data_dir: unknown key (known keys: port, bin_dir,"),
    ("socket dir relative", _set("postgres.socket_dir", "run"), 'postgres.socket_dir: "run" is not an absolute path'),
    (
        "socket dir too long",
        _set("postgres.socket_dir", "/" + "s" * 92),
        'postgres.socket_dir: "/sssss',
    ),
    ("reclone int", _set("postgres.reclone_on_rewind_failure", 1), "postgres.reclone_on_rewind_failure: 1 is not true"),
    ("probe timeout zero", _set("postgres.probe_timeout_s", 0), "postgres.probe_timeout_s: 0 is not within 0..60 s"),
    ("probe timeout nan", _set("postgres.probe_timeout_s", math.nan), "postgres.probe_timeout_s: nan is not within"),
    ("probe timeout word", _set("postgres.probe_timeout_s", "1s"), 'postgres.probe_timeout_s: "1s" is not a number'),
    ("command timeout", _set("postgres.command_timeout_s", -5), "postgres.command_timeout_s: -5 is not within 0.."),
    ("command timeout inf", _set("postgres.command_timeout_s", math.inf), "postgres.command_timeout_s: inf is not"),
    ("vip no prefix", _set("vip.address", "198.18.0.100"), 'vip.address: "198.18.0.100" has no prefix length'),
    ("vip bad", _set("vip.address", "198.18.0.300/24"), 'vip.address: "198.18.0.300/24" is not an IPv4 address'),
    ("vip v6", _set("vip.address", "fd00::1/64"), 'vip.address: "fd00::1/64" is not an IPv4 address'),
    ("vip no iface", _delete("vip.interface"), "vip.interface: missing (a required network interface name)"),
    ("vip long iface", _set("vip.interface", "x" * 16), 'vip.interface: "xxxxxxxxxxxxxxxx" is not a network'),
    ("api listen", _set("api.listen", "8008"), 'api.listen: "8008" is not host:port (no port)'),
    ("api token", _set("api.token_file", "token"), 'api.token_file: "token" is not an absolute path'),
    ("hook timeout", _set("hooks.timeout_s", 0), "hooks.timeout_s: 0 is not within 0..3600 s"),
    ("hook type", _set("hooks.pre_promote", 5), "hooks.pre_promote: 5 is not a string"),
    ("log level", _set("logging.level", "verbose"), 'logging.level: "verbose" is not one of "debug", "info",'),
    ("log format", _set("logging.format", "xml"), 'logging.format: "xml" is not one of "auto", "json", "console"'),
    ("section typo", _set("nodez", 1), 'nodez: unknown key (did you mean "nodes"?)'),
    ("unknown section", _set("zzz", 1), "zzz: unknown key (known keys: cluster, timing, replication, postgres,"),
    ("no nodes", _delete("nodes"), "nodes: missing (a required array of [[nodes]] tables)"),
    ("nodes not array", _set("nodes", 5), "nodes: 5 is not an array of [[nodes]] tables"),
    ("node not table", _set("nodes.1", "db2"), 'nodes[1]: "db2" is not a table'),
    ("no peer", _delete("nodes.0.peer"), "nodes[0].peer: missing (a required host:port)"),
    ("bad port", _set("nodes.2.peer", "db3:80x"), 'nodes[2].peer: "db3:80x" is not host:port (port "80x" is not'),
    ("no port", _set("nodes.2.peer", "db3"), 'nodes[2].peer: "db3" is not host:port (no port)'),
    ("port zero", _set("nodes.2.peer", "db3:0"), 'nodes[2].peer: "db3:0" is not host:port (port 0 is not within'),
    ("no host", _set("nodes.2.peer", ":7400"), 'nodes[2].peer: ":7400" is not host:port (the host is empty)'),
    ("bad host", _set("nodes.2.peer", "d b:7400"), 'nodes[2].peer: "d b:7400" is not host:port ("d b" is not a'),
    ("bare v6", _set("nodes.2.peer", "::1:7400"), 'nodes[2].peer: "::1:7400" is not host:port (an IPv6 address needs'),
    ("bad v6", _set("nodes.2.peer", "[zz]:7400"), 'nodes[2].peer: "[zz]:7400" is not host:port ("zz" is not an IPv6'),
    ("peer type", _set("nodes.2.peer", 7400), "nodes[2].peer: 7400 is not a string"),
    ("node api", _set("nodes.0.api", "db1"), 'nodes[0].api: "db1" is not host:port'),
    ("no name", _delete("nodes.1.name"), "nodes[1].name: missing (a required string)"),
    ("bad name", _set("nodes.0.name", "DB1"), "nodes[0].name: 'DB1' is not a member name"),
    ("kind", _set("nodes.0.kind", "arbiter"), 'nodes[0].kind: "arbiter" is not one of "data", "witness"'),
    ("priority word", _set("nodes.0.priority", "high"), 'nodes[0].priority: "high" is not an integer'),
    ("priority range", _set("nodes.2.priority", 5000), "nodes[2].priority: 5000 is not within 0..1000"),
    ("nofailover int", _set("nodes.0.nofailover", 1), "nodes[0].nofailover: 1 is not true or false"),
    ("node typo", _set("nodes.0.priorty", 1), 'nodes[0].priorty: unknown key (did you mean "priority"?)'),
    ("quoted key", _set("nodes.0.pri ority", 1), 'nodes[0]."pri ority": unknown key (did you mean "priority"?)'),
    ("no pg table", _delete("nodes.0.postgres"), "nodes[0].postgres.data_dir: missing (a required absolute path)"),
    ("pg table type", _set("nodes.0.postgres", "x"), 'nodes[0].postgres: "x" is not a table'),
    ("pg data_dir", _set("nodes.0.postgres.data_dir", "pg"), 'nodes[0].postgres.data_dir: "pg" is not an absolute'),
    ("pg host", _set("nodes.0.postgres.host", "a b"), 'nodes[0].postgres.host: "a b" is not a host'),
    ("pg per node", _set("nodes.0.postgres.superuser", "x"), "nodes[0].postgres.superuser: unknown key"),
    ("witness pg", _set("nodes.2.kind", "witness"), "nodes[2].postgres: a witness runs no PostgreSQL"),
    ("same name", _set("nodes.1.name", "db1"), "nodes[1].name: 'db1' is used by more than one member"),
    (
        "same peer",
        _set("nodes.2.peer", "198.18.0.11:7400"),
        'nodes[2].peer: "198.18.0.11:7400" is also the peer of nodes[0] (db1)',
    ),
    (
        "same peer, other spelling",
        _same_peer_spelt_twice,
        'nodes[2].peer: "[2001:db8::1]:7400" is also the peer of nodes[1] (db2)',
    ),
    (
        "same postgres",
        _set("nodes.1.postgres.host", "198.18.0.11"),
        'nodes[1].postgres: "198.18.0.11:5432" is also the PostgreSQL of nodes[0] (db1)',
    ),
    ("two data members", _two_data_members, "nodes: 2 member(s) can never keep a quorum through a failure"),
    ("ten members", _ten_members, "nodes: 10 members; at most 9 are supported"),
    ("all nofailover", _all_nofailover, "nodes: every data member has nofailover = true"),
    ("no data member", _set("nodes", []), "nodes: no data member"),
]


@pytest.mark.parametrize(("mutate", "expected"), [case[1:] for case in PROBLEMS], ids=[c[0] for c in PROBLEMS])
def test_problem_names_its_key_path(mutate: Mutation, expected: str) -> None:
    doc = base()
    mutate(doc)
    problems = problems_of(doc)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_unknown_node() -> None:
    assert problems_of(base(), node="db9") == ["--node db9: not a member (members: db1, db2, db3)"]


def test_problems_are_collected_across_sections() -> None:
    doc = base()
    doc["timing"]["lease_s"] = "fast"
    doc["hooks"]["timeout_s"] = -1
    doc["nodes"][0]["priorty"] = 1
    doc["nodes"][2]["peer"] = "db3"
    problems = problems_of(doc)
    assert [p.split(":")[0] for p in problems] == [
        "timing.lease_s",
        "hooks.timeout_s",
        "nodes[0].priorty",
        "nodes[2].peer",
    ]


def test_cross_checks_are_collected_together() -> None:
    doc = base()
    doc["nodes"][1]["peer"] = doc["nodes"][0]["peer"]
    doc["nodes"][2]["name"] = "db1"
    assert [p.split(":")[0] for p in problems_of(doc, node="db9")] == ["nodes[2].name", "nodes[1].peer", "--node db9"]


def test_no_spec_is_built_from_a_broken_member() -> None:
    # With db3 unreadable only two members are valid; that must not be
    # reported as "2 members cannot keep a quorum".
    doc = base()
    doc["nodes"][2]["peer"] = "db3"
    assert problems_of(doc) == ['nodes[2].peer: "db3" is not host:port (no port)']


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[cluster]\nname = "x"\nsecret_file = "/s" x\n', "line 3, column 20: invalid TOML: Expected newline"),
        ("[cluster]\nname", "at the end of the file: invalid TOML: Expected '=' after a key"),
        ('[cluster]\nname = "a"\nname = "b"\n', "line 3, column 11: invalid TOML: Cannot overwrite a value"),
        ("a = " + "[" * 100_000, "invalid TOML: arrays or tables nested too deeply"),
        ("a = " + "9" * 5000, "invalid TOML: Exceeds the limit (4300 digits)"),
    ],
)
def test_toml_syntax_errors_name_the_line(text: str, expected: str) -> None:
    [problem] = problems_of(text)
    assert problem.startswith(expected)


def test_error_text_names_the_file() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("[cluster\nname = 1\n", source="/etc/failoverd/failoverd.toml")
    assert str(caught.value).startswith("/etc/failoverd/failoverd.toml: line 1, column 9: invalid TOML:")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.problems == ["cannot read the configuration file: No such file or directory"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[cluster]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == ["line 2: not valid UTF-8; a TOML file must be UTF-8 text"]


# --- nothing but ConfigError, whatever the input ---

KEYS = [
    *("cluster", "timing", "replication", "postgres", "vip", "api", "hooks", "logging", "nodes"),
    *("name", "secret_file", "state_dir", "mode", "sync_count", "max_lag_bytes", "lease_s", "port"),
    *("address", "interface", "listen", "timeout_s", "level", "format", "kind", "peer", "priority"),
    *("nofailover", "postgres", "data_dir", "host", "bin_dir", "os_user", "heartbeat_interval_s"),
]
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["db1", "db1:7400", "[::1]:7400", "quorum", "async", "witness", "/pg", "198.18.0.1/24", "eth0"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner),
    max_leaves=12,
)


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    """The valid base document with a few values replaced, added or removed,
    so that generated input also reaches the cross-field checks."""
    doc = copy.deepcopy(base())
    for _ in range(draw(st.integers(0, 4))):
        target: Any = doc
        for _depth in range(draw(st.integers(0, 3))):
            if isinstance(target, dict) and target:
                child = target[draw(st.sampled_from(sorted(target)))]
            elif isinstance(target, list) and target:
                child = draw(st.sampled_from(target))
            else:
                break
            if not isinstance(child, (dict, list)):
                break
            target = child
        if isinstance(target, dict):
            key = draw(st.sampled_from(KEYS) | st.text(max_size=6))
            if key in target and draw(st.booleans()):
                del target[key]
            else:
                target[key] = draw(VALUES)
        elif target:
            target[draw(st.integers(0, len(target) - 1))] = draw(VALUES)
    return doc


def _only_config_error(text: str) -> None:
    try:
        parse_config(text, source="fuzz.toml", node=None)
    except ConfigError as error:
        assert error.problems and all(isinstance(p, str) and "\n" not in p for p in error.problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_generated_documents_raise_only_config_error(doc: dict[str, Any]) -> None:
    _only_config_error(document(doc))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_garbage_text_raises_only_config_error(text: str) -> None:
    _only_config_error(text)


FRAGMENTS = st.sampled_from(
    ["[cluster]", "[[nodes]]", "[nodes.postgres]", "[timing]", "name = ", "peer = ", '"db1"', '"x:1"', "= ", "\n"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAGMENTS | st.text(max_size=4), max_size=30))
def test_toml_like_text_raises_only_config_error(parts: list[str]) -> None:
    _only_config_error("".join(parts))


# --- [api]: authentication and TLS ---


def test_api_defaults_and_full_table() -> None:
    assert parse(base()).api == ApiConfig(HostPort("0.0.0.0", 8008))
    assert not parse(base()).api.tls and parse(base()).api.health_auth is False
    doc = base()
    doc["api"] = {
        "listen": "127.0.0.1:9000",
        "token_file": "/etc/failoverd/token",
        "health_auth": True,
        "tls_cert": "/etc/failoverd/api.crt",
        "tls_key": "/etc/failoverd/api.key",
        "tls_ca": "/etc/failoverd/ca.crt",
        "tls_client_ca": "/etc/failoverd/clients.crt",
    }
    api = parse(doc).api
    assert api.tls and api.health_auth and api.listen == HostPort("127.0.0.1", 9000)
    assert (api.token_file, api.tls_cert, api.tls_key, api.tls_ca, api.tls_client_ca) == tuple(
        Path(p)
        for p in (
            "/etc/failoverd/token",
            "/etc/failoverd/api.crt",
            "/etc/failoverd/api.key",
            "/etc/failoverd/ca.crt",
            "/etc/failoverd/clients.crt",
        )
    )


API_PROBLEMS: list[tuple[str, Mutation, str]] = [
    ("health auth without token", _set("api.health_auth", True), "api.health_auth: true needs api.token_file"),
    ("health auth type", _set("api.health_auth", "yes"), 'api.health_auth: "yes" is not true or false'),
    ("cert without key", _set("api.tls_cert", "/c.crt"), "api.tls_key: missing (api.tls_cert and api.tls_key go"),
    ("key without cert", _set("api.tls_key", "/c.key"), "api.tls_cert: missing (api.tls_cert and api.tls_key go"),
    ("ca without cert", _set("api.tls_ca", "/ca.crt"), "api.tls_ca: needs api.tls_cert and api.tls_key"),
    ("client ca without cert", _set("api.tls_client_ca", "/ca.crt"), "api.tls_client_ca: needs api.tls_cert"),
    ("relative cert", _set("api.tls_cert", "api.crt"), 'api.tls_cert: "api.crt" is not an absolute path'),
    ("api typo", _set("api.tls_certificate", "/c"), 'api.tls_certificate: unknown key (did you mean "tls_cert'),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in API_PROBLEMS], ids=[c[0] for c in API_PROBLEMS])
def test_api_problem_names_its_key_path(mutate: Mutation, expected: str) -> None:
    doc = base()
    mutate(doc)
    problems = problems_of(doc)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


# --- peer TLS ---


@pytest.mark.parametrize("keys", [("tls_cert",), ("tls_cert", "tls_key"), ("tls_ca",)])
def test_peer_tls_keys_go_together(keys):
    doc = base()
    doc["cluster"].update({k: f"/etc/failoverd/{k}.pem" for k in keys})
    with pytest.raises(ConfigError) as caught:
        parse(doc)
    assert any("go together" in p for p in caught.value.problems)


def test_peer_tls_keys_load():
    doc = base()
    doc["cluster"].update({k: f"/etc/failoverd/{k}.pem" for k in ("tls_cert", "tls_key", "tls_ca")})
    config = parse(doc)
    assert config.cluster.tls and str(config.cluster.tls_ca) == "/etc/failoverd/tls_ca.pem"
