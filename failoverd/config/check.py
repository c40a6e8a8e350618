"""The typed, path-naming reader of one TOML table, every problem collected
rather than the first raised.

A value kind turns one TOML value into ours or says what it is not; `_Table`
applies kinds to the keys of one table and records each problem under the
key path the user wrote (`nodes[1].postgres.port`), including the keys it was
never asked for. `failoverd.config.load` builds the configuration on top of this.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

_HOOK_TIMEOUT_MAX_S = 3600.0
_PROBE_TIMEOUT_MAX_S = 60.0
_COMMAND_TIMEOUT_MAX_S = 86400.0
# sun_path holds 107 bytes; PostgreSQL appends "/.s.PGSQL.<port>" (at most 16).
_SOCKET_DIR_MAX_BYTES = 107 - len("/.s.PGSQL.65535")
_INT64 = 2**63


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


_PG_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?")
_HBA_TYPES = (
    "local",
    "host",
    "hostssl",
    "hostnossl",
    "hostgssenc",
    "hostnogssenc",
    "include",
    "include_if_exists",
    "include_dir",
)


def pg_setting_name(name: str) -> str:
    """A postgresql.conf parameter name, lower case (PostgreSQL ignores case):
    `work_mem`, or `auto_explain.log_min_duration` for an extension's."""
    lowered = name.lower()
    if not _PG_SETTING_NAME.fullmatch(lowered):
        raise _Invalid("is not a PostgreSQL parameter name (letters, digits and _, one optional '.')")
    return lowered


def pg_setting_value(value: Any) -> str:
    """A TOML value as postgresql.conf writes it: a string quoted (units
    inside: '64MB'), a number as is, a boolean as on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(_integer(value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _Invalid("is not a finite number")
        return repr(value)
    text = _string(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _hba_lines(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid("is not an array of pg_hba.conf lines")
    lines = []
    for index, line in enumerate(value):
        try:
            text = _string(line).strip()
        except _Invalid as error:
            raise _Invalid(f"line {index + 1} {error}") from None
        first = text.split(None, 1)[0] if text else ""
        if first not in _HBA_TYPES:
            raise _Invalid(f"line {index + 1} does not start with a pg_hba.conf type ({', '.join(_HBA_TYPES[:6])})")
        lines.append(text)
    return tuple(lines)


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
_IPV4_INTERFACE = _Kind("IPv4 address with prefix length", _ipv4_interface)
_INTERFACE = _Kind("network interface name", _interface_name)
_HOOK_TIMEOUT = _Kind("number of seconds", _hook_timeout)
_PROBE_TIMEOUT = _Kind("number of seconds", _seconds_up_to(_PROBE_TIMEOUT_MAX_S))
_COMMAND_TIMEOUT = _Kind("number of seconds", _seconds_up_to(_COMMAND_TIMEOUT_MAX_S))
_SOCKET_DIR = _Kind("absolute path", _socket_dir)
_HBA_LINES = _Kind("array of pg_hba.conf lines", _hba_lines)

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
