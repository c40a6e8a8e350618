"""A slow, lossy switch in user space, for kernels without `tc netem`.

    slowlink.py --ports p1,p2,p3 --delay-ms 100 --jitter-ms 50 --loss 0.02 [--seed N]

Run inside the lab's bridge namespace with the ports taken out of the kernel
bridge (lab.py does both). It forwards Ethernet frames between the ports as a
learning switch and treats every frame as `tc netem delay D J loss L` on the
sending host's link would: dropped with probability L, otherwise delivered
after a delay drawn uniformly from [D - J, D + J] (so frames may overtake
each other, as with netem's jitter). ARP is delayed like everything else.

Frames are read and written with PACKET_VNET_HDR, which carries the kernel's
segmentation and checksum offload state across: TCP on a veth hands over
64 KiB segments with checksums left to the hardware, and without the header
they could not be sent on as they are.

Stops on SIGTERM or SIGINT, and by itself after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sys

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4  # pkttype of our own transmissions, which the socket also sees
ETH_P_ALL = 0x0003
VNET_HDR_BYTES = 10
FRAME_BYTES_MAX = 65536 + VNET_HDR_BYTES + 64


class Switch:
    def __init__(self, ports: list[str], delay_s: float, jitter_s: float, loss: float, rng: random.Random) -> None:
        self.delay_s, self.jitter_s, self.loss, self.rng = delay_s, jitter_s, loss, rng
        self.socks: dict[str, socket.socket] = {}
        self.where: dict[bytes, str] = {}  # MAC -> port it was last seen on
        self.forwarded = self.dropped = 0
        # How late frames left compared with their drawn delay: the emulation
        # is only as good as this process's scheduling on a busy machine.
        self.late_s: list[float] = []
        for port in ports:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            s.bind((port, 0))
            s.setblocking(False)
            self.socks[port] = s

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for port, s in self.socks.items():
            loop.add_reader(s.fileno(), self._receive, loop, port, s)

    def _receive(self, loop: asyncio.AbstractEventLoop, port: str, s: socket.socket) -> None:
        while True:
            try:
                frame, address = s.recvfrom(FRAME_BYTES_MAX)
            except BlockingIOError:
                return
            if address[2] == PACKET_OUTGOING or len(frame) < VNET_HDR_BYTES + 14:
                continue
            eth = frame[VNET_HDR_BYTES:]
            dst, src = eth[0:6], eth[6:12]
            self.where[src] = port
            if self.rng.random() < self.loss:
                self.dropped += 1
                continue
            out = self.where.get(dst) if not dst[0] & 1 else None  # group bit: broadcast or multicast
            targets = [out] if out is not None and out != port else [p for p in self.socks if p != port]
            delay = max(0.0, self.delay_s + self.rng.uniform(-self.jitter_s, self.jitter_s))
            loop.call_later(delay, self._send, frame, targets, loop, loop.time() + delay)

    def _send(self, frame: bytes, targets: list[str], loop: asyncio.AbstractEventLoop, due: float) -> None:
        if len(self.late_s) < 1_000_000:
            self.late_s.append(loop.time() - due)
        for port in targets:
            try:
                self.socks[port].send(frame)
                self.forwarded += 1
            except OSError:  # a full queue or a port going down: that frame is lost, as on a wire
                self.dropped += 1


async def main(args: argparse.Namespace) -> int:
    # This process stands for the wire: it must not queue behind the system under test.
    with contextlib.suppress(OSError):
        os.nice(-10)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    switch = Switch(
        args.ports.split(","), args.delay_ms / 1000, args.jitter_ms / 1000, args.loss, random.Random(args.seed)
    )
    switch.start(loop)
    print("ready", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except TimeoutError:
        pass
    late = sorted(switch.late_s) or [0.0]
    print(
        f"forwarded {switch.forwarded} dropped {switch.dropped} late_ms_p50 {1000 * late[len(late) // 2]:.1f} "
        f"late_ms_p99 {1000 * late[int(len(late) * 0.99)]:.1f} late_ms_max {1000 * late[-1]:.1f}",
        flush=True,
    )
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ports", required=True, help="comma-separated interface names")
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0, help="probability, 0..1")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=3600.0)
    args = p.parse_args(argv)
    if not (0 <= args.jitter_ms <= args.delay_ms and 0 <= args.loss < 1):
        p.error("need 0 <= jitter <= delay and 0 <= loss < 1")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
