"""Deterministic asyncio event loops on virtual time, one per simulated
process, stepped by one scheduler.

Each supervisor of the simulated cluster runs on a `SimLoop` of its own,
whose `time()` is its host's monotonic clock (a rate and an offset applied to
the simulation's real time). The scheduler runs, at each step, the loop whose
next callback is due earliest in real time; a frozen process's loop is simply
not run (SIGSTOP), and a killed one is dropped without running another
callback (SIGKILL). Nothing reads a real clock, nothing sleeps, and ties are
broken by a fixed order, so one seed replays the same run.

Only what asyncio's tasks, futures, locks, events, queues, `sleep`,
`timeout` and `wait`/`wait_for` need is implemented: there is no I/O.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
from collections.abc import Callable
from typing import Any, TypeVarTuple, Unpack

# A timer fires this much after its deadline in real time: converting a
# host's local deadline to real time and back rounds, and a process that
# woke a hair before its deadline would find nothing due and sleep until it
# again, forever (time only moves when the scheduler moves it).
DUE_EPSILON_S = 1e-9

_Ts = TypeVarTuple("_Ts")


class SimLoop(asyncio.AbstractEventLoop):
    def __init__(
        self,
        name: str,
        clock: Callable[[], float],
        to_real: Callable[[float], float],
        on_error: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.name = name
        self._clock = clock  # this process's monotonic time
        self._to_real = to_real  # a time of this loop's clock in the simulation's real time
        self._on_error = on_error
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._scheduled: list[asyncio.TimerHandle] = []
        self.dead = False  # killed: nothing of it runs or reports again
        self.frozen = False  # stopped: its callbacks wait
        self._next: float | None = None  # next_real_time() as last computed
        self._next_known = False

    # ------------------------------------------------------------- asyncio

    def time(self) -> float:
        return self._clock()

    def call_soon(
        self,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        self._next_known = False
        return handle

    def call_later(
        self,
        delay: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._scheduled, handle)
        handle._scheduled = True  # type: ignore[attr-defined]
        if self._next_known and (self._next is None or self._to_real(when) + DUE_EPSILON_S < self._next):
            self._next_known = False
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # dropped when it reaches the top of the heap

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(
        self,
        coro: Any,
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return not self.dead

    def is_closed(self) -> bool:
        return self.dead

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if not self.dead:
            self._on_error(self.name, context)

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    # ----------------------------------------------------------- scheduler

    def next_real_time(self) -> float | None:
        """When this loop next has something to run, in real time (None:
        nothing). Kept until a callback is added or the loop runs: a
        cancelled timer may make it early, which costs one empty step."""
        if self._next_known:
            return self._next
        if self._ready:
            self._next = self._to_real(self.time())
        else:
            scheduled = self._scheduled
            while scheduled and scheduled[0].cancelled():
                heapq.heappop(scheduled)
            self._next = self._to_real(scheduled[0].when()) + DUE_EPSILON_S if scheduled else None
        self._next_known = True
        return self._next

    def run_once(self) -> None:
        """Run what is ready and every timer due now, as asyncio's own
        iteration does: callbacks queued meanwhile wait for the next one."""
        self._next_known = False
        now = self.time()
        scheduled = self._scheduled
        while scheduled and (scheduled[0].cancelled() or scheduled[0].when() <= now):
            timer = heapq.heappop(scheduled)
            if not timer.cancelled():
                timer._scheduled = False  # type: ignore[attr-defined]
                self._ready.append(timer)
        ready = self._ready
        count = len(ready)
        asyncio.events._set_running_loop(self)
        try:
            for _ in range(count):
                if self.dead:
                    break
                handle = ready.popleft()
                if not handle.cancelled():
                    handle._run()
        finally:
            asyncio.events._set_running_loop(None)

    def kill(self) -> None:
        """SIGKILL. Nothing of this process acts on the world again (its ports
        check that it lives); its coroutines are closed here, at a fixed
        point, rather than whenever the garbage collector reaches them."""
        self.dead = True
        for _ in range(100):
            tasks = [t for t in asyncio.all_tasks(self) if not t.done()]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            self._drain()
        self._ready.clear()
        self._scheduled.clear()

    def _drain(self) -> None:
        asyncio.events._set_running_loop(self)
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle.cancelled():
                    handle._run()
        finally:
            asyncio.events._set_running_loop(None)

    def shuffle_ready(self, shuffle: Callable[[list[asyncio.Handle]], None]) -> None:
        """Reorder what waits to run (a thawed process handles what piled up
        in an order the kernel chose)."""
        handles = list(self._ready)
        shuffle(handles)
        self._ready = collections.deque(handles)

    # ------------------------------------------ unused parts of the interface

    def run_forever(self) -> None:
        raise NotImplementedError("stepped by failoverd.sim.world")

    def run_until_complete(self, future: Any) -> Any:
        raise NotImplementedError("stepped by failoverd.sim.world")

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.dead = True
