"""A small network lab built from Linux network namespaces.

    bridge namespace  <tag>-br : br0, with one port pN per host
    host namespaces   <tag>-hN : eth0 (veth to pN), 198.18.<subnet>.N/24, lo

Nothing is added to the root namespace: each veth pair is created inside its
host namespace with its peer end put straight into the bridge namespace.
Addresses come from 198.18.0.0/16 (RFC 2544 benchmarking) only. The tag is
random per lab (fo-<6 hex>), so parallel or leftover labs never collide, and
`destroy()` deletes exactly the namespaces this lab created, which takes the
veths and the bridge with them.

Needs root (CAP_SYS_ADMIN for `ip netns`, CAP_NET_ADMIN inside).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence

from failoverd.adapters import programs

SETUP_TIMEOUT_S = 10.0
BENCHMARK_NET = ipaddress.IPv4Network("198.18.0.0/16")


def _ip() -> str:
    path = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError("ip (iproute2) not found")
    return path


def unsupported_reason(programs: Sequence[str] = ("ip", "arping", "ping")) -> str | None:
    """Why a lab cannot be built here, or None: not root, a program missing,
    or `ip netns add` refused (no CAP_SYS_ADMIN, e.g. an unprivileged container)."""
    if os.geteuid() != 0:
        return "network namespace lab needs root (ip netns, CAP_SYS_ADMIN/CAP_NET_ADMIN)"
    for program in programs:
        if shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{program!r} not found (apt-get install iproute2 iputils-arping iputils-ping)"
    probe = f"fo-{secrets.token_hex(3)}-probe"
    try:
        subprocess.run(
            [_ip(), "netns", "add", probe], capture_output=True, text=True, timeout=SETUP_TIMEOUT_S, check=True
        )
    except subprocess.CalledProcessError as error:
        return f"'ip netns add' failed: {error.stderr.strip() or error.returncode}"
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"'ip netns add' failed: {error}"
    subprocess.run([_ip(), "netns", "del", probe], capture_output=True, timeout=SETUP_TIMEOUT_S, check=False)
    return None


class Lab:
    """`hosts`: a count (hosts h1..hN) or the host names; host number n (from
    1, in this order) gets the address .n of the subnet and bridge port pN."""

    def __init__(self, hosts: int | Sequence[str] = 2, *, subnet: int = 7, prefix_len: int = 24) -> None:
        names = [f"h{n}" for n in range(1, hosts + 1)] if isinstance(hosts, int) else list(hosts)
        if not 1 <= len(names) <= 250 or len(set(names)) != len(names):
            raise ValueError("1..250 hosts with distinct names")
        if not all(re.fullmatch(r"[a-z][a-z0-9]{0,7}", n) for n in names):
            raise ValueError(f"host names are 1-8 lower-case letters and digits: {names!r}")
        if not 0 <= subnet <= 255:
            raise ValueError(f"subnet {subnet!r} is not within 0..255 (198.18.<subnet>.0)")
        self.tag = f"fo-{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.tag}-br"
        self.hosts = names
        self.network = ipaddress.IPv4Network(f"198.18.{subnet}.0/{prefix_len}")
        assert self.network.subnet_of(BENCHMARK_NET)
        self.interface = "eth0"  # in every host namespace
        self.created: list[str] = []  # namespaces, in creation order
        self._ip = _ip()

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def port(self, host: str) -> str:
        """The bridge's end of `host`'s link (in the bridge namespace)."""
        return f"p{self.hosts.index(host) + 1}"

    def address(self, host: str) -> ipaddress.IPv4Interface:
        n = self.hosts.index(host) + 1
        return ipaddress.IPv4Interface(f"{self.network.network_address + n}/{self.network.prefixlen}")

    def vip(self, last_octet: int = 100) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.network.network_address + last_octet}/{self.network.prefixlen}")

    # ------------------------------------------------------------- building

    def exec_prefix(self, host: str) -> list[str]:
        """The argv prefix that runs a program inside `host`'s namespace."""
        return [self._ip, "netns", "exec", self.ns(host)]

    def ip(self, *argv: str) -> str:
        """Run `ip ARGV` (from the root namespace: use `-n NAMESPACE`)."""
        return self._sh(*argv)

    def _sh(self, *argv: str) -> str:
        try:
            done = subprocess.run(
                [self._ip, *argv], capture_output=True, text=True, timeout=SETUP_TIMEOUT_S, check=True
            )
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"ip {' '.join(argv)}: {error.stderr.strip()}") from None
        return done.stdout

    def _add_ns(self, name: str) -> None:
        # Recorded first: even a half-done `ip netns add` gets cleaned up.
        self.created.append(name)
        self._sh("netns", "add", name)

    def build(self) -> Lab:
        try:
            self._add_ns(self.bridge_ns)
            self._sh("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            self._sh("-n", self.bridge_ns, "link", "set", "br0", "up")
            for n, host in enumerate(self.hosts, 1):
                ns, port = self.ns(host), f"p{n}"
                self._add_ns(ns)
                self._sh(
                    "-n",
                    ns,
                    "link",
                    "add",
                    self.interface,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    self.bridge_ns,
                )
                self._sh("-n", self.bridge_ns, "link", "set", port, "master", "br0")
                self._sh("-n", self.bridge_ns, "link", "set", port, "up")
                self._sh("-n", ns, "addr", "add", self.address(host).with_prefixlen, "dev", self.interface)
                self._sh("-n", ns, "link", "set", "lo", "up")
                self._sh("-n", ns, "link", "set", self.interface, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Delete every namespace this lab created (and only those)."""
        errors = []
        for name in reversed(self.created):
            done = subprocess.run(
                [self._ip, "netns", "del", name], capture_output=True, text=True, timeout=SETUP_TIMEOUT_S, check=False
            )
            if done.returncode != 0 and os.path.exists(f"/run/netns/{name}"):
                errors.append(f"{name}: {done.stderr.strip()}")
        self.created.clear()
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))

    # ------------------------------------------------------------- inspecting

    async def run(self, host: str, *argv: str, timeout_s: float = 5.0) -> programs.Completed:
        """Run a program inside `host`'s namespace; never raises on exit status.
        The program is looked up here, sbin directories included."""
        program = shutil.which(argv[0], path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or argv[0]
        return await programs.run(
            [self._ip, "netns", "exec", self.ns(host), program, *argv[1:]], user=None, timeout_s=timeout_s, check=False
        )

    async def ping(self, host: str, address: str) -> bool:
        done = await self.run(host, "ping", "-c", "1", "-W", "1", address)
        return done.returncode == 0

    async def addresses(self, host: str) -> list[str]:
        done = await self.run(host, "ip", "-o", "-4", "addr", "show", "dev", self.interface)
        return re.findall(r"\binet (\S+)", done.stdout)

    async def mac(self, host: str) -> str:
        done = await self.run(host, "ip", "-o", "link", "show", "dev", self.interface)
        found = re.search(r"link/ether ([0-9a-f:]{17})", done.stdout)
        assert found, done
        return found.group(1)

    async def neighbour_mac(self, host: str, address: str) -> str | None:
        done = await self.run(host, "ip", "neigh", "show", address, "dev", self.interface)
        found = re.search(r"lladdr ([0-9a-f:]{17})", done.stdout)
        return found.group(1) if found else None


@contextlib.contextmanager
def lab(hosts: int | Sequence[str] = 2, **kwargs: int) -> Iterator[Lab]:
    built = Lab(hosts, **kwargs).build()
    try:
        yield built
    finally:
        built.destroy()
