#!/usr/bin/python3
"""Build the failoverd Debian package (Debian 12 "bookworm") with dpkg-deb.

    /usr/bin/python3 packaging/build_deb.py [--out build/deb]

prints the path of the .deb on its last line. Needs: Debian 12's python3.11
with its venv module (python3-venv), dpkg-deb, and pip's index (PyPI) for the
build backend (setuptools) and the bundled wheels; nothing else is fetched.
Runs as any user; the package's files are owned by root (--root-owner-group).

Layout of the package (packaging/README.md explains why):

    /usr/lib/failoverd/                   a private environment of /usr/bin/python3.11
        pyvenv.cfg                        (include-system-site-packages: Debian's
        bin/python3.11 -> /usr/bin/python3.11    python3-click and python3-structlog)
        bin/failoverd, bin/failoverctl    console scripts
        lib/python3.11/site-packages/     failoverd + packaging/bundled-requirements.txt
    /usr/bin/failoverd, /usr/bin/failoverctl -> ../lib/failoverd/bin/...
    /lib/systemd/system/failoverd.service deploy/failoverd.service, ExecStart=/usr/bin/failoverd
    /etc/default/failoverd                conffile: FAILOVERD_OPTIONS
    /usr/share/doc/failoverd/examples/    configs/*.toml, deploy/failoverd.nft

The sources are copied out of the checkout before anything is built, so the
build writes nothing into the working tree except the .deb in --out.
"""

from __future__ import annotations

import argparse
import email
import gzip
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = "/usr/bin/python3.11"  # Debian 12's interpreter; the bundled wheels are cp311
PYVER = "3.11"
PREFIX = "/usr/lib/failoverd"
MAINTAINER = "failoverd maintainers <failoverd@localhost>"

# Debian packages failoverd needs at run time (packaging/README.md):
DEPENDS = [
    "python3.11",
    # From Debian, at the versions bookworm ships and the tests were run with.
    "python3-click (>= 8.1.3)",
    "python3-structlog (>= 22.3.0)",
    # pg_ctl, initdb, pg_basebackup, pg_rewind, pg_waldump, pg_controldata,
    # psql of the distribution's PostgreSQL, found through pg_config --bindir
    # (postgresql-common's /usr/bin/pg_config) unless [postgres] bin_dir is set.
    "postgresql",
    "postgresql-common",
    # The VIP: ip addr add/del (iproute2) and gratuitous ARP (arping).
    "iproute2",
    "iputils-arping",
    # The unit's ExecReload=/bin/kill (procps in bookworm; not in minbase).
    "procps",
    # setpriv drops capabilities for PostgreSQL's programs and the hooks
    # (failoverd/adapters/programs.py). Essential, hence versioned: bookworm's.
    "util-linux (>= 2.38)",
]


def log(message: str) -> None:
    print(f"build_deb: {message}", file=sys.stderr, flush=True)


def run(argv: list[str], quiet: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
    if not quiet:
        log("$ " + " ".join(argv))
    return subprocess.run(argv, check=True, text=True, **kw)  # type: ignore[call-overload]


def fail(message: str) -> NoReturn:
    raise SystemExit(f"build_deb: error: {message}")


def project_version(pyproject: Path) -> str:
    return tomllib.loads(pyproject.read_text())["project"]["version"]


def copy_sources(dest: Path) -> None:
    """What the wheel is built from: pyproject.toml, README.md and failoverd/."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "failoverd", dest / "failoverd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def pinned(requirements: Path) -> dict[str, str]:
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)", line)
        if not match:
            fail(f"{requirements}: {line!r} is not NAME==VERSION")
        pins[normalize(match[1])] = match[2]
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_dists(site: Path) -> dict[str, str]:
    dists = {}
    for info in site.glob("*.dist-info"):
        meta = email.message_from_string((info / "METADATA").read_text())
        dists[normalize(meta["Name"])] = meta["Version"]
    return dists


def dpkg_package_of(path: str) -> str:
    real = os.path.realpath(path)
    for candidate in dict.fromkeys([path, real, re.sub(r"^/usr(?=/lib)", "", real)]):
        done = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.split(":", 1)[0].strip()
    fail(f"no Debian package ships {path} (needed by a bundled extension module)")


def shared_library_depends(site: Path) -> list[str]:
    """Debian dependencies of the bundled extension modules: the package of
    every library they load (ldd), libc6 at the newest GLIBC_x.y they use."""
    packages: set[str] = set()
    glibc = (2, 2)
    for so in sorted(site.rglob("*.so")):
        out = run(["ldd", str(so)], quiet=True, capture_output=True).stdout
        for line in out.splitlines():
            if "not found" in line:
                fail(f"{so}: {line.strip()}")
            match = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if match:
                packages.add(dpkg_package_of(match[1]))
        for major, minor in re.findall(rb"GLIBC_(\d+)\.(\d+)", so.read_bytes()):
            glibc = max(glibc, (int(major), int(minor)))
    packages = {p.split(":")[0] for p in packages}
    depends = []
    for package in sorted(packages):
        depends.append(f"{package} (>= {glibc[0]}.{glibc[1]})" if package == "libc6" else package)
    return depends


def strip_extension_modules(site: Path) -> None:
    """What dh_strip does to shared objects: the wheels' extension modules
    come with debug information (asyncpg's alone is 10 MB of it)."""
    modules = sorted(str(so) for so in site.rglob("*.so"))
    if modules:
        run(
            ["strip", "--strip-unneeded", "--remove-section=.comment", "--remove-section=.note", *modules],
            quiet=True,
        )
        log(f"stripped {len(modules)} extension modules")


def console_scripts(dist_info: Path) -> dict[str, tuple[str, str]]:
    scripts: dict[str, tuple[str, str]] = {}
    section = None
    for line in (dist_info / "entry_points.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "console_scripts" and "=" in line:
            name, target = (x.strip() for x in line.split("=", 1))
            module, func = target.split(":")
            scripts[name] = (module, func)
    if not scripts:
        fail(f"{dist_info}: no console_scripts")
    return scripts


SCRIPT = """\
#!{prefix}/bin/python{pyver} -s
# {name}: console script of the failoverd Debian package. The interpreter
# above runs in the package's private environment ({prefix}/pyvenv.cfg), so
# the fencing watchdog it starts (sys.executable -m ...) finds it as well.
import sys

from {module} import {func}

if __name__ == "__main__":
    sys.exit({func}())
"""


def unit_file(source: Path) -> str:
    text = source.read_text()
    pattern = re.compile(r"^ExecStart=\S*/failoverd(?=\s)", re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        fail(f"{source}: expected exactly one ExecStart=.../failoverd line")
    text = pattern.sub("ExecStart=/usr/bin/failoverd", text)
    first, rest = text.split("\n", 1)
    note = "# This copy comes with the failoverd Debian package (packaging/): it runs /usr/bin/failoverd.\n"
    return first + "\n" + note + rest


def copyright_file(site: Path, pins: dict[str, str]) -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lic = project.get("license", {})
    lic = lic.get("text", "") if isinstance(lic, dict) else str(lic)
    lines = [
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
        "Upstream-Name: failoverd",
        "",
        "Files: *",
        f"License: {lic or 'see the source'}",
        "",
        f"Files: {PREFIX}/lib/python{PYVER}/site-packages/*",
        "Comment: Python libraries bundled from PyPI (packaging/bundled-requirements.txt);",
        " each one's license text is in its *.dist-info/licenses/ directory:",
        " .",
    ]
    for info in sorted(site.glob("*.dist-info")):
        meta = email.message_from_string((info / "METADATA").read_text())
        if normalize(meta["Name"]) not in pins:
            continue
        license_name = meta.get("License-Expression") or ""
        if not license_name:
            first = (meta.get("License") or "").strip().splitlines()
            license_name = first[0] if first else ""
        if not license_name:
            classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
            license_name = ", ".join(classifiers) or "see its dist-info"
        lines.append(f" {meta['Name']} {meta['Version']}: {license_name}")
    return "\n".join(lines) + "\n"


def changelog(version: str, revision: str) -> bytes:
    date = time.strftime(
        "%a, %d %b %Y %H:%M:%S +0000", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time())))
    )
    text = (
        f"failoverd ({version}-{revision}) bookworm; urgency=medium\n\n"
        f"  * Package built from the failoverd source tree (packaging/build_deb.py).\n\n"
        f" -- {MAINTAINER}  {date}\n"
    )
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def install_file(src: Path | bytes | str, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, Path):
        shutil.copyfile(src, dest)
    elif isinstance(src, bytes):
        dest.write_bytes(src)
    else:
        dest.write_text(src)
    dest.chmod(mode)


def normalize_modes(root: Path) -> None:
    """0755 directories and executables, 0644 everything else (Debian policy;
    pip leaves the umask's modes)."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir() or (path.stat().st_mode & 0o111 and not path.name.endswith(".so")):
            path.chmod(0o755)
        else:
            path.chmod(0o644)


def build(out_dir: Path, revision: str, keep: bool) -> Path:
    for tool in ("dpkg-deb", "dpkg", "ldd", "strip"):
        if shutil.which(tool) is None:
            fail(f"{tool} not found (a Debian system is needed; strip: apt-get install binutils)")
    if not os.access(PYTHON, os.X_OK):
        fail(f"{PYTHON} not found: the package is for Debian 12 (apt-get install python3.11)")
    if subprocess.run([PYTHON, "-c", "import venv, ensurepip"], capture_output=True).returncode != 0:
        fail("python3's venv module is missing (apt-get install python3-venv)")

    version = project_version(REPO / "pyproject.toml")
    arch = run(["dpkg", "--print-architecture"], quiet=True, capture_output=True).stdout.strip()
    requirements = HERE / "bundled-requirements.txt"
    pins = pinned(requirements)

    tmp = Path(tempfile.mkdtemp(prefix="failoverd-deb-"))
    try:
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
        copy_sources(tmp / "src")
        run([PYTHON, "-m", "venv", str(tmp / "buildenv")])
        pip = [str(tmp / "buildenv" / "bin" / "python"), "-m", "pip"]
        run([*pip, "wheel", "-q", "--no-deps", "-w", str(tmp / "wheels"), str(tmp / "src")], env=env)
        [wheel] = (tmp / "wheels").glob("failoverd-*.whl")

        root = tmp / "root"
        lib = root / PREFIX.lstrip("/")
        site = lib / "lib" / f"python{PYVER}" / "site-packages"
        # The bundled libraries first, into an empty directory, so that what
        # pip installs can be compared with the pins.
        run(
            [
                *pip,
                "install",
                "-q",
                "--no-compile",
                "--only-binary",
                ":all:",
                "--target",
                str(site),
                "-r",
                str(requirements),
            ],
            env=env,
        )
        got = installed_dists(site)
        if got != pins:
            extra = {k: v for k, v in got.items() if pins.get(k) != v}
            missing = {k: v for k, v in pins.items() if got.get(k) != v}
            fail(
                f"{requirements} is not the complete closure: pip installed {extra}, pinned but not installed {missing}"
            )
        # pip's --target puts console scripts in bin/: the package writes its own.
        shutil.rmtree(site / "bin", ignore_errors=True)
        run([*pip, "install", "-q", "--no-compile", "--no-deps", "--target", str(site), str(wheel)], env=env)
        shutil.rmtree(site / "bin", ignore_errors=True)
        for cache in site.rglob("__pycache__"):
            shutil.rmtree(cache)
        strip_extension_modules(site)

        # The private environment: an interpreter link and pyvenv.cfg, as
        # `python3 -m venv --system-site-packages` makes them, without pip.
        (lib / "bin").mkdir(parents=True)
        (lib / "bin" / f"python{PYVER}").symlink_to(PYTHON)
        (lib / "bin" / "python3").symlink_to(f"python{PYVER}")
        (lib / "bin" / "python").symlink_to(f"python{PYVER}")
        install_file(f"home = /usr/bin\ninclude-system-site-packages = true\nversion = {PYVER}\n", lib / "pyvenv.cfg")
        [dist_info] = site.glob("failoverd-*.dist-info")
        (root / "usr/bin").mkdir(parents=True)
        for name, (module, func) in sorted(console_scripts(dist_info).items()):
            script = SCRIPT.format(prefix=PREFIX, pyver=PYVER, name=name, module=module, func=func)
            install_file(script, lib / "bin" / name, 0o755)
            (root / "usr/bin" / name).symlink_to(f"../lib/failoverd/bin/{name}")

        install_file(unit_file(REPO / "deploy/failoverd.service"), root / "lib/systemd/system/failoverd.service")
        install_file(HERE / "debian/default", root / "etc/default/failoverd")
        doc = root / "usr/share/doc/failoverd"
        for example in sorted((REPO / "configs").glob("*.toml")):
            install_file(example, doc / "examples" / example.name)
        install_file(REPO / "deploy/failoverd.nft", doc / "examples/failoverd.nft")
        install_file(REPO / "README.md", doc / "README.md")
        install_file(copyright_file(site, pins), doc / "copyright")
        install_file(changelog(version, revision), doc / "changelog.Debian.gz")
        normalize_modes(root)

        depends = DEPENDS + shared_library_depends(site)
        size_kib = sum(-(-p.lstat().st_size // 1024) for p in root.rglob("*") if not p.is_dir())
        control = (HERE / "debian/control.in").read_text()
        for key, value in {
            "VERSION": f"{version}-{revision}",
            "ARCH": arch,
            "MAINTAINER": MAINTAINER,
            "INSTALLED_SIZE": str(size_kib),
            "DEPENDS": ", ".join(depends),
        }.items():
            control = control.replace(f"@{key}@", value)
        debian = root / "DEBIAN"
        install_file(control, debian / "control")
        install_file("/etc/default/failoverd\n", debian / "conffiles")
        for script in ("postinst", "prerm", "postrm"):
            install_file(HERE / "debian" / script, debian / script, 0o755)
        sums = []
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink() and debian not in path.parents:
                rel = path.relative_to(root).as_posix()
                if rel != "etc/default/failoverd":  # conffiles have their own sums
                    sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
        install_file("".join(sums), debian / "md5sums")

        out_dir.mkdir(parents=True, exist_ok=True)
        deb = out_dir / f"failoverd_{version}-{revision}_{arch}.deb"
        # stdout is for the .deb's path alone.
        run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], stdout=sys.stderr)
        log("Depends: " + ", ".join(depends))
        return deb.resolve()
    finally:
        if keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "deb", help="directory for the .deb")
    parser.add_argument("--revision", default="1", help="Debian revision (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the staging directory")
    args = parser.parse_args()
    # Stopped (e.g. by the package test's teardown): remove the staging
    # directory on the way out, as on any other failure.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(build(args.out, args.revision, args.keep))


if __name__ == "__main__":
    main()
