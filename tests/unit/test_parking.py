"""``--wait-offline`` in pieces, on an injected clock: the duration parser, the
trust rule and the look schedule of :class:`deployer.parking.Parking`, the
:class:`~deployer.parking.Watcher`'s single step, and the background share of
the rate limiter that the watching runs on."""

from __future__ import annotations

import threading

import pytest

from deployer.clock import FakeClock
from deployer.errors import ClientBlocked, UsageError
from deployer.parking import Parking, WaitPolicy, Watcher
from deployer.ratelimit import BackgroundShare, RateLimiter
from deployer.rollout import MAX_DURATION, parse_duration

pytestmark = pytest.mark.unit

REAL_OFFLINE = 30.0  # the provider's offline detection (SPEC 1b)
FAST_OFFLINE = 1.5  # the sandbox's fast profile


# --- the duration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("24h", 86400),
        ("2d", 172800),
        ("1h30m", 5400),
        ("1.5h", 5400),
        (" 45S ", 45),
        ("1d2h3m4s", 93784),
    ],
)
def test_durations_with_units(spec, seconds):
    assert parse_duration(spec) == seconds


@pytest.mark.parametrize(
    "spec", ["30", "", "m", "1x", "-5m", "0s", "0m0s", "1h1h", "1 h", "30m garbage", "31d"]
)
def test_a_bad_duration_is_a_one_line_usage_error_naming_the_option(spec):
    with pytest.raises(UsageError) as info:
        parse_duration(spec, "--wait-offline")
    message = str(info.value)
    assert message.startswith("--wait-offline: ")
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_the_longest_duration_is_a_month():
    assert parse_duration("30d") == MAX_DURATION
    with pytest.raises(UsageError, match="longer than 30d"):
        parse_duration("720h1s")


# --- the policy -----------------------------------------------------------------------


def test_trust_gap_exceeds_offline_detection_and_looks_are_spaced_by_it():
    policy = WaitPolicy()
    assert policy.trust_gap(REAL_OFFLINE) == pytest.approx(33.0)  # 10 % more
    assert policy.trust_gap(FAST_OFFLINE) == pytest.approx(2.0)  # at least 0.5 s more
    assert policy.look_interval(REAL_OFFLINE) == pytest.approx(10.0)  # a third of it
    assert policy.look_interval(FAST_OFFLINE) == pytest.approx(1.0)  # but at most 1/s
    assert WaitPolicy(look_every=7).look_interval(REAL_OFFLINE) == 7


# --- the trust rule, against a model of the provider ---------------------------------------


class Provider:
    """``client_status`` as SPEC 1b computes it: online while the last poll is at
    most ``offline_detection`` old."""

    def __init__(self, polls: list[float], offline_detection: float = REAL_OFFLINE):
        self.polls = sorted(polls)
        self.offline_detection = offline_detection

    def online(self, now: float) -> bool:
        seen = [t for t in self.polls if t <= now]
        return bool(seen) and now - seen[-1] <= self.offline_detection


def watch(parking: Parking, provider: Provider, until: float, start: float = 0.0):
    """Look whenever a look is due, as the watcher does; (trusted at, look times)."""
    now, looks = start, []
    while now <= until:
        entry = parking.due(now)
        if entry is not None:
            looks.append(now)
            if parking.record(entry.index, provider.online(now), now):
                return now, looks
            continue
        due = parking.next_due()
        if due is None:
            break
        now = max(now, due)
    return None, looks


def test_a_single_poll_is_a_blip_and_is_never_trusted():
    # the client polled once at t=12 and died: "online" from 12 to 42
    parking = Parking(REAL_OFFLINE)
    parking.park(0, "pi-01", now=0.0)
    trusted, looks = watch(parking, Provider([12.0]), until=600)
    assert trusted is None
    assert 50 <= len(looks) <= 60  # about every 10 s: it kept looking, cheaply


def test_a_blip_every_minute_is_never_trusted():
    # one poll a minute: online half of the time, yet never two polls within a gap
    parking = Parking(REAL_OFFLINE)
    parking.park(0, "pi-01", now=0.0)
    trusted, _ = watch(parking, Provider([60.0 * k + 5 for k in range(10)]), until=600)
    assert trusted is None


def test_a_client_that_stays_is_trusted_one_gap_after_it_was_first_seen():
    polls = [100.0 + 5 * k for k in range(100)]  # back at t=100, polling every 5 s
    parking = Parking(REAL_OFFLINE)
    parking.park(0, "pi-01", now=0.0)
    trusted, looks = watch(parking, Provider(polls), until=600)
    first_online = min(t for t in looks if t >= 100)
    assert first_online <= 100 + parking.interval  # seen within one look interval
    assert trusted == pytest.approx(first_online + 33.0)
    assert trusted - first_online > REAL_OFFLINE  # more than offline_detection apart


def test_an_offline_look_between_two_online_ones_starts_the_streak_over():
    parking = Parking(REAL_OFFLINE)
    parking.park(0, "pi-01", now=0.0)
    assert parking.record(0, True, 10.0) is False
    assert parking.next_due() == pytest.approx(43.0)  # the confirming look
    assert parking.record(0, False, 43.0) is False
    assert parking.record(0, True, 53.0) is False  # a new streak
    assert parking.record(0, True, 80.0) is False  # 27 s: not yet
    assert parking.record(0, True, 86.0) is True


def test_a_look_without_an_answer_tells_nothing():
    parking = Parking(REAL_OFFLINE)
    parking.park(0, "pi-01", now=0.0)
    parking.record(0, True, 10.0)
    parking.record(0, None, 43.0)  # a timeout: the streak stands
    assert parking.record(0, True, 44.0) is True
    assert parking.record_of(0).looks == 3


def test_confirming_looks_go_first_then_the_longest_waiting():
    parking = Parking(REAL_OFFLINE)
    for i in range(3):
        parking.park(i, f"pi-0{i}", now=float(i))
    parking.record(2, True, 5.0)  # confirming look due at 38
    assert parking.due(9.0) is None
    assert parking.due(10.5).index == 0
    assert parking.due(40.0).index == 2  # overdue confirmations before first looks
    parking.record(2, True, 40.0)
    assert parking.due(40.0).index == 0


def test_a_re_parked_host_keeps_its_wait_but_not_its_trust():
    parking = Parking(FAST_OFFLINE)
    parking.park(3, "pi-04", now=100.0)
    parking.record(3, True, 101.0)
    assert parking.record(3, True, 103.0)
    entry = parking.take_ready()
    assert (entry.index, entry.since, entry.looks) == (3, 100.0, 2)
    assert parking.take_ready() is None and 3 not in parking
    again = parking.park(3, "pi-04", now=104.0)  # its fresh look before the upgrade: offline
    assert (again.since, again.looks, again.trusted, again.online_since) == (100.0, 2, False, None)


def test_ready_hosts_come_out_in_rollout_order_and_waiting_ones_expire():
    parking = Parking(FAST_OFFLINE)
    for i in (5, 2, 7):
        parking.park(i, f"h{i}", now=0.0)
    parking.hand_over(7)
    parking.hand_over(5)
    assert [parking.take_ready().index, parking.take_ready().index] == [5, 7]
    assert [e.index for e in parking.take_waiting()] == [2]
    assert len(parking) == 0


def test_a_fresh_look_stands_for_the_preflight_only_for_a_moment():
    parking = Parking(FAST_OFFLINE)
    entry = parking.park(0, "h0", now=0.0)
    parking.record(0, True, 1.0)
    parking.record(0, True, 3.0)
    assert entry.fresh(4.9, parking.policy)
    assert not entry.fresh(5.1, parking.policy)


# --- the watcher's step ---------------------------------------------------------------------


def test_the_watcher_looks_when_due_and_says_when_a_host_is_ready():
    clock = FakeClock(start=0.0)
    parking = Parking(FAST_OFFLINE)
    parking.park(0, "h0", now=clock.now())
    ready: list[float] = []
    seen: list[tuple[int, float]] = []

    def look(index):
        seen.append((index, clock.now()))
        return clock.now() >= 2.0

    watcher = Watcher(parking, look, clock, lambda: ready.append(clock.now()), threading.Event())
    while not ready and clock.now() < 20:
        clock.advance(watcher.step())
    assert [t for _, t in seen] == [1.0, 2.0, 4.0]  # 1 s apart, then the gap of 2 s
    assert ready == [4.0]
    assert parking.take_ready().index == 0


def test_an_error_only_the_upgrade_can_report_hands_the_host_over():
    clock = FakeClock(start=0.0)
    parking = Parking(FAST_OFFLINE)
    parking.park(0, "h0", now=0.0)
    ready = []

    def blocked(index):
        raise ClientBlocked("client blocked", call="client_status", host="h0")

    watcher = Watcher(parking, blocked, clock, lambda: ready.append(True), threading.Event())
    clock.advance(1.0)
    watcher.step()
    entry = parking.take_ready()
    assert ready == [True] and entry.index == 0 and entry.last_online is None


def test_the_watcher_thread_ends_when_halted():
    halt = threading.Event()
    parking = Parking(FAST_OFFLINE, WaitPolicy(idle=0.01))
    watcher = Watcher(parking, lambda i: False, FakeClock(), lambda: None, halt)
    watcher.start()
    watcher.stop(timeout=2.0)
    assert not watcher._thread.is_alive()


# --- the background share of the rate ------------------------------------------------------


def test_background_calls_use_at_most_their_share_of_the_rate():
    clock = FakeClock(start=0.0)
    limiter = RateLimiter(10.0, clock)
    background = limiter.background(BackgroundShare(0.1))
    times = []
    for _ in range(5):
        assert background.acquire()
        times.append(clock.now())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps == pytest.approx([1.0] * 4)  # 10 % of 10/s: one a second
    assert background.effective_rate == pytest.approx(1.0)


def test_a_foreground_call_never_waits_more_than_one_slot_for_the_background():
    clock = FakeClock(start=0.0)
    limiter = RateLimiter(10.0, clock)
    background = limiter.background(BackgroundShare(0.5))
    assert background.acquire()  # takes the slot at t=0
    assert limiter.acquire()
    assert clock.now() == pytest.approx(0.1)  # the next slot: one interval later


def test_background_calls_wait_while_the_foreground_holds_the_slots():
    clock = FakeClock(start=0.0)
    limiter = RateLimiter(10.0, clock)
    background = limiter.background(BackgroundShare(1.0))
    for _ in range(3):  # the foreground reserves ahead: t=0, 0.1, 0.2
        limiter._reserve()
    assert background.acquire()
    assert clock.now() == pytest.approx(0.3)  # after every foreground slot, not before
    assert background.acquire(max_wait=0.05) is False  # the next one is 0.1 s away


def test_a_22_on_a_background_call_slows_the_shared_limiter():
    limiter = RateLimiter(8.0, FakeClock())
    limiter.background().slow_down()
    assert limiter.effective_rate == 4.0
    limiter.background().record_success()
    assert limiter.effective_rate == 4.25


def test_a_cancelled_background_wait_returns_false():
    clock = FakeClock(start=0.0)
    limiter = RateLimiter(1.0, clock)
    background = limiter.background()
    cancel = threading.Event()
    assert background.acquire(cancel)
    cancel.set()
    assert background.acquire(cancel) is False


def test_a_background_share_must_be_a_fraction():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            BackgroundShare(bad)
