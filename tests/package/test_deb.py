"""The Debian package (`make deb`, packaging/build_deb.py) in a fresh Debian 12.

The package is built from this checkout, in the background while the root
is made (or taken from FAILOVERD_DEB, e.g. the one `make deb` wrote), then
installed the way deploy/README.md tells an operator to: postgresql-common
first with create_main_cluster = false, `dpkg -i`, which stops at the missing
dependencies, and `apt-get -f install`, which brings them from Debian. The
Debian root is a minimal bookworm made by debootstrap from the mirror this
machine's apt uses (/etc/apt/sources.list*), once for this module's tests and
removed after the last of them. Inside it (chroot): `failoverd --version`,
check-config of the three-node example as the postgres user, the fencing
watchdog started through the package's interpreter, `systemd-analyze verify`
of the installed unit, and a purge.

The root lives on a tmpfs (debootstrap and dpkg on it take a third of the
time they take on this disk, and removing it is instant) in a mount namespace
of its own, held by a helper process that exits when its pipe from pytest
closes: the tmpfs and the /proc and package cache mounted in the root are
never visible outside, and vanish with the namespace after this module's
last test, or when pytest dies, whatever happened. Nothing is ever left
mounted on the host; the empty directory in /var/tmp that the tmpfs covered
is removed at the end, or by the next run if pytest was killed.

The .debs that debootstrap and apt download (about 120 MB) go to the
tmpfs too, unless FAILOVERD_TEST_APT_CACHE names a directory to keep them in
across runs (for a slow mirror: here a cold cache costs nothing measurable).
The parts' times are printed after the run.

Skipped only when not root, or when the mirror cannot be reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "packaging" / "build_deb.py"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SUITE = "bookworm"
SUITES = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
KEPT_APT_CACHE = os.environ.get("FAILOVERD_TEST_APT_CACHE")  # default: in the tmpfs, gone at the end
ROOTS_IN = Path("/var/tmp")
ROOT_PREFIX = "failoverd-deb-root-"
EXAMPLE = "/usr/share/doc/failoverd/examples/three-nodes-quorum.toml"
UNIT = "/lib/systemd/system/failoverd.service"
PRIVATE_PYTHON = "/usr/lib/failoverd/bin/python3.11"
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: debootstrap, chroot and dpkg in a Debian root"),
    # The first test also waits for the package and the root (about 2 min
    # here; far more with a slow mirror or index).
    pytest.mark.timeout(900),
]


# ------------------------------------------------------------------ helpers


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


@contextlib.contextmanager
def timed(timings: dict[str, float], part: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[part] = timings.get(part, 0.0) + time.monotonic() - start


def apt_proxies() -> dict[str, str]:
    """apt's own proxy settings, for debootstrap and for apt in the root."""
    done = subprocess.run(
        ["apt-config", "shell", "HTTP", "Acquire::http::Proxy", "HTTPS", "Acquire::https::Proxy"],
        capture_output=True,
        text=True,
    )
    found = dict(shlex.split(line)[0].split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    proxies = {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    if found.get("HTTP") and "http_proxy" not in proxies:
        proxies["http_proxy"] = found["HTTP"]
    if found.get("HTTPS") and "https_proxy" not in proxies:
        proxies["https_proxy"] = found["HTTPS"]
    return proxies


def host_env() -> dict[str, str]:
    """This process's environment without the virtualenv's Python settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=STANDARD_PATH, LC_ALL="C.UTF-8", **apt_proxies())
    return env


@dataclasses.dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    origin: str  # the file it is configured in


def debian_sources() -> list[AptSource]:
    """The bookworm entries (component main) of this machine's apt sources,
    one-line (.list) and deb822 (.sources) formats."""
    directory = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(directory.glob("*.list")), *sorted(directory.glob("*.sources"))]
    found: list[AptSource] = []
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for paragraph in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = None
                for line in paragraph.splitlines():
                    if line.lstrip().startswith("#"):
                        continue
                    if line[:1].isspace() and key:
                        fields[key] += " " + line.strip()
                    elif ":" in line:
                        key, value = line.split(":", 1)
                        key = key.strip().lower()
                        fields[key] = value.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                if "main" not in fields.get("components", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        if suite in SUITES:
                            found.append(AptSource(uri.rstrip("/"), suite, str(path)))
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                match = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
                if match and match[2] in SUITES and "main" in match[3].split():
                    found.append(AptSource(match[1].rstrip("/"), match[2], str(path)))
    return list(dict.fromkeys(found))


def unreachable(uri: str) -> str | None:
    """Why the mirror's Release file cannot be fetched, or None."""
    url = f"{uri}/dists/{SUITE}/Release"
    proxies = {k.split("_")[0]: v for k, v in apt_proxies().items() if k.endswith("_proxy") and k != "no_proxy"}
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler(proxies) if proxies else urllib.request.BaseHandler()
    )
    try:
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=20) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {getattr(error, 'reason', None) or error}"
    return None


def mountpoints() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), point))
    return points


def remove_tree(base: Path) -> None:
    """rm -rf that refuses to run while anything below is mounted (here), and
    never crosses into another file system."""
    inside = [p for p in mountpoints() if p == str(base) or p.startswith(f"{base}/")]
    if inside:
        raise RuntimeError(f"not removing {base}: still mounted there: {inside}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)


def remove_stale_roots() -> None:
    """What runs killed before their cleanup left: the directories their
    tmpfs covered (the tmpfs itself went with their namespace)."""
    for base in ROOTS_IN.glob(f"{ROOT_PREFIX}*"):
        try:
            pid = int((base / "pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            remove_tree(base)
        except (OSError, ValueError):
            continue  # being created, or not ours
        # else: a live run's


# The namespace's holder: a tmpfs on the directory, then wait for EOF.
_HOLD = 'mount -t tmpfs -o size=4g,mode=0755 failoverd-deb-test "$1" && mkdir "$1/root" && echo ready && exec cat >/dev/null'


class Root:
    """A Debian root on a tmpfs, in a mount namespace held by a helper
    process (`holder`) that ends with its stdin. `path` is the root as seen
    from here (through /proc/<holder>/root), `inside` as seen in the
    namespace."""

    def __init__(self, base: Path, proxies: dict[str, str]) -> None:
        self.env = {"PATH": STANDARD_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        self.env.update(proxies)
        self.inside = base / "root"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _HOLD, "sh", str(base)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=host_env(),
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            error = self.close()
            pytest.fail(f"cannot mount a tmpfs in a new mount namespace (unshare): {error}", pytrace=False)
        self.path = Path(f"/proc/{self.holder.pid}/root{self.inside}")

    def close(self) -> str:
        """End the namespace (and with it the tmpfs and every mount in it)."""
        assert self.holder.stdin is not None and self.holder.stdout is not None and self.holder.stderr is not None
        self.holder.stdin.close()
        try:
            self.holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait()
        error = self.holder.stderr.read()
        self.holder.stdout.close()
        self.holder.stderr.close()
        return error

    def in_namespace(self, *argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        command = ["nsenter", f"--target={self.holder.pid}", "--mount", "--", *argv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=host_env())
        if check and done.returncode != 0:
            pytest.fail(
                f"`{shlex.join(argv)}` exited {done.returncode}\n"
                f"--- stdout\n{tail(done.stdout)}\n--- stderr\n{tail(done.stderr)}",
                pytrace=False,
            )
        return done

    def run(self, *argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`argv` in the root (chroot), with a clean environment."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        return self.in_namespace("chroot", str(self.inside), "env", "-i", *env, *argv, check=check, timeout=timeout)

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kw)

    def apt_install(self, *packages: str) -> None:
        self.run("apt-get", "install", "-y", "-q", "--no-install-recommends", *packages)


# ----------------------------------------------------------------- fixtures


class Build:
    """packaging/build_deb.py in the background, in a process group of its
    own, its staging directory (TMPDIR) and the .deb under `out`."""

    def __init__(self, out: Path) -> None:
        (out / "tmp").mkdir()
        self.stderr = out / "build_deb.log"
        self.started = time.monotonic()
        with self.stderr.open("w") as stderr:
            self.process = subprocess.Popen(
                ["/usr/bin/python3", str(BUILD_SCRIPT), "--out", str(out)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=dict(host_env(), TMPDIR=str(out / "tmp")),
                start_new_session=True,
            )

    def wait(self) -> tuple[Path, float]:
        """The .deb and the seconds the build took in all."""
        stdout, _ = self.process.communicate(timeout=600)
        seconds = time.monotonic() - self.started
        if self.process.returncode != 0:
            pytest.fail(
                f"packaging/build_deb.py exited {self.process.returncode}:\n{tail(self.stderr.read_text())}",
                pytrace=False,
            )
        path = Path(stdout.strip().splitlines()[-1])
        assert path.is_file() and path.suffix == ".deb", stdout
        return path, seconds

    def stop(self) -> None:
        """The build and the pip it runs, if still running (a failed setup)."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its group: start_new_session
        try:
            self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate()


@pytest.fixture(scope="module")
def deb_build(
    mirror: tuple[AptSource, list[AptSource]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Build | None]:
    """The package build, started before debootstrap (debian_root asks for
    it first) so that the two run side by side; None with FAILOVERD_DEB."""
    if os.environ.get("FAILOVERD_DEB"):
        yield None
        return
    build = Build(tmp_path_factory.mktemp("deb"))
    try:
        yield build
    finally:
        build.stop()


@pytest.fixture(scope="module")
def deb(deb_build: Build | None, deb_timings: dict[str, float]) -> Path:
    if deb_build is None:
        path = Path(os.environ["FAILOVERD_DEB"])
        assert path.is_file(), f"FAILOVERD_DEB={path}: no such file"
        return path
    start = time.monotonic()
    path, seconds = deb_build.wait()
    part = f"build the package (packaging/build_deb.py): {seconds:.1f} s in all, alongside debootstrap; waited"
    deb_timings[part] = time.monotonic() - start
    return path


@pytest.fixture(scope="module")
def mirror() -> tuple[AptSource, list[AptSource]]:
    """The mirror debootstrap will use (this machine's `bookworm main`
    source) and all of this machine's bookworm sources; skips the module's
    tests when the mirror cannot be reached."""
    sources = debian_sources()
    main = [s for s in sources if s.suite == SUITE]
    if not main:
        pytest.fail(
            f"no `{SUITE} main` entry in /etc/apt/sources.list or sources.list.d: no mirror to use", pytrace=False
        )
    why = unreachable(main[0].uri)
    if why is not None:
        pytest.skip(f"debootstrap cannot reach the Debian mirror {main[0].uri} (configured in {main[0].origin}): {why}")
    return main[0], sources


@pytest.fixture(autouse=True)
def _needs_the_mirror(mirror: tuple[AptSource, list[AptSource]]) -> None:
    """Every test: no package is built when there is nowhere to install it."""


@pytest.fixture(scope="module")
def debian_root(
    deb_build: Build | None, mirror: tuple[AptSource, list[AptSource]], deb_timings: dict[str, float]
) -> Iterator[Root]:
    """A minimal bookworm (debootstrap --variant=minbase) with this machine's
    Debian sources, removed after the module's last test. The package is being
    built meanwhile (deb_build, asked for first)."""
    debootstrap = shutil.which("debootstrap", path=STANDARD_PATH)
    if debootstrap is None:
        pytest.fail("debootstrap is not installed: apt-get install debootstrap (`make package-tools`)", pytrace=False)
    main, sources = mirror
    remove_stale_roots()
    base = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=ROOTS_IN))
    (base / "pid").write_text(str(os.getpid()))
    root = Root(base, apt_proxies())
    try:
        if KEPT_APT_CACHE:
            apt_cache = Path(KEPT_APT_CACHE)
            apt_cache.mkdir(parents=True, exist_ok=True)
        else:
            apt_cache = base / "apt-cache"  # in the namespace: on the tmpfs
            root.in_namespace("mkdir", str(apt_cache))
        with timed(deb_timings, f"debootstrap --variant=minbase {SUITE} from {main.uri} (to a tmpfs)"):
            done = root.in_namespace(
                debootstrap,
                "--variant=minbase",
                f"--cache-dir={apt_cache}",
                SUITE,
                str(root.inside),
                main.uri,
                check=False,
                timeout=900,
            )
        if done.returncode != 0:
            log = root.path / "debootstrap" / "debootstrap.log"
            details = log.read_text() if log.exists() else done.stdout
            pytest.fail(f"debootstrap exited {done.returncode}:\n{tail(done.stderr)}\n{tail(details)}", pytrace=False)
        with timed(deb_timings, "apt-get update in the root"):
            # /proc, and the shared package cache as apt's, for good (in the namespace).
            root.in_namespace(
                "sh",
                "-ec",
                'mount -t proc proc "$1/proc"; mount --bind "$2" "$1/var/cache/apt/archives"',
                "sh",
                str(root.inside),
                str(apt_cache),
            )
            lines = [f"deb {s.uri} {s.suite} main" for s in sources]
            (root.path / "etc/apt/sources.list").write_text("\n".join(dict.fromkeys(lines)) + "\n")
            # No service of any package starts in the root.
            policy = root.path / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            root.run("apt-get", "update", "-q")
        yield root
    finally:
        with timed(deb_timings, "remove the root"):
            if KEPT_APT_CACHE and (root.path / "usr/bin/apt-get").exists() and (root.path / "proc/self").exists():
                root.run("apt-get", "autoclean", "-q", check=False)
            root.close()
            remove_tree(base)


@pytest.fixture(scope="module")
def installed(debian_root: Root, deb: Path, deb_timings: dict[str, float]) -> Root:
    """The package installed in the root as deploy/README.md says, on a host
    that has systemd and postgresql-common without its default cluster."""
    root = debian_root
    with timed(deb_timings, "the host: postgresql-common (no default cluster), systemd"):
        root.apt_install("postgresql-common", "systemd")
        root.run(
            "sed",
            "-i",
            r"s/^#*\s*create_main_cluster.*/create_main_cluster = false/",
            "/etc/postgresql-common/createcluster.conf",
        )
    with timed(deb_timings, "dpkg -i + apt-get -f install (the dependencies from Debian)"):
        shutil.copy(deb, root.path / "tmp" / deb.name)
        first = root.run("dpkg", "-i", f"/tmp/{deb.name}", check=False)
        # A fresh root lacks the dependencies, so dpkg leaves the package
        # unconfigured; apt then installs them and configures it.
        assert first.returncode == 1 and "dependency problems" in first.stderr, first.stderr
        root.run("apt-get", "-f", "install", "-y", "-q")
    return root


# -------------------------------------------------------------------- tests
#
# The first test asks for the installed package: the root is made while the
# package builds. A first test that needed only the .deb would wait for the
# build before debootstrap began.


def test_installs_with_dependencies_from_debian(installed: Root, deb_timings: dict[str, float]) -> None:
    with timed(deb_timings, "checks"):
        status = installed.run("dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", "failoverd").stdout
        assert status == f"installed {VERSION}-1"
        for package in ("postgresql", "python3-click", "python3-structlog", "iproute2", "iputils-arping", "procps"):
            state = installed.run("dpkg-query", "-W", "-f", "${db:Status-Status}", package).stdout
            assert state == "installed", f"{package}: {state}"
        for program in ("ip", "arping", "setpriv", "kill", "pg_config"):
            installed.run("sh", "-c", f"command -v {program}")
        # The PostgreSQL programs the daemon runs, where pg_config says (no
        # PostgreSQL path in the package): all of them came as dependencies.
        bindir = installed.run("pg_config", "--bindir").stdout.strip()
        for program in ("pg_ctl", "initdb", "pg_basebackup", "pg_rewind", "pg_waldump", "pg_controldata", "psql"):
            installed.run("test", "-x", f"{bindir}/{program}")
        # Nothing created a cluster: create_main_cluster = false held.
        assert installed.run("sh", "-c", "ls /etc/postgresql | wc -l", check=False).stdout.strip() in ("", "0")


def test_package_declares_its_debian_dependencies_and_files(deb: Path, deb_timings: dict[str, float]) -> None:
    with timed(deb_timings, "checks"):
        fields = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
        control = dict(re.findall(r"^(\S+): (.*)$", fields, re.MULTILINE))
        depends = {re.split(r"[\s(]", d.strip())[0] for d in control["Depends"].split(",")}
        assert control["Package"] == "failoverd" and control["Version"] == f"{VERSION}-1"
        needed = {"postgresql", "postgresql-common", "iproute2", "iputils-arping", "util-linux", "procps"}
        needed |= {"python3.11", "python3-click", "python3-structlog"}
        assert needed <= depends, f"missing from Depends: {needed - depends}"
        # Bundled instead (packaging/bundled-requirements.txt): bookworm's are too old.
        assert not depends & {"python3-aiohttp", "python3-asyncpg"}

        listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
        paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
        for path in (
            "/usr/bin/failoverd",
            "/usr/bin/failoverctl",
            UNIT,
            "/etc/default/failoverd",
            EXAMPLE,
            "/usr/share/doc/failoverd/examples/two-nodes-witness.toml",
            "/usr/share/doc/failoverd/examples/async.toml",
            "/usr/share/doc/failoverd/copyright",
            "/usr/lib/failoverd/pyvenv.cfg",
        ):
            assert path in paths, f"{path} not in the package"


def test_version(installed: Root, deb_timings: dict[str, float]) -> None:
    with timed(deb_timings, "checks"):
        assert installed.run("failoverd", "--version").stdout.strip() == f"failoverd, version {VERSION}"
        assert installed.run("failoverctl", "--version").stdout.strip() == f"failoverctl, version {VERSION}"


def test_bundled_libraries_and_the_watchdog_through_the_private_interpreter(
    installed: Root, deb_timings: dict[str, float]
) -> None:
    """aiohttp and asyncpg are the bundled ones, click and structlog Debian's;
    the fencing watchdog (sys.executable -m ...) starts as postgres."""
    script = """
import asyncio, sys, tempfile
import aiohttp, asyncpg, click, structlog
from failoverd.adapters.watchdog import WatchdogHandle
for module in (aiohttp, asyncpg, click, structlog):
    print(module.__name__, module.__file__)
async def main():
    with tempfile.TemporaryDirectory() as data_dir:
        watchdog = WatchdogHandle(data_dir)
        await watchdog.start()
        await watchdog.ping()
        print("watchdog", watchdog.argv[0], await watchdog.close())
asyncio.run(main())
"""
    with timed(deb_timings, "checks"):
        out = installed.run("runuser", "-u", "postgres", "--", PRIVATE_PYTHON, "-s", "-c", script).stdout
        where = dict(line.split(" ", 1) for line in out.splitlines())
        assert where["aiohttp"].startswith("/usr/lib/failoverd/lib/python3.11/site-packages/"), out
        assert where["asyncpg"].startswith("/usr/lib/failoverd/lib/python3.11/site-packages/"), out
        assert where["click"].startswith("/usr/lib/python3/dist-packages/"), out
        assert where["structlog"].startswith("/usr/lib/python3/dist-packages/"), out
        assert where["watchdog"] == f"{PRIVATE_PYTHON} 0", out


def test_check_config_of_the_three_node_example(installed: Root, deb_timings: dict[str, float]) -> None:
    with timed(deb_timings, "checks"):
        # The operator's part (deploy/README.md, "Configuration and secrets").
        assert installed.run("stat", "-c", "%U:%G %a", "/etc/failoverd").stdout.strip() == "root:postgres 750"
        installed.sh(
            "umask 077; head -c 32 /dev/urandom | base64 > /etc/failoverd/secret\n"
            "chown postgres:postgres /etc/failoverd/secret\n"
            f"install -o root -g postgres -m 0640 {EXAMPLE} /etc/failoverd/failoverd.toml"
        )
        for config in (EXAMPLE, "/etc/failoverd/failoverd.toml"):
            done = installed.run(
                "runuser", "-u", "postgres", "--", "failoverd", "check-config", config, "--node", "db1"
            )
            assert f"cluster      main ({config})" in done.stdout, done.stdout
            [db1] = [line for line in done.stdout.splitlines() if line.startswith("  db1 ")]
            assert db1.endswith("yes"), done.stdout  # db1 is this member


def test_systemd_analyze_verify_of_the_installed_unit(installed: Root, deb_timings: dict[str, float]) -> None:
    with timed(deb_timings, "checks"):
        unit = (installed.path / UNIT.lstrip("/")).read_text()
        [exec_start] = re.findall(r"^ExecStart=(\S+)", unit, re.MULTILINE)
        assert exec_start == "/usr/bin/failoverd"
        done = installed.run("systemd-analyze", "verify", UNIT)
        assert done.stdout + done.stderr == "", done.stdout + done.stderr  # silent when all is well
        # Installing never enables (nor starts) a member.
        enabled = installed.run("systemctl", "is-enabled", "failoverd.service", check=False)
        assert enabled.stdout.strip() == "disabled", enabled.stdout + enabled.stderr


def test_purge_keeps_the_operators_files(installed: Root, deb_timings: dict[str, float]) -> None:
    """Last: removes the package from the module's root."""
    with timed(deb_timings, "checks"):
        installed.sh(
            "test -e /etc/failoverd/secret || (umask 077; head -c 32 /dev/urandom | base64 > /etc/failoverd/secret)"
        )
        installed.run("dpkg", "--purge", "failoverd")
        for gone in ("/usr/lib/failoverd", "/usr/bin/failoverd", "/etc/default/failoverd", UNIT):
            assert not (installed.path / gone.lstrip("/")).exists(), gone
        assert (installed.path / "etc/failoverd/secret").is_file()
