"""Simulated network between hosts: per-direction cuts, delay, loss, duplication.

Reordering falls out of independent random delays. Supervisor traffic and
PostgreSQL replication share the same links (a host partition cuts both);
`cut_peer_only` models a firewall rule on the supervisor port alone.
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass
class LinkProfile:
    delay_min_s: float = 0.0005
    delay_max_s: float = 0.005
    loss: float = 0.0
    duplicate: float = 0.0
    spike: float = 0.0  # probability of a long delay
    spike_max_s: float = 0.3


class SimNetwork:
    def __init__(self, names: list[str], rng: random.Random) -> None:
        self.names = names
        self.rng = rng
        self.profile = LinkProfile()
        self.cut: set[tuple[str, str]] = set()  # (from, to) for all traffic
        self.peer_cut: set[tuple[str, str]] = set()  # supervisor traffic only

    def connected(self, src: str, dst: str, peer_traffic: bool = False) -> bool:
        if (src, dst) in self.cut:
            return False
        return not (peer_traffic and (src, dst) in self.peer_cut)

    def deliveries(self, src: str, dst: str) -> list[float]:
        """Delays after which copies of one supervisor message arrive (empty: lost)."""
        if not self.connected(src, dst, peer_traffic=True):
            return []
        p = self.profile
        if self.rng.random() < p.loss:
            return []
        copies = 2 if self.rng.random() < p.duplicate else 1
        out = []
        for _ in range(copies):
            delay = self.rng.uniform(p.delay_min_s, p.delay_max_s)
            if self.rng.random() < p.spike:
                delay += self.rng.uniform(0, p.spike_max_s)
            out.append(delay)
        return out

    def round_trip(self, src: str, dst: str) -> float | None:
        """How long a PostgreSQL connection from src to dst takes to ask one
        question (None: it cannot be made). Not supervisor traffic, so a cut
        of the supervisor port alone does not stop it; a lost packet costs a
        retransmission rather than the answer."""
        if not (self.connected(src, dst) and self.connected(dst, src)):
            return None
        p = self.profile
        delay = 2 * self.rng.uniform(p.delay_min_s, p.delay_max_s)
        if self.rng.random() < p.loss:
            delay += 0.2  # TCP's first retransmission
        if self.rng.random() < p.spike:
            delay += self.rng.uniform(0, p.spike_max_s)
        return delay

    def isolate(self, name: str) -> None:
        for other in self.names:
            if other != name:
                self.cut.add((name, other))
                self.cut.add((other, name))

    def isolate_inbound(self, name: str) -> None:
        """The host can send but not receive."""
        for other in self.names:
            if other != name:
                self.cut.add((other, name))

    def cut_pair(self, a: str, b: str) -> None:
        self.cut.add((a, b))
        self.cut.add((b, a))

    def cut_peer_only(self, a: str, b: str) -> None:
        self.peer_cut.add((a, b))
        self.peer_cut.add((b, a))

    def heal(self) -> None:
        self.cut.clear()
        self.peer_cut.clear()
        self.profile = LinkProfile()
