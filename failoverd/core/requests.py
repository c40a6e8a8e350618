"""Admin requests the core accepts (from the REST API or failoverctl, via the leader)."""

from __future__ import annotations

import dataclasses
from typing import Union


@dataclasses.dataclass(frozen=True, slots=True)
class Switchover:
    """Planned handover of the primary role; `target` None lets the leader pick."""

    request_id: int
    target: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Pause:
    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Resume:
    request_id: int


AdminRequest = Union[Switchover, Pause, Resume]
