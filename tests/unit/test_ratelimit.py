from __future__ import annotations

import threading
from collections import Counter

import pytest

from deployer.clock import Clock, FakeClock
from deployer.ratelimit import RateLimiter

pytestmark = pytest.mark.unit


def _acquire_times(limiter: RateLimiter, clock: FakeClock, n: int) -> list[float]:
    times = []
    for _ in range(n):
        assert limiter.acquire()
        times.append(clock.now())
    return times


def test_calls_are_spaced_by_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(5.0, clock)
    times = _acquire_times(limiter, clock, 11)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps == pytest.approx([0.2] * 10)


def test_burst_lets_the_first_calls_through_at_once():
    clock = FakeClock()
    limiter = RateLimiter(2.0, clock, burst=3)
    times = _acquire_times(limiter, clock, 5)
    assert times[:3] == [times[0]] * 3
    assert times[4] - times[0] == pytest.approx(1.0)


def test_an_idle_limiter_does_not_bank_more_than_its_burst():
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock)
    limiter.acquire()
    clock.advance(100)
    times = _acquire_times(limiter, clock, 3)
    assert times[1] - times[0] == pytest.approx(1.0)


def test_slow_down_halves_down_to_a_floor_and_success_recovers_gradually():
    clock = FakeClock()
    limiter = RateLimiter(16.0, clock)
    limiter.slow_down()
    assert limiter.effective_rate == 8.0
    limiter.slow_down()  # within the cooldown: one burst of 22s halves once
    assert limiter.effective_rate == 8.0
    for _ in range(10):
        clock.advance(2)
        limiter.slow_down()
    assert limiter.effective_rate == 1.0  # floor: rate / 16
    limiter.record_success()
    assert limiter.effective_rate == 1.5  # + rate / 32
    for _ in range(30):
        limiter.record_success()
    assert limiter.effective_rate == 16.0


def test_slowed_limiter_spaces_calls_wider():
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock)
    limiter.acquire()
    limiter.slow_down()
    start = clock.now()
    limiter.acquire()  # the slot reserved before the slow-down: 0.1 s
    limiter.acquire()  # now at 5/s: 0.2 s
    assert clock.now() - start == pytest.approx(0.3)


def test_cancel_returns_false():
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock)
    cancel = threading.Event()
    assert limiter.acquire(cancel)
    cancel.set()
    assert limiter.acquire(cancel) is False


@pytest.mark.parametrize("rate", [0, -1.0])
def test_rate_must_be_positive(rate):
    with pytest.raises(ValueError):
        RateLimiter(rate)


def test_sixteen_threads_share_the_rate_fairly():
    """Real clock, high rate: 16 threads x 8 calls at 400/s."""
    rate, threads, each = 400.0, 16, 8
    clock = Clock()
    limiter = RateLimiter(rate, clock)
    grants: list[tuple[float, int]] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(threads)

    def worker(idx: int) -> None:
        start_gate.wait()
        for _ in range(each):
            limiter.acquire()
            with lock:
                grants.append((clock.now(), idx))

    t0 = clock.now()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert len(grants) == threads * each
    grants.sort()
    # never faster than the rate: the k-th grant comes no sooner than k intervals in
    for k, (when, _) in enumerate(grants):
        assert when - t0 >= k / rate - 1e-3
    # first come, first served: in the first half of all grants every thread
    # got at least a quarter of its calls (perfect fairness: half)
    first_half = Counter(idx for _, idx in grants[: len(grants) // 2])
    assert set(first_half) == set(range(threads))
    assert min(first_half.values()) >= each // 4


def test_a_slot_beyond_max_wait_is_refused_at_once_and_not_reserved():
    """A caller with a deadline (opening the window while an armed guard waits)
    never queues past it: refused at once, and its refusal costs nobody a slot."""
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock)
    assert limiter.acquire()  # takes the slot at t0
    t0 = clock.now()
    assert limiter.acquire(max_wait=0.5) is False
    assert clock.now() == t0  # no wait at all
    assert limiter.acquire(max_wait=1.5)  # the next slot is still the one at t0 + 1
    assert clock.now() - t0 == pytest.approx(1.0)
