"""The run-wide limit on provider API calls, shared by every host's thread.

:class:`RateLimiter` is a token bucket in its "virtual scheduling" form
(GCRA): each :meth:`RateLimiter.acquire` reserves the next free slot under a
lock and then sleeps until it. Slots are handed out in arrival order, so no
thread starves however many wait (first come, first served), and the lock is
never held while sleeping.

A ``22 too many API calls`` reply calls :meth:`RateLimiter.slow_down`: the
effective rate halves (not below ``rate / 16``; at most once per half
second, so one burst of 22s from many threads counts once). Each successful
call (:meth:`RateLimiter.record_success`) gives back ``rate / 32``, so the
full rate returns gradually (16 successes after one halving), not at once.

Background calls (watching parked hosts, ``--wait-offline``) go through
:meth:`RateLimiter.background`: a view whose :meth:`BackgroundLimiter.acquire`
takes a slot only when no foreground call holds the next one (it never
reserves ahead, so a foreground call that arrives meanwhile goes first and
waits at most one slot for it), and at most ``share`` of the effective rate
(a :class:`BackgroundShare`). While the rollout's own calls keep every slot
busy, background calls wait: they use spare capacity only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from deployer.clock import Clock


@dataclass(frozen=True)
class SlowDownPolicy:
    factor: float = 0.5  # a 22 multiplies the effective rate by this
    floor: float = 1 / 16  # ... but never below this share of the configured rate
    recovery: float = 1 / 32  # each success adds back this share of the configured rate
    cooldown: float = 0.5  # seconds: one burst of 22s from many threads halves once


DEFAULT_SLOW_DOWN = SlowDownPolicy()


@dataclass(frozen=True)
class BackgroundShare:
    """How much of the rate background calls may use (data, not code)."""

    share: float = 0.1  # at most this share of the effective rate

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"background share must be in (0, 1], got {self.share!r}")


DEFAULT_BACKGROUND = BackgroundShare()


class Limiter(Protocol):
    """What :class:`~deployer.api.ProviderAPI` needs from a limiter: both
    :class:`RateLimiter` and its :class:`BackgroundLimiter` view are one."""

    def acquire(
        self, cancel: threading.Event | None = None, max_wait: float | None = None
    ) -> bool: ...

    def slow_down(self) -> None: ...

    def record_success(self) -> None: ...


class RateLimiter:
    """Thread-safe token bucket: at most ``rate`` acquisitions per second.

    ``burst`` tokens may be taken at once after an idle spell (default 1: the
    calls are evenly spaced, the safest reading of a provider's per-second
    limit).
    """

    def __init__(
        self,
        rate: float,
        clock: Clock | None = None,
        *,
        burst: float = 1.0,
        policy: SlowDownPolicy = DEFAULT_SLOW_DOWN,
    ):
        if not rate > 0:
            raise ValueError(f"rate limit must be positive, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.policy = policy
        self._clock = clock or Clock()
        self._lock = threading.Lock()
        self._effective = self.rate
        self._tat: float | None = None  # theoretical arrival time of the next call
        self._background_tat: float | None = None  # ... of the next background call
        self._last_slow_down: float | None = None

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate}, effective={self.effective_rate:.3g})"

    @property
    def effective_rate(self) -> float:
        with self._lock:
            return self._effective

    def _reserve(self, max_wait: float | None = None) -> float | None:
        """Reserve the next slot; return the time it starts (None, and nothing
        reserved, if it starts more than ``max_wait`` seconds from now)."""
        with self._lock:
            now = self._clock.now()
            interval = 1.0 / self._effective
            tat = now if self._tat is None else max(self._tat, now)
            slot = max(now, tat - (self.burst - 1.0) * interval)
            if max_wait is not None and slot - now > max_wait:
                return None
            self._tat = tat + interval
            return slot

    def acquire(self, cancel: threading.Event | None = None, max_wait: float | None = None) -> bool:
        """Block until a call may be made. False if ``cancel`` was set meanwhile, or
        if no slot starts within ``max_wait`` seconds (then nothing is reserved:
        a caller with a deadline never waits past it in the queue)."""
        slot = self._reserve(max_wait)
        if slot is None:
            return False
        wait = slot - self._clock.now()
        if wait > 0:
            return not self._clock.sleep(wait, cancel)
        return not (cancel is not None and cancel.is_set())

    def background(self, share: BackgroundShare = DEFAULT_BACKGROUND) -> BackgroundLimiter:
        """A view of this limiter for low-priority calls; see the module docstring."""
        return BackgroundLimiter(self, share)

    def _try_background(self, share: float) -> float:
        """Take a slot now if the foreground leaves it free and the share allows;
        return 0.0 if taken, else how long to wait before trying again."""
        with self._lock:
            now = self._clock.now()
            interval = 1.0 / self._effective
            ready = max([now] + [t for t in (self._tat, self._background_tat) if t is not None])
            if ready > now:
                return ready - now
            self._tat = now + interval  # the slot is used: foreground calls see it taken
            self._background_tat = now + interval / share
            return 0.0

    def slow_down(self) -> None:
        """The provider said 22: halve the effective rate (bounded below)."""
        with self._lock:
            now = self._clock.now()
            last = self._last_slow_down
            if last is not None and now - last < self.policy.cooldown:
                return
            self._last_slow_down = now
            floor = self.rate * self.policy.floor
            self._effective = max(floor, self._effective * self.policy.factor)

    def record_success(self) -> None:
        """A call succeeded: win back part of the configured rate."""
        with self._lock:
            if self._effective < self.rate:
                step = self.rate * self.policy.recovery
                self._effective = min(self.rate, self._effective + step)


class BackgroundLimiter:
    """A low-priority view of a :class:`RateLimiter` with the interface
    :class:`~deployer.api.ProviderAPI` uses (``acquire``, ``slow_down``,
    ``record_success``): a 22 seen by a background call slows the shared limiter."""

    def __init__(self, limiter: RateLimiter, share: BackgroundShare = DEFAULT_BACKGROUND):
        self.limiter = limiter
        self.policy = share
        self._clock = limiter._clock

    def __repr__(self) -> str:
        return f"BackgroundLimiter(share={self.policy.share}, {self.limiter!r})"

    @property
    def effective_rate(self) -> float:
        """The most background calls per second this view allows now."""
        return self.limiter.effective_rate * self.policy.share

    def acquire(self, cancel: threading.Event | None = None, max_wait: float | None = None) -> bool:
        """Block until a background call may be made. False if ``cancel`` was set,
        or if no slot came within ``max_wait`` seconds."""
        give_up = None if max_wait is None else self._clock.now() + max_wait
        while True:
            if cancel is not None and cancel.is_set():
                return False
            wait = self.limiter._try_background(self.policy.share)
            if wait <= 0:
                return True
            if give_up is not None and self._clock.now() + wait > give_up:
                return False
            if self._clock.sleep(wait, cancel):  # then try again: the foreground may have come
                return False

    def slow_down(self) -> None:
        self.limiter.slow_down()

    def record_success(self) -> None:
        self.limiter.record_success()
