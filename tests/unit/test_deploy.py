"""What gets deployed: the systemd unit, the example configurations and the
configuration reference, checked against systemd's own tools, the real CLI
and the configuration loader (the one source of truth for keys)."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from failoverd.adapters.watchdog import WatchdogHandle
from failoverd.config.load import ConfigError, parse_config
from failoverd.runtime.supervisor import FENCE_TIMEOUT_S, SHUTDOWN_GRACE_S
from tests.support.cluster import readable_runtime, system_python

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "failoverd.service"
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
REFERENCE_EXAMPLE = ROOT / "configs" / "three-nodes-quorum.toml"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
INSTALLED_BINARY = "/usr/local/bin/failoverd"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (systemd accumulates list settings)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {raw!r}"
        assert not line.endswith("\\"), "keep unit lines unbroken so this parser stays honest"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values is not None and len(values) == 1, f"[{section}] {key}= must be set exactly once, got {values}"
    return values[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min)?", value)
    assert match, f"{value!r}: write plain seconds or minutes"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def failoverd_cli() -> list[str]:
    script = Path(sys.executable).parent / "failoverd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "failoverd"]


def unit_for_this_host(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's failoverd:
    verify refuses a unit whose binary does not exist, and the installed path
    does not exist on a development machine."""
    binary = Path(sys.executable).parent / "failoverd"
    if not binary.exists():
        pytest.skip(f"no failoverd console script beside {sys.executable}: install the package (make venv)")
    text = UNIT.read_text()
    assert text.count(INSTALLED_BINARY) == 1, f"ExecStart must run {INSTALLED_BINARY} (deploy/README.md)"
    path = tmp_path / "failoverd.service"
    path.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return path


def need_systemd_analyze() -> None:
    if not os.access(SYSTEMD_ANALYZE, os.X_OK):
        pytest.skip(f"{SYSTEMD_ANALYZE} not found; on Debian it is in the 'systemd' package (apt-get install systemd)")


# --- the unit, as systemd reads it ----------------------------------------


def test_unit_passes_systemd_analyze_verify_without_a_word(tmp_path: Path) -> None:
    need_systemd_analyze()
    unit = unit_for_this_host(tmp_path)
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and unparsable values; it only
    # says so. Any output at all is a finding.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")

    # The same check does catch a misspelt key: the silence above means something.
    broken = tmp_path / "broken" / "failoverd.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("KillMode=process", "KillMod=process"))
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'KillMod'" in done.stderr


def test_unit_exposure_stays_low(tmp_path: Path) -> None:
    need_systemd_analyze()
    unit = unit_for_this_host(tmp_path)
    # 3.7 today (systemd 252). A dropped ProtectSystem=, NoNewPrivileges= or
    # capability bound pushes it over 4.0 and fails here.
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=40", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Overall exposure level for failoverd.service" in done.stdout


def test_unit_has_the_settings_the_design_relies_on() -> None:
    unit = parse_unit(UNIT.read_text())
    service = "Service"
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "postgres",
        "Group": "postgres",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "KillMode": "process",  # a standby's PostgreSQL outlives a restart of its supervisor
        "RemoveIPC": "no",  # would delete the shared memory of a PostgreSQL that outlives us
        "RuntimeDirectoryPreserve": "yes",  # its socket may live there
        "TasksMax": "infinity",
        "LimitCORE": "0",
    }
    assert {key: one(unit, service, key) for key in expected} == expected
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert set(one(unit, service, key).split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}, key
    for key in ("PrivateIPC", "PrivateDevices", "MemoryDenyWriteExecute", "DynamicUser", "PrivateUsers"):
        assert key not in unit[service], f"{key}= breaks PostgreSQL under this unit (see its comment)"
    read_write = one(unit, service, "ReadWritePaths").split()
    assert "/var/lib/postgresql" in read_write
    assert one(unit, service, "StateDirectory") == "failoverd"  # /var/lib/failoverd, [cluster] state_dir's default
    assert one(unit, service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_timeouts_cover_the_daemon_own_bounds() -> None:
    unit = parse_unit(UNIT.read_text())
    watchdog_s = seconds(one(unit, "Service", "WatchdogSec"))
    stop_s = seconds(one(unit, "Service", "TimeoutStopSec"))
    # The leader's orderly shutdown: a fence, three loops given a grace each,
    # then the fencing watchdog's pipe closed and waited for.
    close_s = inspect.signature(WatchdogHandle.close).parameters["timeout_s"].default
    shutdown_bound_s = FENCE_TIMEOUT_S + 3 * SHUTDOWN_GRACE_S + close_s
    assert stop_s >= shutdown_bound_s + 5, (stop_s, shutdown_bound_s)
    # A fence may hold the supervisor for FENCE_TIMEOUT_S; the systemd watchdog
    # must not fire on a healthy member doing that.
    assert watchdog_s >= 2 * FENCE_TIMEOUT_S
    assert seconds(one(unit, "Service", "RestartSec")) > 0


def test_exec_start_flags_are_the_cli_ones(tmp_path: Path) -> None:
    unit = parse_unit(UNIT.read_text())
    argv = one(unit, "Service", "ExecStart").split()
    assert argv[:2] == [INSTALLED_BINARY, "run"]
    assert argv[-1] == "$FAILOVERD_OPTIONS"  # unquoted: split into words, dropped when unset
    config_path = argv[argv.index("--config") + 1]
    assert config_path == "/etc/failoverd/failoverd.toml"
    # The real CLI parses the same flags: it gets as far as reading the file.
    missing = tmp_path / "failoverd.toml"
    flags = argv[1:-1]  # run --config PATH, without $FAILOVERD_OPTIONS
    flags[flags.index("--config") + 1] = str(missing)
    done = subprocess.run([*failoverd_cli(), *flags, "--node", "db1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78  # EX_CONFIG: the unit does not restart on it
    assert f"{missing}: cannot read the configuration file" in done.stderr
    assert "No such option" not in done.stderr


# --- the unit's capabilities, under the unit's credentials ---------------------


def _unit_credentials() -> list[str]:
    """setpriv arguments giving a process what the unit gives the daemon."""
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    caps = [c.removeprefix("CAP_").lower() for c in one(unit, "Service", "AmbientCapabilities").split()]
    bound = [c.removeprefix("CAP_").lower() for c in one(unit, "Service", "CapabilityBoundingSet").split()]
    user = one(unit, "Service", "User")
    args = [
        "setpriv",
        f"--reuid={user}",
        f"--regid={one(unit, 'Service', 'Group')}",
        "--init-groups",
        "--inh-caps=-all" + "".join(f",+{c}" for c in caps),
        "--ambient-caps=-all" + "".join(f",+{c}" for c in caps),
        "--bounding-set=-all" + "".join(f",+{c}" for c in bound),
    ]
    if service.get("NoNewPrivileges") == ["yes"]:
        args.append("--no-new-privs")
    return args


@pytest.fixture(scope="module")
def runtime() -> Iterator[Path]:
    """failoverd and its dependencies where the unit's user can read them:
    it may not reach this checkout or its virtualenv (a clone in a 0700
    home), as it cannot reach a checkout on a real host."""
    with readable_runtime("failoverd-deploy-") as bundle:
        yield bundle


def _in_private_netns(credentials: list[str], python_code: str, runtime: Path) -> subprocess.CompletedProcess[str]:
    """Run python_code as the unit would (the system interpreter on the
    runtime bundle), in a network namespace of its own (gone when the process
    exits) holding one veth pair: nothing is added to this host's namespace."""
    for program in ("unshare", "setpriv", "ip", "arping"):
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            pytest.skip(f"{program} not found (apt-get install util-linux iproute2 iputils-arping)")
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace and switches to the unit's user")
    setup = "ip link add va type veth peer name vb && ip link set va up && ip link set vb up"
    script = f'{setup} && exec "$@"'
    argv = ["unshare", "--net", "--", "sh", "-c", script, "sh", *credentials, "--", system_python(), "-c", python_code]
    env = {**os.environ, "PYTHONPATH": str(runtime)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/", env=env)


_VIP_COMMANDS = """
import subprocess, sys
def run(*argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    print(argv[0], argv[1], done.returncode, (done.stderr or done.stdout).strip()[-200:])
    return done.returncode
codes = [run("ip", "addr", "add", "198.18.0.100/24", "dev", "va"),
         run("arping", "-D", "-c", "1", "-w", "1", "-I", "va", "198.18.0.101"),
         run("ip", "addr", "del", "198.18.0.100/24", "dev", "va")]
sys.exit(1 if any(codes) else 0)
"""


def test_unit_capabilities_let_the_daemon_move_the_vip(runtime: Path) -> None:
    credentials = _unit_credentials()
    done = _in_private_netns(credentials, _VIP_COMMANDS, runtime)
    assert done.returncode == 0, done.stdout + done.stderr
    # Control: the same user without the ambient capabilities cannot, so the
    # success above is the unit's capabilities at work.
    bare = [a for a in credentials if not a.startswith("--ambient-caps=")]
    done = _in_private_netns(bare, _VIP_COMMANDS, runtime)
    assert done.returncode != 0
    assert "ip addr 2 RTNETLINK answers: Operation not permitted" in done.stdout


def test_vip_adapter_works_under_the_unit_credentials(runtime: Path) -> None:
    """The supervisor's own VIP commands (through failoverd.adapters.programs, which drops every
    other capability from children) keep what they need under the unit."""
    code = """
import asyncio, ipaddress, structlog
from failoverd.config.load import VipConfig
from failoverd.adapters.vip import VirtualIp
async def main():
    vip = VirtualIp(VipConfig(ipaddress.IPv4Interface("198.18.0.100/24"), "va"), arp_count=1)
    await vip.acquire()
    await vip.wait_announced()
    assert await vip.held()
    await vip.release()
    assert not await vip.held()
with structlog.testing.capture_logs() as logs:
    asyncio.run(main())
print(" ".join(entry["event"] for entry in logs))
"""
    done = _in_private_netns(_unit_credentials(), code, runtime)
    assert done.returncode == 0, done.stdout + done.stderr
    events = done.stdout.split()
    assert "vip_announced" in events, events  # arping -U ran with CAP_NET_RAW
    assert not [event for event in events if "fail" in event], events


_FIREWALL_PROBE = """
import socket, sys
def reachable(src, port):
    server = socket.create_server(("0.0.0.0", port))
    try:
        client = socket.socket()
        client.settimeout(0.5)
        client.bind((src, 0))
        try:
            client.connect(("198.18.0.11", port))
            return True
        except (TimeoutError, OSError):
            return False
        finally:
            client.close()
    finally:
        server.close()
print(" ".join(f"{src}:{port}={reachable(src, port)}"
               for src in ("198.18.0.12", "198.18.0.99") for port in (7400, 8008, 5432)))
"""


def test_firewall_table_loads_and_drops_what_it_should() -> None:
    """deploy/failoverd.nft in a network namespace of its own: members get
    through on every port, an unknown host on none."""
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.skip("needs root, nft (apt-get install nftables) and unshare")
    ruleset = ROOT / "deploy" / "failoverd.nft"
    script = (
        "ip link set lo up && ip addr add 198.18.0.11/32 dev lo && ip addr add 198.18.0.12/32 dev lo"
        f" && ip addr add 198.18.0.99/32 dev lo && nft -f {ruleset} && nft -f {ruleset}"  # loading twice is fine
        f' && exec "{sys.executable}" -c "$0"'
    )
    done = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", script, _FIREWALL_PROBE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "198.18.0.12:7400=True",
        "198.18.0.12:8008=True",
        "198.18.0.12:5432=True",
        "198.18.0.99:7400=False",
        "198.18.0.99:8008=False",
        "198.18.0.99:5432=False",
    ]


def test_install_guide_matches_the_unit() -> None:
    guide = (ROOT / "deploy" / "README.md").read_text()
    unit = parse_unit(UNIT.read_text())
    config_path = one(unit, "Service", "ExecStart").split()[3]
    for needed in (
        INSTALLED_BINARY,
        config_path,
        "/etc/systemd/system/failoverd.service",
        "/etc/default/failoverd",
        "FAILOVERD_OPTIONS",
        "create_main_cluster = false",
    ):
        assert needed in guide, needed


# --- the example configurations -------------------------------------------


def _members(path: Path) -> list[str]:
    return [node["name"] for node in tomllib.loads(path.read_text())["nodes"]]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_passes_check_config_on_every_member(path: Path) -> None:
    members = _members(path)
    assert len(members) >= 3
    for member in members:
        done = subprocess.run(
            [*failoverd_cli(), "check-config", str(path), "--node", member],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"--node {member}: {done.stderr}"
        assert done.stderr == ""
        [row] = [line for line in done.stdout.splitlines() if line.startswith(f"  {member} ")]
        assert row.endswith("yes")


def _known_keys() -> dict[str, list[str]]:
    """Every key the loader accepts, per table, as the loader itself lists
    them when it meets a key it does not know."""
    text = REFERENCE_EXAMPLE.read_text()
    probe = "zzzz_not_a_key = 1\n"
    for table in ("[cluster]", "[timing]", "[replication]", "[postgres]", "[vip]", "[api]", "[hooks]", "[logging]"):
        assert text.count(f"\n{table}\n") == 1, f"{REFERENCE_EXAMPLE.name} must have a {table} table"
        text = text.replace(f"\n{table}\n", f"\n{table}\n{probe}")
    text = text.replace("\n[[nodes]]\n", f"\n[[nodes]]\n{probe}", 1)
    text = text.replace("\n  [nodes.postgres]\n", f"\n  [nodes.postgres]\n  {probe}", 1)
    with pytest.raises(ConfigError) as caught:
        parse_config(probe + text, source="probe")
    known: dict[str, list[str]] = {}
    for problem in caught.value.problems:
        match = re.fullmatch(r"(\S*?)\.?zzzz_not_a_key: unknown key \(known keys: (.*)\)", problem)
        assert match, problem
        table = re.sub(r"\[\d+\]", "", match[1]) or "top"
        known[table] = list(dict.fromkeys(match[2].split(", ")))
    assert set(known) == {
        "top",
        "cluster",
        "timing",
        "replication",
        "postgres",
        "vip",
        "api",
        "hooks",
        "logging",
        "nodes",
        "nodes.postgres",
    }
    return known


def test_reference_example_and_docs_show_every_key() -> None:
    example = REFERENCE_EXAMPLE.read_text()
    doc = CONFIG_DOC.read_text()
    missing_example, missing_doc = [], []
    known = _known_keys()
    for table, keys in known.items():
        for key in keys:
            if table == "top":
                continue  # the tables themselves
            # A sub-table (its own keys, or free-form like [postgres.parameters])
            # is shown by its header; a plain key by `key = `, maybe commented.
            header = re.search(rf"^\s*\[{re.escape(table)}\.{re.escape(key)}\]$", example, re.MULTILINE)
            if f"{table}.{key}" in known:
                shown = header
            else:
                shown = header or re.search(rf"^\s*#?\s*{re.escape(key)} = ", example, re.MULTILINE)
            if not shown:
                missing_example.append(f"{table}.{key}")
            if f"`{key}`" not in doc and f"`[{table}.{key}]`" not in doc:
                missing_doc.append(f"{table}.{key}")
    assert missing_example == [], f"keys not shown in {REFERENCE_EXAMPLE.name}"
    assert missing_doc == [], f"keys not described in {CONFIG_DOC.relative_to(ROOT)}"


def test_docs_name_no_key_the_loader_does_not_know() -> None:
    """A key in the reference's tables that the loader refuses would send an
    operator straight into 'unknown key'."""
    known = {key for keys in _known_keys().values() for key in keys}
    doc = CONFIG_DOC.read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \|", doc, re.MULTILINE)
    assert rows, "the reference lists keys as table rows: | `key` | ..."
    assert sorted(set(rows) - known) == []
