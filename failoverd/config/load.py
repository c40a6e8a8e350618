"""The TOML configuration file, read into frozen dataclasses.

The protocol's inputs become a `ClusterSpec`, which checks its own safety
rules; this module only checks TOML types and the adapter-side settings the
core never sees (addresses, paths, users, hooks) and reports the spec's
objections under the key path the user wrote.

Problems are collected rather than raised one at a time: a failover manager
is often configured under pressure, and a fix-one-and-rerun loop wastes it.
Unknown keys are problems too, because a misspelt key would otherwise fall
back to its default without a word. The reader of one table that collects
those problems, and the kinds of value it checks, are in `failoverd.config.check`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import socket
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from failoverd.config.check import (
    _ABSENT,
    _BOOLEAN,
    _COMMAND_TIMEOUT,
    _HBA_LINES,
    _HOOK_TIMEOUT,
    _INTEGER,
    _INTERFACE,
    _IPV4_INTERFACE,
    _NUMBER,
    _PATH,
    _PROBE_TIMEOUT,
    _SOCKET_DIR,
    _STRING,
    _choice,
    _integer,
    _Invalid,
    _Kind,
    _show,
    _string,
    _syntax_problem,
    _Table,
    pg_setting_name,
    pg_setting_value,
)
from failoverd.core.spec import ClusterSpec, Member, MemberKind, Replication, ReplicationMode, SpecError, Timing

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]


class ConfigError(Exception):
    """The configuration cannot be used. `problems` holds one line per problem,
    each starting with the key path it is about; `source` names the file."""

    def __init__(self, problems: Sequence[str], source: str) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(f"{source}: {problem}" for problem in self.problems))


@dataclasses.dataclass(frozen=True, slots=True)
class HostPort:
    host: str  # a hostname or an IP address; an IPv6 address without brackets
    port: int

    def __post_init__(self) -> None:
        problem = _host_problem(self.host) or _port_problem(self.port)
        if problem is not None:
            raise ValueError(problem)

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Read "host:port" or "[ipv6]:port"; ValueError says what is wrong."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError("an IPv6 address is written [address]:port")
            if ":" not in host:  # brackets are for IPv6 only
                raise ValueError(f"{json.dumps(host)} is not an IPv6 address")
        else:
            host, sep, port = text.rpartition(":")
            if not sep:
                raise ValueError("no port")
            if ":" in host:
                raise ValueError("an IPv6 address needs brackets, e.g. [::1]:7400")
        if not re.fullmatch(r"[0-9]{1,5}", port):
            raise ValueError(f"port {json.dumps(port)} is not a number 1..65535")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _host_problem(host: object) -> str | None:
    if not isinstance(host, str) or not host:
        return "the host is empty"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{json.dumps(host)} is not an IPv6 address"
        return None
    labels = host.split(".")
    if len(host) > 253 or not all(re.fullmatch(r"[A-Za-z0-9_-]{1,63}", label) for label in labels):
        return f"{json.dumps(host)} is not a hostname or IP address"
    return None


def _port_problem(port: object) -> str | None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return f"port {port!r} is not within 1..65535"
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterSettings:
    name: str
    secret_file: Path  # shared HMAC key; read and permission-checked by the daemon, not here
    state_dir: Path  # term, vote and cluster state live here
    # Mutual TLS between supervisors (on top of the HMAC, which stays on):
    # every member serves tls_cert/tls_key, demands a client certificate
    # signed by tls_ca and verifies the members it calls against tls_ca.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresDefaults:
    """The [postgres] table: what every data node uses unless it says otherwise."""

    port: int = 5432
    bin_dir: Path | None = None  # None: the PostgreSQL adapter asks pg_config
    os_user: str = "postgres"
    superuser: str = "postgres"
    replication_user: str = "replicator"
    database: str = "postgres"
    socket_dir: Path | None = None  # None: "<data_dir>.run" beside each node's data directory
    reclone_on_rewind_failure: bool = True
    probe_timeout_s: float = 1.0
    command_timeout_s: float = 60.0


# postgresql.conf settings failoverd writes or manages itself (failoverd.conf,
# synchronous replication, where the files are): [postgres.parameters] may not
# set them. adapters/postgres/setup.py's member settings are a subset (a test checks).
FAILOVERD_PG_SETTINGS = frozenset(
    {
        "listen_addresses",
        "port",
        "unix_socket_directories",
        "unix_socket_permissions",
        "cluster_name",
        "wal_level",
        "max_wal_senders",
        "max_replication_slots",
        "hot_standby",
        "wal_log_hints",
        "full_page_writes",
        "synchronous_commit",
        "synchronous_standby_names",
        "wal_keep_size",
        "wal_retrieve_retry_interval",
        "recovery_target_timeline",
        "primary_conninfo",
        "primary_slot_name",
        "data_directory",
        "config_file",
        "hba_file",
        "ident_file",
        "include",
        "include_dir",
        "include_if_exists",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresSettings:
    """[postgres.parameters] and [postgres] hba: what every data member's
    PostgreSQL runs with besides failoverd's own settings. Applied at every
    start, and live by a reload (SIGHUP or `failoverctl reload`)."""

    parameters: tuple[tuple[str, str], ...] = ()  # (name, postgresql.conf value), sorted by name
    hba: tuple[str, ...] = ()  # pg_hba.conf lines, before failoverd's own


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresNodeConfig:
    host: str
    port: int
    data_dir: Path
    bin_dir: Path | None  # None: the PostgreSQL adapter asks pg_config
    os_user: str
    superuser: str
    replication_user: str
    database: str

    def __str__(self) -> str:
        return str(HostPort(self.host, self.port))


@dataclasses.dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    kind: MemberKind
    peer: HostPort  # where the other supervisors reach this one
    api: HostPort | None  # where operators and failoverctl reach its REST API
    priority: int
    nofailover: bool
    postgres: PostgresNodeConfig | None  # None exactly for a witness


@dataclasses.dataclass(frozen=True, slots=True)
class VipConfig:
    address: ipaddress.IPv4Interface
    interface: str


@dataclasses.dataclass(frozen=True, slots=True)
class ApiConfig:
    """The [api] table (docs/api.md). Admin requests always need the bearer
    token in `token_file`; without one they are refused. `health_auth` puts the
    read endpoints behind the same token. With `tls_cert`/`tls_key` every
    member serves HTTPS (and uses that pair as its client certificate when it
    forwards to another member); `tls_ca` is what clients verify servers with
    (default: the system's CAs); `tls_client_ca` makes servers demand client
    certificates signed by it."""

    listen: HostPort = HostPort("0.0.0.0", 8008)
    token_file: Path | None = None
    health_auth: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_client_ca: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclasses.dataclass(frozen=True, slots=True)
class HooksConfig:
    on_role_change: str | None = None
    on_vip_change: str | None = None
    pre_promote: str | None = None
    timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "auto"  # auto: console on a TTY, JSON otherwise


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    spec: ClusterSpec
    cluster: ClusterSettings
    nodes: tuple[NodeConfig, ...]
    local: NodeConfig | None  # None when no --node was given and no member is named like this host
    postgres_defaults: PostgresDefaults
    vip: VipConfig | None
    api: ApiConfig
    hooks: HooksConfig
    logging: LoggingConfig
    source: str
    pg_settings: PostgresSettings = PostgresSettings()


def load_config(path: str | Path, node: str | None = None) -> Config:
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError([f"cannot read the configuration file: {error.strerror or error}"], source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError([f"line {line}: not valid UTF-8; a TOML file must be UTF-8 text"], source) from None
    return parse_config(text, source=source, node=node)


def parse_config(text: str, *, source: str, node: str | None = None) -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_problem(str(error))], source) from None
    except RecursionError:
        raise ConfigError(["invalid TOML: arrays or tables nested too deeply"], source) from None
    except ValueError as error:  # tomllib lets int() errors through, e.g. for 5000-digit numbers
        raise ConfigError([f"invalid TOML: {error}"], source) from None
    return _Reader(source).read(document, node)


# --- value kinds for addresses (the rest are in config/check.py): they use HostPort
# and its checks, and config/check.py must not import this module.


def _port(value: Any) -> int:
    if _port_problem(_integer(value)) is not None:
        raise _Invalid("is not a port (1..65535)")
    return value


def _host(value: Any) -> str:
    if _host_problem(_string(value)) is not None:
        raise _Invalid("is not a hostname or IP address")
    return value


def _host_port(value: Any) -> HostPort:
    try:
        return HostPort.parse(_string(value))
    except ValueError as error:
        raise _Invalid(f"is not host:port ({error})") from None


_PORT = _Kind("port", _port)
_HOST = _Kind("host", _host)
_HOST_PORT = _Kind("host:port", _host_port)


_MEMBER = {field.name: field.default for field in dataclasses.fields(Member)}
_POSTGRES = PostgresDefaults()


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def read(self, document: dict[str, Any], node: str | None) -> Config:
        top = _Table(document, "", self.problems)
        cluster = self._cluster(top.table("cluster", required=True))
        timing = self._timing(top.table("timing"))
        replication = self._replication(top.table("replication"))
        postgres = top.table("postgres")
        defaults = self._postgres_defaults(postgres)
        pg_settings = self._pg_settings(postgres)
        vip = self._vip(top.table("vip"))
        api = self._api(top.table("api"))
        hooks = self._hooks(top.table("hooks"))
        logging = self._logging(top.table("logging"))
        read_nodes = self._nodes(top, defaults)
        top.finish()
        self._raise_if_problems()
        # A part is None only when reading it recorded a problem, and there were none.
        assert cluster is not None and timing is not None and replication is not None and defaults is not None
        assert api is not None and hooks is not None and logging is not None and pg_settings is not None
        nodes = tuple(n for n in read_nodes if n is not None)
        assert len(nodes) == len(read_nodes)
        spec = self._spec(cluster, nodes, timing, replication)
        self._check_addresses(nodes)
        local = self._local(nodes, node)
        self._raise_if_problems()
        assert spec is not None  # None only with a problem recorded
        return Config(spec, cluster, nodes, local, defaults, vip, api, hooks, logging, self.source, pg_settings)

    def _raise_if_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems, self.source)

    def _cluster(self, t: _Table) -> ClusterSettings | None:
        name = t.get("name", _STRING)  # ClusterSpec judges what a valid name is
        secret_file = t.get("secret_file", _PATH)
        state_dir = t.get("state_dir", _PATH, Path("/var/lib/failoverd"))
        tls = {key: t.get(key, _PATH, None) for key in ("tls_cert", "tls_key", "tls_ca")}
        if not t.failed and len({value is None for value in tls.values()}) > 1:
            missing = sorted(key for key, value in tls.items() if value is None)
            t.problem(missing[0], "missing (cluster.tls_cert, tls_key and tls_ca go together: peer TLS is mutual)")
        t.finish()
        return None if t.failed else ClusterSettings(name, secret_file, state_dir, **tls)

    def _timing(self, t: _Table) -> Timing | None:
        fields = dataclasses.fields(Timing)
        t.known.extend(field.name for field in fields)
        # Only the keys the user wrote are passed on, so Timing's defaults apply to the rest.
        values = {
            field.name: t.get(field.name, _INTEGER if type(field.default) is int else _NUMBER)
            for field in fields
            if field.name in t.raw
        }
        t.finish()
        return None if t.failed else self._build(t, Timing, values)

    def _replication(self, t: _Table) -> Replication | None:
        mode = t.get("mode", _choice(*(m.value for m in ReplicationMode)), Replication().mode.value)
        sync_count = t.get("sync_count", _INTEGER, Replication().sync_count)
        max_lag_bytes = t.get("max_lag_bytes", _INTEGER, Replication().max_lag_bytes)
        t.finish()
        if t.failed:
            return None
        values = {"mode": ReplicationMode(mode), "sync_count": sync_count, "max_lag_bytes": max_lag_bytes}
        return self._build(t, Replication, values)

    def _build(self, t: _Table, cls: type, values: dict[str, Any]) -> Any:
        try:
            return cls(**values)
        except SpecError as error:
            t.problem(error.path, error.message)
            return None

    def _postgres_defaults(self, t: _Table) -> PostgresDefaults | None:
        values = {"port": t.get("port", _PORT, _POSTGRES.port), "bin_dir": t.get("bin_dir", _PATH, None)}
        for key in ("os_user", "superuser", "replication_user", "database"):
            values[key] = t.get(key, _STRING, getattr(_POSTGRES, key))
        values["socket_dir"] = t.get("socket_dir", _SOCKET_DIR, None)
        values["reclone_on_rewind_failure"] = t.get(
            "reclone_on_rewind_failure", _BOOLEAN, _POSTGRES.reclone_on_rewind_failure
        )
        values["probe_timeout_s"] = t.get("probe_timeout_s", _PROBE_TIMEOUT, _POSTGRES.probe_timeout_s)
        values["command_timeout_s"] = t.get("command_timeout_s", _COMMAND_TIMEOUT, _POSTGRES.command_timeout_s)
        t.known += ["parameters", "hba"]  # read by _pg_settings
        t.finish()
        return None if t.failed else PostgresDefaults(**values)

    def _pg_settings(self, postgres: _Table) -> PostgresSettings | None:
        hba = postgres.get("hba", _HBA_LINES, ())
        t = postgres.table("parameters")
        parameters: dict[str, str] = {}
        for key, value in t.raw.items():
            t.known.append(key)
            try:
                name = pg_setting_name(key)
            except _Invalid as error:
                t.problem(key, f"{error}")
                continue
            if name in FAILOVERD_PG_SETTINGS:
                t.problem(key, "is set by failoverd itself (its member, replication and file settings)")
                continue
            if name in parameters:
                t.problem(key, "is given twice (names are not case-sensitive)")
                continue
            try:
                parameters[name] = pg_setting_value(value)
            except _Invalid as error:
                t.problem(key, f"{_show(value)} {error}")
        t.finish()
        if t.failed or hba is None:
            return None
        return PostgresSettings(tuple(sorted(parameters.items())), tuple(hba))

    def _vip(self, t: _Table) -> VipConfig | None:
        if not t.present:
            return None
        address = t.get("address", _IPV4_INTERFACE)
        interface = t.get("interface", _INTERFACE)
        t.finish()
        return None if t.failed else VipConfig(address, interface)

    def _api(self, t: _Table) -> ApiConfig | None:
        listen = t.get("listen", _HOST_PORT, ApiConfig().listen)
        token_file = t.get("token_file", _PATH, None)
        health_auth = t.get("health_auth", _BOOLEAN, False)
        tls = {key: t.get(key, _PATH, None) for key in ("tls_cert", "tls_key", "tls_ca", "tls_client_ca")}
        checks = not t.failed  # a key already reported as invalid is not also "missing"
        t.finish()
        if checks:
            self._api_combinations(t, token_file, health_auth, tls)
        return None if t.failed else ApiConfig(listen, token_file, health_auth, **tls)

    def _api_combinations(self, t: _Table, token_file: Path | None, health_auth: bool, tls: dict) -> None:
        if health_auth and token_file is None:
            t.problem("health_auth", "true needs api.token_file (the token the read endpoints would ask for)")
        if (tls["tls_cert"] is None) != (tls["tls_key"] is None):
            missing = "tls_key" if tls["tls_key"] is None else "tls_cert"
            t.problem(missing, "missing (api.tls_cert and api.tls_key go together)")
        for key in ("tls_ca", "tls_client_ca"):
            if tls[key] is not None and tls["tls_cert"] is None:
                t.problem(key, "needs api.tls_cert and api.tls_key (it only applies when the API serves TLS)")

    def _hooks(self, t: _Table) -> HooksConfig | None:
        commands = {key: t.get(key, _STRING, None) for key in ("on_role_change", "on_vip_change", "pre_promote")}
        timeout_s = t.get("timeout_s", _HOOK_TIMEOUT, HooksConfig().timeout_s)
        t.finish()
        return None if t.failed else HooksConfig(**commands, timeout_s=timeout_s)

    def _logging(self, t: _Table) -> LoggingConfig | None:
        level = t.get("level", _choice("debug", "info", "warning", "error"), LoggingConfig().level)
        format_ = t.get("format", _choice("auto", "json", "console"), LoggingConfig().format)
        t.finish()
        return None if t.failed else LoggingConfig(level, format_)

    def _nodes(self, top: _Table, defaults: PostgresDefaults | None) -> tuple[NodeConfig | None, ...]:
        """The [[nodes]] tables, each None where it has a problem (recorded)."""
        top.known.append("nodes")
        raw = top.raw.get("nodes", _ABSENT)
        if raw is _ABSENT:
            top.problem("nodes", "missing (a required array of [[nodes]] tables)")
            return ()
        if not isinstance(raw, list):
            top.problem("nodes", f"{_show(raw)} is not an array of [[nodes]] tables")
            return ()
        return tuple(self._node(_Table(item, f"nodes[{i}]", self.problems), defaults) for i, item in enumerate(raw))

    def _node(self, t: _Table, defaults: PostgresDefaults | None) -> NodeConfig | None:
        name = t.get("name", _STRING)  # Member judges what a valid name is
        kind = t.get("kind", _choice(*(k.value for k in MemberKind)), _MEMBER["kind"].value)
        peer = t.get("peer", _HOST_PORT)
        api = t.get("api", _HOST_PORT, None)
        priority = t.get("priority", _INTEGER, _MEMBER["priority"])
        nofailover = t.get("nofailover", _BOOLEAN, _MEMBER["nofailover"])
        pg_table = t.table("postgres")
        t.finish()
        postgres = None
        if kind == MemberKind.WITNESS.value and pg_table.present:
            t.problem("postgres", 'a witness runs no PostgreSQL; remove this table or set kind = "data"')
        elif kind == MemberKind.DATA.value:
            postgres = self._node_postgres(pg_table, peer, defaults)
        if t.failed or pg_table.failed:
            return None
        values = {"name": name, "kind": MemberKind(kind), "priority": priority, "nofailover": nofailover}
        member = self._build(t, Member, values)
        if member is None or (kind == MemberKind.DATA.value and postgres is None):
            return None
        return NodeConfig(name, member.kind, peer, api, priority, nofailover, postgres)

    def _node_postgres(
        self, t: _Table, peer: HostPort | None, defaults: PostgresDefaults | None
    ) -> PostgresNodeConfig | None:
        host = t.get("host", _HOST, peer.host if peer else None)
        port = t.get("port", _PORT, defaults.port if defaults else None)
        data_dir = t.get("data_dir", _PATH)
        bin_dir = t.get("bin_dir", _PATH, defaults.bin_dir if defaults else None)
        os_user = t.get("os_user", _STRING, defaults.os_user if defaults else None)
        t.finish()
        if t.failed or peer is None or defaults is None:
            return None
        return PostgresNodeConfig(
            host, port, data_dir, bin_dir, os_user, defaults.superuser, defaults.replication_user, defaults.database
        )

    def _spec(
        self, cluster: ClusterSettings, nodes: tuple[NodeConfig, ...], timing: Timing, replication: Replication
    ) -> ClusterSpec | None:
        members = tuple(Member(n.name, n.kind, n.priority, n.nofailover) for n in nodes)
        try:
            return ClusterSpec(cluster.name, members, timing, replication)
        except SpecError as error:  # its paths are already full ("nodes[1].name", "cluster.name")
            self.problems.append(f"{error.path}: {error.message}")
            return None

    def _check_addresses(self, nodes: tuple[NodeConfig, ...]) -> None:
        # Two members sharing a PostgreSQL would each believe they own it: one
        # could promote the server the other is following.
        peers: dict[tuple[str, int], int] = {}
        servers: dict[tuple[str, int], int] = {}
        for index, node in enumerate(nodes):
            first = peers.setdefault(_address_key(node.peer.host, node.peer.port), index)
            if first != index:
                self.problems.append(
                    f'nodes[{index}].peer: "{node.peer}" is also the peer of nodes[{first}] ({nodes[first].name})'
                )
                continue  # its PostgreSQL host is most likely the same copy-paste slip
            if node.postgres is None:
                continue
            first = servers.setdefault(_address_key(node.postgres.host, node.postgres.port), index)
            if first != index:
                self.problems.append(
                    f'nodes[{index}].postgres: "{node.postgres}" is also the PostgreSQL of '
                    f"nodes[{first}] ({nodes[first].name})"
                )

    def _local(self, nodes: tuple[NodeConfig, ...], node: str | None) -> NodeConfig | None:
        by_name = {n.name: n for n in nodes}
        if node is None:
            return by_name.get(socket.gethostname().split(".")[0].lower())
        if node in by_name:
            return by_name[node]
        if nodes:  # with no members at all, the spec's own problem says enough
            self.problems.append(f"--node {node}: not a member (members: {', '.join(by_name)})")
        return None


def _address_key(host: str, port: int) -> tuple[str, int]:
    try:
        return ipaddress.ip_address(host).compressed, port
    except ValueError:
        return host.lower(), port
