"""Waiting for a condition: the one polling loop of the tests and benchmarks.

A timeout here is a failure detector, not a measurement: it says how long to
wait before calling the test failed, never how fast the code under test must
be (timing belongs in bench/).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_INTERVAL_S = 0.05
_SHOWN_CHARS = 500


async def wait_for(
    what: str,
    check: Callable[[], T | Awaitable[T | None] | None],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call `check` (a plain function, or one returning an awaitable) every
    `interval_s` until it returns something truthy, and return that.

    `check` runs at least once, and once more after `timeout_s` has passed;
    if that is still falsy, raises AssertionError naming `what`, with the
    last value and `detail()` (logs, say) when given. Exceptions from `check`
    propagate at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, timeout_s, result, detail))
        await asyncio.sleep(interval_s)


def wait_for_sync(
    what: str,
    check: Callable[[], T | None],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    detail: Callable[[], str] | None = None,
) -> T:
    """wait_for() for code without an event loop: `check` must be a plain
    function, and the waiting blocks the thread."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never awaited, on purpose: no warning about it
            raise TypeError(f"wait_for_sync({what!r}): check returned an awaitable; use wait_for")
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, timeout_s, result, detail))
        time.sleep(interval_s)


def _timed_out(what: str, timeout_s: float, last: object, detail: Callable[[], str] | None) -> str:
    shown = repr(last)
    if len(shown) > _SHOWN_CHARS:
        shown = shown[:_SHOWN_CHARS] + "..."
    text = f"timed out after {timeout_s:g} s waiting for {what} (last: {shown})"
    return text if detail is None else f"{text}\n{detail()}"
