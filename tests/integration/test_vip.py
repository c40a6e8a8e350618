"""VirtualIp against real interfaces: hosts are network namespaces on a bridge
(see tests/support/netns.py); nothing touches the root namespace.

The adapter also runs, in a host namespace, as the `postgres` user holding
only ambient CAP_NET_ADMIN and CAP_NET_RAW (what the systemd unit grants):
its commands must keep exactly those, PostgreSQL-style commands none, and
without them it must say why it cannot add the address.

Skipped, with the reason, when not root, when `ip netns add` is refused, or
when ip/arping/ping are missing (apt-get install iproute2 iputils-arping
iputils-ping).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import failoverd.adapters.vip as vip_module
from failoverd.adapters import programs
from failoverd.adapters.vip import VipError, VirtualIp
from failoverd.config.load import VipConfig
from tests.support.cluster import make_runtime_bundle, system_python
from tests.support.netns import Lab, lab, unsupported_reason

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(scope="module")
def supported() -> None:
    reason = unsupported_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def net(supported: None) -> Iterator[Lab]:
    with lab(2) as built:
        yield built


def make_vip(net: Lab, host: str, **kwargs: Any) -> VirtualIp:
    return VirtualIp(VipConfig(net.vip(), net.interface), netns=net.ns(host), **kwargs)


@pytest.fixture
async def vips(net: Lab) -> AsyncIterator[dict[str, VirtualIp]]:
    made = {host: make_vip(net, host) for host in net.hosts}
    yield made
    for v in made.values():
        await v.close()  # no announcement may outlive the test (or its namespaces)


VIP = "198.18.7.100"


async def test_acquire_makes_the_address_reachable_and_release_removes_it(net: Lab, vips: dict[str, VirtualIp]) -> None:
    h1 = vips["h1"]
    assert not await h1.held()
    assert not await net.ping("h2", VIP)
    with capture_logs() as logs:
        await h1.acquire()
        await h1.wait_acquired()
        assert await h1.held()
        assert f"{VIP}/24" in await net.addresses("h1")
        assert await net.ping("h2", VIP)

        await h1.release()
        assert not await h1.held()
        assert f"{VIP}/24" not in await net.addresses("h1")
        assert "198.18.7.1/24" in await net.addresses("h1")  # the host's own address is left alone
        assert not await net.ping("h2", VIP)
    events = [e["event"] for e in logs if e["event"].startswith("vip_")]
    assert events[0] == "vip_address_added" and "vip_address_removed" in events


async def test_acquire_and_release_are_idempotent(net: Lab, vips: dict[str, VirtualIp]) -> None:
    h1 = vips["h1"]
    with capture_logs() as logs:
        await h1.acquire()
        await h1.wait_acquired()
        await h1.acquire()
        await h1.wait_acquired()
        assert (await net.addresses("h1")).count(f"{VIP}/24") == 1
        await h1.release()
        await h1.release()
    assert not await h1.held()
    acquired = [e for e in logs if e["event"] == "vip_address_added"]
    released = [e for e in logs if e["event"] == "vip_address_removed"]
    assert [e["already_held"] for e in acquired] == [False, True]
    assert [e["was_held"] for e in released] == [True, False]


async def test_refuses_an_address_another_host_answers_for(net: Lab, vips: dict[str, VirtualIp]) -> None:
    added = await net.run("h2", "ip", "addr", "add", f"{VIP}/24", "dev", net.interface)
    assert added.returncode == 0, added
    h1 = vips["h1"]
    assert await h1.answered_elsewhere()
    with capture_logs() as logs:
        await h1.acquire()
        with pytest.raises(VipError, match=f"another host answers for {VIP}"):
            await h1.wait_acquired()
    assert not await h1.held()
    failed = [e for e in logs if e["event"] == "vip_acquire_failed"]
    assert len(failed) == 1 and "another host answers" in failed[0]["error"], logs
    assert await net.addresses("h1") == ["198.18.7.1/24"]


async def test_free_address_is_not_answered_elsewhere(net: Lab, vips: dict[str, VirtualIp]) -> None:
    assert not await vips["h1"].answered_elsewhere()


async def test_move_to_another_host(net: Lab, vips: dict[str, VirtualIp]) -> None:
    h1, h2 = vips["h1"], vips["h2"]
    await h1.acquire()
    await h1.wait_acquired()
    assert await net.ping("h2", VIP)
    await h1.release()
    await h2.acquire()
    await h2.wait_acquired()
    assert await h2.held() and not await h1.held()
    assert await net.ping("h1", VIP)


async def test_announcement_updates_neighbours_stale_arp_entry(supported: None) -> None:
    with lab(3) as net:
        # Accept an override of a fresh entry at once (default: 1 s lock).
        await net.run("h3", "sysctl", "-q", "-w", f"net.ipv4.neigh.{net.interface}.locktime=0")
        h1, h2 = make_vip(net, "h1"), make_vip(net, "h2")
        try:
            await h1.acquire()
            await h1.wait_acquired()
            assert await net.ping("h3", VIP)
            assert await net.neighbour_mac("h3", VIP) == await net.mac("h1")
            await h1.release()
            with capture_logs() as logs:
                await h2.acquire()
                await h2.wait_acquired()
                await h2.wait_announced()
            assert any(e["event"] == "vip_announced" for e in logs), logs
            # h3 sent nothing since: only the gratuitous ARP can have moved it.
            assert await net.neighbour_mac("h3", VIP) == await net.mac("h2")
        finally:
            await h1.close()
            await h2.close()


async def test_acquire_does_not_wait_for_detection_and_release_stops_it(net: Lab) -> None:
    h1 = make_vip(net, "h1", dad_window_s=0.5)
    started = time.monotonic()
    await h1.acquire()
    # The caller (the supervisor's loop, mid-failover) is not held up by detection.
    assert time.monotonic() - started < 0.1
    await h1.release()
    assert not await h1.held()
    await asyncio.sleep(0.6)  # past the window: nothing may add it behind our back
    assert await net.addresses("h1") == ["198.18.7.1/24"]


async def test_release_stops_an_announcement_in_flight(net: Lab) -> None:
    h1 = make_vip(net, "h1", arp_count=5, arp_interval_s=1.0)
    with capture_logs() as logs:
        await h1.acquire()
        await h1.wait_acquired()
        started = time.monotonic()
        await h1.release()
        assert time.monotonic() - started < 1.0
        await h1.wait_announced()  # nothing left to wait for
    assert not await h1.held()
    assert not any(e["event"] in ("vip_announced", "vip_announce_failed") for e in logs)


async def test_missing_program_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vip_module.shutil, "which", lambda name, path=None: None if name == "arping" else "/x/ip")
    with pytest.raises(VipError, match="apt-get install iproute2 iputils-arping"):
        VirtualIp(VipConfig(ipaddress.IPv4Interface("198.18.7.100/24"), "eth0"))


async def test_detection_of_a_free_address_takes_about_the_window(net: Lab) -> None:
    h1 = make_vip(net, "h1", dad_window_s=0.3)
    started = time.monotonic()
    assert not await h1.answered_elsewhere()
    # It sits on the failover path: arping's own whole-second deadline must not apply.
    assert 0.25 < time.monotonic() - started < 0.8


async def test_a_fresh_precheck_stands_for_the_detection(net: Lab) -> None:
    h1 = make_vip(net, "h1", dad_window_s=0.3)
    h1.precheck()  # the supervisor does this when the promotion starts
    await asyncio.sleep(0.4)  # the promotion takes about this long
    with capture_logs() as logs:
        started = time.monotonic()
        await h1.acquire()
        await h1.wait_acquired()
        took = time.monotonic() - started
    assert await h1.held()
    assert [e["answered"] for e in logs if e["event"] == "vip_precheck_used"] == [False]
    assert took < 0.25, took  # no second detection window
    await h1.release()


async def test_a_precheck_that_heard_another_host_refuses_the_address(net: Lab) -> None:
    added = await net.run("h2", "ip", "addr", "add", f"{VIP}/24", "dev", net.interface)
    assert added.returncode == 0, added
    h1 = make_vip(net, "h1")
    h1.precheck()
    await h1.acquire()  # while the precheck still runs: it waits for its answer
    with pytest.raises(VipError, match="another host answers"):
        await h1.wait_acquired()
    assert not await h1.held()


async def test_a_stale_precheck_is_not_trusted(net: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vip_module, "PRECHECK_MAX_AGE_S", 0.1)
    h1 = make_vip(net, "h1")
    h1.precheck()
    await asyncio.sleep(0.5)  # it found the address free, long ago
    added = await net.run("h2", "ip", "addr", "add", f"{VIP}/24", "dev", net.interface)
    assert added.returncode == 0, added
    await h1.acquire()
    with pytest.raises(VipError, match="another host answers"):
        await h1.wait_acquired()


async def test_release_stops_a_precheck(net: Lab) -> None:
    h1 = make_vip(net, "h1", dad_window_s=0.5)
    h1.precheck()
    started = time.monotonic()
    await h1.release()
    assert time.monotonic() - started < 0.3
    assert h1._precheck is None


# --- a non-root daemon with ambient capabilities, as the systemd unit starts it ---

NET_CAPS = "+net_admin,+net_raw"
CAP_NET_ADMIN_RAW = f"{(1 << 12) | (1 << 13):016x}"
NO_CAPS = f"{0:016x}"


@pytest.fixture(scope="module")
def bundle(supported: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The package, its dependencies and vip_child.py where the postgres user can read them."""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' OS user")
    base = Path(tempfile.mkdtemp(prefix="failoverd-vipcaps-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        made = make_runtime_bundle(base)
        shutil.copy(Path(__file__).with_name("vip_child.py"), made / "vip_child.py")
        os.chmod(made / "vip_child.py", 0o644)
        yield made
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def run_child(net: Lab, bundle: Path, host: str, action: str, *, caps: bool) -> dict:
    argv = ["ip", "netns", "exec", net.ns(host), "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    if caps:
        argv += [f"--inh-caps={NET_CAPS}", f"--ambient-caps={NET_CAPS}"]
    argv += ["--", system_python(), str(bundle / "vip_child.py"), f"{VIP}/24", net.interface, action]
    done = await programs.run(argv, user=None, timeout_s=20, env={"PYTHONPATH": str(bundle)}, check=False)
    assert done.returncode == 0, done
    return json.loads(done.stdout)


@pytest.mark.timeout(60)
async def test_vip_as_postgres_user_with_ambient_capabilities(net: Lab, bundle: Path) -> None:
    got = await run_child(net, bundle, "h1", "acquire", caps=True)
    assert got["own"]["CapAmb"] == CAP_NET_ADMIN_RAW, got
    # The VIP's commands keep exactly the two capabilities ...
    assert got["vip_child"]["CapAmb"] == CAP_NET_ADMIN_RAW and got["vip_child"]["CapEff"] == CAP_NET_ADMIN_RAW, got
    # ... and PostgreSQL's programs get none at all.
    for key in ("CapAmb", "CapInh", "CapPrm", "CapEff"):
        assert got["postgres_child"][key] == NO_CAPS, got
    assert "error" not in got and got["held"], got
    assert f"{VIP}/24" in await net.addresses("h1")
    assert await net.ping("h2", VIP)

    released = await run_child(net, bundle, "h1", "release", caps=True)
    assert "error" not in released and not released["held"], released
    assert await net.addresses("h1") == ["198.18.7.1/24"]


@pytest.mark.timeout(60)
async def test_vip_as_postgres_user_without_capabilities_says_why(net: Lab, bundle: Path) -> None:
    got = await run_child(net, bundle, "h1", "acquire", caps=False)
    assert got["own"]["CapAmb"] == NO_CAPS, got
    assert "ip addr add failed" in got.get("error", "") and "not permitted" in got["error"], got
    assert await net.addresses("h1") == ["198.18.7.1/24"]
