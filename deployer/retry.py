"""Retry policies as data: how often, how long between tries, and for what.

A :class:`RetryPolicy` answers two questions for the API client: *may this
failure be retried?* (:meth:`RetryPolicy.should_retry`) and *how long to wait
before try n+1?* (:meth:`RetryPolicy.delay`, exponential backoff with full
jitter: ``uniform(0, min(cap, base * 2**n))``). The total time is bounded by
``deadline`` (seconds since the first try), the number of tries by
``attempts``. Waiting itself is the caller's job (through a
:class:`~deployer.clock.Clock`), so policies are pure and testable.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from deployer.errors import ApiError, ApiTransientError

# Provider codes worth another try (docs/reference/api-codes.md): not connected, not
# disconnected, too many calls; and from get_client_script: forwarding server
# unreachable, provider internal error. 21, 23, 24, 31, 32 (invalid api key)
# and 41 (invalid region) are never retried: another try gets the same answer.
RETRYABLE_CODES: frozenset[int] = frozenset({11, 12, 22, 40, 45})
THROTTLED_CODE = 22


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # tries in all, the first included (1 = no retry)
    base: float  # seconds: the backoff ceiling before retry 1
    cap: float  # seconds: the largest backoff ceiling
    deadline: float  # seconds since the first try after which no retry starts
    retry_codes: frozenset[int] = RETRYABLE_CODES
    retry_transient: bool = True  # network errors, timeouts, HTTP 5xx, bad replies
    # 22 (too many calls) says "later", not "broken": it is retried until the
    # deadline, up to this many tries, while the shared limiter slows everyone
    throttled_attempts: int = 30

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if min(self.base, self.cap, self.deadline) < 0:
            raise ValueError("RetryPolicy times must not be negative")

    def ceiling(self, retry: int) -> float:
        """The largest wait before retry number ``retry`` (0-based)."""
        return min(self.cap, self.base * 2.0**retry)

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Full jitter: a uniform wait in ``[0, ceiling(retry)]``."""
        return (rng or random).uniform(0.0, self.ceiling(retry))

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The ``attempts - 1`` waits between tries (before deadline clipping)."""
        for retry in range(self.attempts - 1):
            yield self.delay(retry, rng)

    def attempts_for(self, error: ApiError) -> int:
        """How many tries in all a failure of this kind gets."""
        if error.code == THROTTLED_CODE:
            return max(self.attempts, self.throttled_attempts)
        return self.attempts

    def should_retry(self, error: ApiError) -> bool:
        """True if ``error`` is of a kind this policy retries."""
        if isinstance(error, ApiTransientError):
            return self.retry_transient
        return error.code in self.retry_codes

    def without_codes(self) -> RetryPolicy:
        """The same timing, retrying transient failures only (for raw calls)."""
        return RetryPolicy(
            self.attempts,
            self.base,
            self.cap,
            self.deadline,
            frozenset(),
            self.retry_transient,
            self.throttled_attempts,
        )


# Ordinary calls: 5 tries, waits up to 0.5, 1, 2, 4 s; never more than 30 s.
DEFAULT_RETRY = RetryPolicy(attempts=5, base=0.5, cap=8.0, deadline=30.0)

# Closing the allow-clientless window (docs/explanation/stages.md, step 10): it must not give up
# early, so many tries over at least 90 s, waits capped at 10 s.
HARD_RETRY = RetryPolicy(attempts=30, base=0.5, cap=10.0, deadline=90.0)

# One try, for callers that do their own polling.
NO_RETRY = RetryPolicy(attempts=1, base=0.0, cap=0.0, deadline=0.0, throttled_attempts=1)
