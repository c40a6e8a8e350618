"""The promise a leader asks of its followers (docs/design.md §6, "Adaptive
promises"): as short as the network allows, so that a dead leader is
noticed soon, and long enough that acknowledgements arrive well within the
lease each heartbeat earns.

It follows the slowest recent acknowledgement: a slower one lengthens the
promise at once; a shorter promise is asked for only after a whole window
of quick ones. Safety does not depend on this choice: a follower's promise
is a running maximum, and every lease is computed from the promise the
follower says it made.
"""

from __future__ import annotations

import dataclasses

from failoverd.core.spec import Timing

WINDOW_BUCKETS = 10  # the window (Timing.promise_window_s) is kept as 10 slowest delays


@dataclasses.dataclass(slots=True)
class PromiseChooser:
    promise_s: float  # what we ask for now
    _bucket_started: float
    _peaks: list[float] = dataclasses.field(default_factory=list)  # slowest delay of each full bucket
    _bucket_peak: float = 0.0

    @classmethod
    def new(cls, timing: Timing, now: float) -> PromiseChooser:
        """A new leader knows nothing of the network yet: the longest promise."""
        return cls(timing.election_timeout_min_s, now)

    def restart(self, timing: Timing) -> None:
        """New timing (a reload): the longest promise again, and a new window."""
        self.promise_s = timing.election_timeout_min_s
        self._peaks.clear()
        self._bucket_peak = 0.0

    def note_delay(self, delay_s: float, now: float, timing: Timing) -> bool:
        """Take one delay in: an acknowledgement's round trip, or how late
        a heartbeat went out. True when the promise asked for changed."""
        bucket_s = timing.promise_window_s / WINDOW_BUCKETS
        while now - self._bucket_started >= bucket_s:
            self._peaks.append(self._bucket_peak)
            del self._peaks[:-WINDOW_BUCKETS]
            self._bucket_started += bucket_s
            self._bucket_peak = 0.0
            if now - self._bucket_started >= timing.promise_window_s:
                self._bucket_started = now  # a long silence: no need to walk through it
        self._bucket_peak = max(self._bucket_peak, delay_s)
        wanted = timing.promise_for(max([self._bucket_peak, *self._peaks]))
        if wanted > self.promise_s or (wanted < self.promise_s and len(self._peaks) >= WINDOW_BUCKETS):
            self.promise_s = wanted
            return True
        return False
