"""A simulated host: its clock, its disk (what the supervisor persisted), its
PostgreSQL server, its watchdog's deadline and the VIP, and the supervisor
process running on it (none while it is down)."""

from __future__ import annotations

import dataclasses

from failoverd.core.node import Node
from failoverd.core.state import PersistentState
from failoverd.runtime.supervisor import Supervisor
from failoverd.sim.loop import SimLoop
from failoverd.sim.postgres import SimPostgres


@dataclasses.dataclass
class Host:
    name: str
    is_data: bool
    clock_rate: float
    clock_offset: float
    wall_offset: float
    disk: PersistentState = dataclasses.field(default_factory=PersistentState)
    supervisor: Supervisor | None = None  # None while the supervisor is down
    loop: SimLoop | None = None
    pg: SimPostgres | None = None
    watchdog_deadline: float | None = None  # local time; None = disarmed
    vip: bool = False
    incarnation: int = 0
    slow_until: float = 0.0  # PostgreSQL work drags until then (real time)

    def local(self, real: float) -> float:
        return self.clock_offset + self.clock_rate * real

    def real(self, local: float) -> float:
        return (local - self.clock_offset) / self.clock_rate

    @property
    def node(self) -> Node | None:
        return None if self.supervisor is None else self.supervisor.node

    @property
    def frozen(self) -> bool:
        return self.loop is not None and self.loop.frozen
