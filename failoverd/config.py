"""The TOML configuration file, read into frozen dataclasses.

The protocol's inputs become a `ClusterSpec`, which checks its own safety
rules; this module only checks TOML types and the adapter-side settings the
core never sees (addresses, paths, users, hooks) and reports the spec's
objections under the key path the user wrote.

Problems are collected rather than raised one at a time: a failover manager
is often configured under pressure, and a fix-one-and-rerun loop wastes it.
Unknown keys are problems too, because a misspelt key would otherwise fall
back to its default without a word.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import json
import re
import socket
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from failoverd.core.spec import ClusterSpec, Member, MemberKind, Replication, ReplicationMode, SpecError, Timing

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]

_HOOK_TIMEOUT_MAX_S = 3600.0
_PROBE_TIMEOUT_MAX_S = 60.0
_COMMAND_TIMEOUT_MAX_S = 86400.0
# sun_path holds 107 bytes; PostgreSQL appends "/.s.PGSQL.<port>" (at most 16).
_SOCKET_DIR_MAX_BYTES = 107 - len("/.s.PGSQL.65535")
_INT64 = 2**63


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


def _syntax_problem(message: str) -> str:
    at = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if at:
        return f"line {at[2]}, column {at[3]}: invalid TOML: {at[1]}"
    if message.endswith(" (at end of document)"):
        return f"at the end of the file: invalid TOML: {message.removesuffix(' (at end of document)')}"
    return f"invalid TOML: {message}"


# --- value kinds: each turns a TOML value into ours or says what it is not ---


class _Invalid(Exception):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class _Kind:
    noun: str  # completes "missing (a required ...)"
    convert: Callable[[Any], Any]


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("is not a string")
    if not value:
        raise _Invalid("is empty")
    # Surrogates and control characters only arrive by mistake, and would
    # break printing the value or passing it to a command.
    if re.search(r"[\x00-\x1f\x7f\ud800-\udfff]", value):
        raise _Invalid("contains a control character")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("is not an integer")
    if not -_INT64 <= value < _INT64:
        raise _Invalid("does not fit in 64 bits")
    return value


def _number(value: Any) -> float:
    if isinstance(value, float):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("is not a number")
    return float(_integer(value))


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("is not true or false")
    return value


def _path(value: Any) -> Path:
    # A daemon started by systemd has no meaningful working directory.
    if not PurePosixPath(_string(value)).is_absolute():
        raise _Invalid("is not an absolute path")
    return Path(value)


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


def _ipv4_interface(value: Any) -> ipaddress.IPv4Interface:
    text = _string(value)
    if "/" not in text:
        raise _Invalid("has no prefix length (write e.g. 198.18.0.100/24)")
    try:
        return ipaddress.IPv4Interface(text)
    except ValueError:
        raise _Invalid("is not an IPv4 address with prefix length, e.g. 198.18.0.100/24") from None


def _interface_name(value: Any) -> str:
    # The kernel's own rule (dev_valid_name): under 16 bytes, no '/', ':' or space.
    text = _string(value)
    if len(text.encode()) > 15 or text in (".", "..") or re.search(r"[/:\s]", text):
        raise _Invalid("is not a network interface name")
    return text


def _hook_timeout(value: Any) -> float:
    seconds = _number(value)
    if not 0 < seconds <= _HOOK_TIMEOUT_MAX_S:
        raise _Invalid(f"is not within 0..{_HOOK_TIMEOUT_MAX_S:g} s")
    return seconds


def _seconds_up_to(limit: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        seconds = _number(value)
        if not 0 < seconds <= limit:
            raise _Invalid(f"is not within 0..{limit:g} s")
        return seconds

    return convert


def _socket_dir(value: Any) -> Path:
    path = _path(value)
    if len(str(path).encode()) > _SOCKET_DIR_MAX_BYTES:
        raise _Invalid(f"is too long for a Unix socket directory (at most {_SOCKET_DIR_MAX_BYTES} bytes)")
    return path


def _choice(*allowed: str) -> _Kind:
    def convert(value: Any) -> str:
        if value not in allowed:
            raise _Invalid("is not one of " + ", ".join(json.dumps(a) for a in allowed))
        return value

    return _Kind("one of " + ", ".join(json.dumps(a) for a in allowed), convert)


_STRING = _Kind("string", _string)
_INTEGER = _Kind("integer", _integer)
_NUMBER = _Kind("number", _number)
_BOOLEAN = _Kind("true or false", _boolean)
_PATH = _Kind("absolute path", _path)
_PORT = _Kind("port", _port)
_HOST = _Kind("host", _host)
_HOST_PORT = _Kind("host:port", _host_port)
_IPV4_INTERFACE = _Kind("IPv4 address with prefix length", _ipv4_interface)
_INTERFACE = _Kind("network interface name", _interface_name)
_HOOK_TIMEOUT = _Kind("number of seconds", _hook_timeout)
_PROBE_TIMEOUT = _Kind("number of seconds", _seconds_up_to(_PROBE_TIMEOUT_MAX_S))
_COMMAND_TIMEOUT = _Kind("number of seconds", _seconds_up_to(_COMMAND_TIMEOUT_MAX_S))
_SOCKET_DIR = _Kind("absolute path", _socket_dir)

_REQUIRED: Any = object()
_ABSENT: Any = object()


def _show(value: Any) -> str:
    """A value as the user would have written it in TOML, kept short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = json.dumps(value)  # ASCII-only, so a hostile value cannot disturb the terminal
        return shown if len(shown) <= 60 else shown[:55] + '"...'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int) and abs(value) >= _INT64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return repr(value)


def _join(path: str, key: str) -> str:
    shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
    return f"{path}.{shown}" if path else shown


class _Table:
    """One TOML table being read. It remembers which keys were asked for, so
    that `finish` can report the rest as unknown; `failed` says whether any
    problem was found in it, so nothing is built from a broken table."""

    def __init__(self, raw: Any, path: str, problems: list[str], *, required: bool = False) -> None:
        self.path = path
        self.problems = problems
        self.failed = False
        self.present = isinstance(raw, dict)
        self.raw: dict[str, Any] = raw if isinstance(raw, dict) else {}
        self.known: list[str] = []
        if raw is _ABSENT:
            if required:
                self._add(path, "missing (a required table)")
        elif not isinstance(raw, dict):
            self._add(path, f"{_show(raw)} is not a table")
        # A table reported as missing or mistyped is one problem, not one per required key.
        self.quiet = self.failed

    def _add(self, path: str, message: str) -> None:
        self.failed = True
        self.problems.append(f"{path}: {message}")

    def problem(self, key: str, message: str) -> None:
        self._add(_join(self.path, key), message)

    def get(self, key: str, kind: _Kind, default: Any = _REQUIRED) -> Any:
        self.known.append(key)
        if key not in self.raw:
            if default is _REQUIRED:
                if not self.quiet:
                    self.problem(key, f"missing (a required {kind.noun})")
                return None
            return default
        value = self.raw[key]
        try:
            return kind.convert(value)
        except _Invalid as error:
            self.problem(key, f"{_show(value)} {error}")
            return None

    def table(self, key: str, *, required: bool = False) -> _Table:
        self.known.append(key)
        child = _Table(self.raw.get(key, _ABSENT), _join(self.path, key), self.problems, required=required)
        child.quiet = child.quiet or self.quiet
        return child

    def finish(self) -> None:
        for key in self.raw:
            if key in self.known:
                continue
            close = difflib.get_close_matches(key, self.known, n=1)
            hint = f"did you mean {json.dumps(close[0])}?" if close else "known keys: " + ", ".join(self.known)
            self.problem(key, f"unknown key ({hint})")


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
        defaults = self._postgres_defaults(top.table("postgres"))
        vip = self._vip(top.table("vip"))
        api = self._api(top.table("api"))
        hooks = self._hooks(top.table("hooks"))
        logging = self._logging(top.table("logging"))
        nodes = self._nodes(top, defaults)
        top.finish()
        self._raise_if_problems()
        spec = self._spec(cluster, nodes, timing, replication)
        self._check_addresses(nodes)
        local = self._local(nodes, node)
        self._raise_if_problems()
        return Config(spec, cluster, nodes, local, defaults, vip, api, hooks, logging, self.source)

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
        t.finish()
        return None if t.failed else PostgresDefaults(**values)

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

    def _nodes(self, top: _Table, defaults: PostgresDefaults | None) -> tuple[NodeConfig, ...]:
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
