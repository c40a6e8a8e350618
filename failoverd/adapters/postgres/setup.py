"""What failoverd writes into and reads out of a PostgreSQL data directory.

Pure functions (text in, text out) plus a few small file writers, kept apart
from the asyncio adapter in `adapter.py` so that the formats can be tested
and read on their own.

Where settings live, and why:

* `failoverd.conf` in the data directory holds everything that is specific to
  this member (addresses, socket directory, upstream) and the replication
  basics. `postgresql.conf` includes it at its end. It is rewritten before
  every start, because `pg_basebackup` and `pg_rewind` copy the *source's*
  copy (with the source's port) into the data directory.
* `postgresql.auto.conf` (ALTER SYSTEM) is read after it and so overrides it.
  failoverd uses it only for `synchronous_standby_names`, a setting that
  should travel with the data. The member-specific keys are scrubbed from it
  before every start, so a copied or hand-made entry cannot point a standby at
  the wrong upstream.
* `[postgres.parameters]` (the operator's settings for every member) go at
  the top of `failoverd.conf`, before failoverd's own, which therefore win
  (the configuration refuses a parameter failoverd sets anyway).
* `pg_hba.conf` is written once, at bootstrap; an adopted data directory keeps
  its own. The lines of `[postgres] hba` live in a marked block at its top
  (first match wins), rewritten at every start and reload; everything outside
  the block is the operator's and stays.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

NODE_CONF = "failoverd.conf"
INCLUDE_LINE = f"include '{NODE_CONF}'  # failoverd: member settings, rewritten before every start"
AUTO_CONF = "postgresql.auto.conf"

# Keys that identify this member or its upstream. A copy of another member's
# value (pg_basebackup and pg_rewind copy postgresql.auto.conf) would be wrong here.
MEMBER_KEYS = (
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "unix_socket_permissions",
    "cluster_name",
    "primary_conninfo",
    "primary_slot_name",
)

SCRAM_ITERATIONS = 4096
_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


# --- secrets --------------------------------------------------------------


def replication_password(secret: bytes) -> str:
    """The replication role's password, derived from the cluster secret so
    that every member knows it without it being configured anywhere."""
    return hmac.new(secret, b"failoverd replication password", hashlib.sha256).hexdigest()


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """A SCRAM-SHA-256 verifier as PostgreSQL stores it (RFC 5803 format).
    Sending this instead of the password keeps the password itself out of
    the server, its logs and pg_stat_statements."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda raw: base64.b64encode(raw).decode()
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def passfile_text(user: str, password: str) -> str:
    def esc(field: str) -> str:
        return field.replace("\\", "\\\\").replace(":", "\\:")

    return f"*:*:*:{esc(user)}:{esc(password)}\n"


# --- quoting ----------------------------------------------------------------


def conninfo(**params: object) -> str:
    """A libpq key=value connection string; every value is quoted."""
    parts = []
    for key, value in params.items():
        text = str(value).replace("\\", "\\\\").replace("'", "\\'")
        parts.append(f"{key}='{text}'")
    return " ".join(parts)


def conf_string(value: str) -> str:
    """A string literal for postgresql.conf (and for SQL: same rules)."""
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sync_standby_names(sync_count: int, standbys: Sequence[str]) -> str:
    if isinstance(sync_count, bool) or not isinstance(sync_count, int) or sync_count < 0:
        raise ValueError(f"sync_count {sync_count!r} is not a non-negative integer")
    if sync_count == 0:
        return ""
    names = list(dict.fromkeys(standbys))
    if sync_count > len(names):
        raise ValueError(f"ANY {sync_count} needs at least {sync_count} standbys, got {names}")
    return f"ANY {sync_count} ({', '.join(quote_ident(n) for n in names)})"


def slot_name(member: str) -> str:
    """A replication slot name for a member: slots allow only [a-z0-9_].
    A name with '-' gets a hash suffix so that "db-1" and "db_1" differ."""
    if re.fullmatch(r"[a-z0-9_]{1,63}", member):
        return member
    base = re.sub(r"[^a-z0-9_]", "_", member.lower())[:54]
    return f"{base}_{hashlib.sha256(member.encode()).hexdigest()[:8]}"


# --- LSNs, timelines, pg_controldata, pg_waldump ---------------------------


def parse_lsn(text: str) -> int:
    m = _LSN.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not an LSN")
    return (int(m[1], 16) << 32) | int(m[2], 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def timeline_of_walfile(name: str) -> int:
    if not re.fullmatch(r"[0-9A-F]{24}", name):
        raise ValueError(f"{name!r} is not a WAL file name")
    return int(name[:8], 16)


def parse_controldata(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def parse_history(text: str) -> list[tuple[int, int]]:
    """A timeline history file: (timeline, LSN where it ended) per ancestor."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f"bad timeline history line {line!r}")
        entries.append((int(fields[0]), parse_lsn(fields[1])))
    return entries


def compatible(
    timeline: int, lsn: int, leader_timeline: int, leader_lsn: int, history: Iterable[tuple[int, int]]
) -> bool:
    """Whether WAL ending at (timeline, lsn) is a prefix of the leader's
    history, so that the server can stream from the leader without a rewind."""
    if timeline == leader_timeline:
        return lsn <= leader_lsn
    for ancestor, switchpoint in history:
        if ancestor == timeline:
            return lsn <= switchpoint
    return False


def waldump_end(stderr: str, segment_size: int) -> int | None:
    """The end of valid WAL from the error with which `pg_waldump -q` stops.

    pg_waldump reads until the first invalid record, which is where crash
    recovery would stop too. Record-level errors name the LSN where the next
    record was expected; page-level errors name a segment and offset, whose
    LSN is at or after the end (never before it), which errs on the side of
    reporting more WAL than there is."""
    segment = re.search(r"in log segment ([0-9A-F]{24}), offset (\d+)", stderr)
    if segment:
        segno = int(segment[1][8:16], 16) * (0x100000000 // segment_size) + int(segment[1][16:], 16)
        return segno * segment_size + int(segment[2])
    missing = re.search(r'could not find file "([0-9A-F]{24})"', stderr)
    if missing:
        segno = int(missing[1][8:16], 16) * (0x100000000 // segment_size) + int(missing[1][16:], 16)
        return segno * segment_size
    detail = stderr.partition("error in WAL record at ")[2]
    if detail:
        detail = detail.partition(": ")[2]  # skip the last good record's own LSN
        lsns = _LSN.findall(detail)
        if lsns:
            high, low = lsns[-1]
            return (int(high, 16) << 32) | int(low, 16)
    return None


# --- configuration text --------------------------------------------------------


def socket_path_problem(socket_dir: Path, port: int) -> str | None:
    path = f"{socket_dir}/.s.PGSQL.{port}"
    if len(path.encode()) > _SOCKET_PATH_MAX:
        return f"socket path {path} is longer than {_SOCKET_PATH_MAX} bytes; set [postgres] socket_dir shorter"
    return None


def node_conf_text(
    *,
    member: str,
    host: str,
    port: int,
    socket_dir: Path,
    primary_conninfo: str,
    primary_slot_name: str,
    parameters: Sequence[tuple[str, str]] = (),
) -> str:
    settings = {
        # Every address, not just the member's own: clients reach the
        # primary through the VIP, which comes and goes with leadership.
        # pg_hba.conf decides who may connect.
        "listen_addresses": conf_string("*"),
        "port": str(port),
        "unix_socket_directories": conf_string(str(socket_dir)),
        "unix_socket_permissions": "0700",  # the socket is trusted (local trust): only its owner may use it
        "cluster_name": conf_string(member),
        "wal_level": "replica",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "hot_standby": "on",
        "wal_log_hints": "on",  # pg_rewind needs it (or checksums) on every server it may rewind
        "full_page_writes": "on",  # pg_rewind needs it on the source
        "synchronous_commit": "on",
        "wal_keep_size": "'256MB'",  # a standby reconnecting without its slot still finds recent WAL
        "wal_retrieve_retry_interval": "'1s'",  # retry the upstream sooner after a failover
        "recovery_target_timeline": "'latest'",
        "primary_conninfo": conf_string(primary_conninfo),
        "primary_slot_name": conf_string(primary_slot_name),
    }
    lines = [
        f"# Written by failoverd for member {member} before every start and at every reload: edits are lost.",
        "# postgresql.auto.conf (ALTER SYSTEM) overrides these, except the member-specific",
        "# keys, which failoverd removes from it.",
    ]
    if parameters:
        lines.append("# [postgres.parameters] of the failoverd configuration:")
        lines += [f"{key} = {value}" for key, value in parameters]
        lines.append("# failoverd's own settings:")
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


HBA_BEGIN = "# BEGIN failoverd: [postgres] hba of the failoverd configuration, rewritten at every start and reload"
HBA_END = "# END failoverd"


def with_managed_hba(hba_conf: str, lines: Sequence[str]) -> str:
    """pg_hba.conf with the managed block at its top holding `lines` (none:
    no block); every line outside the block is kept as it was."""
    kept: list[str] = []
    inside = False
    for line in hba_conf.splitlines():
        if line.strip() == HBA_BEGIN:
            inside = True
        elif inside and line.strip() == HBA_END:
            inside = False
        elif not inside:
            kept.append(line)
    block = [HBA_BEGIN, *lines, HBA_END] if lines else []
    return "\n".join([*block, *kept]) + "\n"


def hba_text(*, replication_user: str, database: str, hosts: Iterable[str]) -> str:
    lines = [
        "# Written by failoverd at bootstrap; later edits are kept (and copied to",
        "# members that clone or rewind from this one).",
        "# TYPE  DATABASE  USER  ADDRESS  METHOD",
        "# The Unix socket lives in a directory only the PostgreSQL OS user can enter.",
        "local   all           all   trust",
        "local   replication   all   trust",
    ]
    user = quote_ident(replication_user)
    for address in dict.fromkeys(_hba_address(h) for h in hosts):
        lines.append(f"host    replication   {user}   {address}   scram-sha-256")
        lines.append(f"host    {quote_ident(database)}   {user}   {address}   scram-sha-256")
    lines.append("# Clients: password authentication from anywhere; add narrower rules above.")
    lines.append("host    all           all   all   scram-sha-256")
    return "\n".join(lines) + "\n"


def address_key(host: str, port: int) -> tuple[str, int]:
    """A comparable (host, port): IP addresses in one spelling, names in lower case."""
    try:
        return ipaddress.ip_address(host).compressed, int(port)
    except ValueError:
        return host.lower(), int(port)


def _hba_address(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a hostname; PostgreSQL checks it by forward and reverse lookup
    return f"{address.compressed}/{address.max_prefixlen}"


def with_include(postgresql_conf: str) -> str:
    if any(line.strip() == INCLUDE_LINE for line in postgresql_conf.splitlines()):
        return postgresql_conf
    sep = "" if postgresql_conf.endswith("\n") or not postgresql_conf else "\n"
    return f"{postgresql_conf}{sep}{INCLUDE_LINE}\n"


def edit_auto_conf(text: str, *, remove: Iterable[str] = (), set_values: dict[str, str] | None = None) -> str:
    """postgresql.auto.conf with keys removed or set; only while the server is stopped."""
    drop = set(remove) | set(set_values or {})
    kept = [line for line in text.splitlines() if _conf_key(line) not in drop]
    if not kept:
        kept = ["# Do not edit this file manually!", "# It will be overwritten by the ALTER SYSTEM command."]
    kept += [f"{key} = {conf_string(value)}" for key, value in (set_values or {}).items()]
    return "\n".join(kept) + "\n"


def _conf_key(line: str) -> str | None:
    m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(=|\s)", line)
    return m[1].lower() if m else None


def auto_conf_keys(text: str) -> set[str]:
    return {key for line in text.splitlines() if (key := _conf_key(line))}


# --- files ------------------------------------------------------------------------


def write_file(path: Path, text: str, *, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` atomically and durably, owned by `owner` (uid, gid) when given."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: Path, owner: tuple[int, int] | None) -> None:
    """Create a directory only its owner can enter; an existing one is left as it is."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)
    if owner is not None:
        os.chown(path, *owner)


# --- the data directory ---------------------------------------------------------------


def write_member_files(
    data_dir: Path,
    conf_text: str,
    *,
    standby: bool,
    stopped: bool,
    owner: tuple[int, int] | None,
    hba_lines: Sequence[str] = (),
) -> None:
    """failoverd.conf, the include in postgresql.conf, the managed block of
    pg_hba.conf, the signal file, and (while stopped) member keys scrubbed
    from postgresql.auto.conf."""
    write_file(data_dir / NODE_CONF, conf_text, owner=owner)
    write_managed_hba(data_dir, hba_lines, owner=owner)
    conf = data_dir / "postgresql.conf"
    current = conf.read_text()
    if with_include(current) != current:
        write_file(conf, with_include(current), owner=owner)
    if stopped:
        update_auto_conf(data_dir, remove=MEMBER_KEYS, owner=owner)
    set_standby_signal(data_dir, standby, owner)


def write_managed_hba(data_dir: Path, lines: Sequence[str], *, owner: tuple[int, int] | None) -> None:
    path = data_dir / "pg_hba.conf"
    current = path.read_text() if path.exists() else ""
    wanted = with_managed_hba(current, lines)
    if wanted != current:
        write_file(path, wanted, owner=owner)


def set_standby_signal(data_dir: Path, standby: bool, owner: tuple[int, int] | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "recovery.signal").unlink()
    signal_file = data_dir / "standby.signal"
    if not standby:
        with contextlib.suppress(FileNotFoundError):
            signal_file.unlink()
    elif not signal_file.exists():
        write_file(signal_file, "", owner=owner)


def update_auto_conf(
    data_dir: Path,
    *,
    remove: Iterable[str] = (),
    set_values: dict[str, str] | None = None,
    owner: tuple[int, int] | None,
) -> None:
    """Edit postgresql.auto.conf in place; only while the server is stopped
    (a running server rewrites it on ALTER SYSTEM)."""
    path = data_dir / AUTO_CONF
    current = path.read_text() if path.exists() else ""
    remove = tuple(remove)
    if not set_values and not (auto_conf_keys(current) & set(remove)):
        return
    write_file(path, edit_auto_conf(current, remove=remove, set_values=set_values), owner=owner)


def prepare_run_dir(socket_dir: Path, passfile: Path, passfile_content: str, owner: tuple[int, int] | None) -> None:
    make_private_dir(socket_dir, owner)
    if not passfile.exists() or passfile.read_text() != passfile_content:
        write_file(passfile, passfile_content, owner=owner)


def fresh_sibling_dir(data_dir: Path, owner: tuple[int, int] | None) -> Path:
    """An empty private directory beside the data directory, for initdb or a
    clone to fill before it is renamed into place: a half-done one is never
    mistaken for a cluster."""
    tmp = Path(f"{data_dir}.failoverd-tmp")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover, which never was a data directory
    make_private_dir(tmp, owner)
    return tmp


def check_replaceable(data_dir: Path) -> None:
    """Only a missing or empty directory may be replaced by a new cluster."""
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise FileExistsError(f"{data_dir} exists, is not empty and holds no cluster; not replacing it")


def move_into_place(tmp: Path, data_dir: Path) -> None:
    check_replaceable(data_dir)
    if data_dir.exists():
        data_dir.rmdir()  # empty; a mount point fails here, as PostgreSQL advises against using one
    os.rename(tmp, data_dir)
    fsync_dir(data_dir.parent)


def move_aside(data_dir: Path) -> Path:
    """Rename the data directory to <data_dir>.failed-<UTC time>; never delete it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # a name for humans, not a clock we act on
    aside = Path(f"{data_dir}.failed-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = Path(f"{data_dir}.failed-{stamp}-{n}")
    os.rename(data_dir, aside)
    fsync_dir(data_dir.parent)
    return aside
