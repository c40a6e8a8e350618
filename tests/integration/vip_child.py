"""Run by test_vip.py in a host namespace, as the PostgreSQL user with (or
without) ambient CAP_NET_ADMIN/CAP_NET_RAW, the way systemd starts the daemon:

    vip_child.py ADDRESS/PREFIX INTERFACE acquire|release

Prints one JSON object: the capability sets a PostgreSQL-style child and a
VIP-style child of `programs.run` got, our own, and what the adapter did (or the
VipError). Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys

import structlog

from failoverd.adapters import programs
from failoverd.adapters.vip import VIP_CAPABILITIES, VipError, VirtualIp
from failoverd.config.load import VipConfig


def child_caps(status: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in status.splitlines()) if k.startswith("Cap")}


async def main(address: str, interface: str, action: str) -> dict:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    report: dict = {"own": {k: f"{v:016x}" for k, v in programs.own_capabilities().items()}}
    # What PostgreSQL's programs get (nothing kept) and what the VIP's get.
    plain = await programs.run(["/bin/cat", "/proc/self/status"], user=None, timeout_s=5)
    kept = await programs.run(["/bin/cat", "/proc/self/status"], user=None, timeout_s=5, keep_caps=VIP_CAPABILITIES)
    report["postgres_child"] = child_caps(plain.stdout)
    report["vip_child"] = child_caps(kept.stdout)
    vip = VirtualIp(VipConfig(ipaddress.IPv4Interface(address), interface))
    try:
        if action == "acquire":
            await vip.acquire()
            await vip.wait_acquired()
            await vip.wait_announced()
        else:
            await vip.release()
        report["held"] = await vip.held()
    except VipError as error:
        report["error"] = str(error)
    finally:
        await vip.close()
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
