"""The clock and sleep as a small interface, so retry and polling logic is tested
without real sleeping."""

from __future__ import annotations

import threading
import time


class Clock:
    """Real time. ``now`` is monotonic; ``wall`` is seconds since the epoch."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float, cancel: threading.Event | None = None) -> bool:
        """Sleep; return True early if ``cancel`` is set."""
        if seconds <= 0:
            return bool(cancel and cancel.is_set())
        if cancel is None:
            time.sleep(seconds)
            return False
        return cancel.wait(seconds)


class FakeClock(Clock):
    """A clock that advances only when something sleeps on it (for unit tests)."""

    def __init__(self, start: float = 1000.0):
        self._t = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._t

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds

    def sleep(self, seconds: float, cancel: threading.Event | None = None) -> bool:
        self.sleeps.append(seconds)
        self.advance(max(seconds, 0.0))
        return bool(cancel and cancel.is_set())
