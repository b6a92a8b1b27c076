from __future__ import annotations

import random

import pytest

from deployer.errors import (
    ApiError,
    ApiTransientError,
    ClientBlocked,
    ClientInactive,
    ForwardingServerUnreachable,
    InvalidApiCall,
    InvalidApiKey,
    InvalidRegion,
    NotConnected,
    NotDisconnected,
    ProviderInternalError,
    TooManyCalls,
    UnknownApiError,
    WrongData,
)
from deployer.retry import DEFAULT_RETRY, HARD_RETRY, NO_RETRY, RetryPolicy

pytestmark = pytest.mark.unit


def _err(cls: type[ApiError], code: int | None = None) -> ApiError:
    return cls("x", call="connect", code=code)


def test_ceiling_doubles_up_to_cap():
    policy = RetryPolicy(attempts=10, base=0.5, cap=3.0, deadline=60)
    assert [policy.ceiling(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_full_jitter_stays_within_zero_and_ceiling_and_spreads():
    policy = RetryPolicy(attempts=6, base=1.0, cap=4.0, deadline=60)
    rng = random.Random(7)
    samples = [policy.delay(2, rng) for _ in range(2000)]
    assert all(0.0 <= s <= 4.0 for s in samples)
    # full jitter: spread over the whole range, not bunched at the ceiling
    assert min(samples) < 0.5 and max(samples) > 3.5


def test_delays_yields_one_wait_between_each_try():
    policy = RetryPolicy(attempts=4, base=1.0, cap=100.0, deadline=60)
    waits = list(policy.delays(random.Random(1)))
    assert len(waits) == 3
    assert all(0 <= w <= policy.ceiling(n) for n, w in enumerate(waits))


@pytest.mark.parametrize(
    "error, retried",
    [
        (_err(ApiTransientError), True),
        (_err(NotConnected), True),
        (_err(NotDisconnected), True),
        (_err(TooManyCalls), True),
        (_err(InvalidApiCall), False),
        (_err(ClientBlocked), False),
        (_err(ClientInactive), False),
        (_err(WrongData), False),
        # get_client_script (SPEC 1b): 40 and 45 pass, 32 and 41 do not
        (_err(ForwardingServerUnreachable), True),
        (_err(ProviderInternalError), True),
        (_err(InvalidApiKey), False),
        (_err(InvalidRegion), False),
        (_err(UnknownApiError, 99), False),
        (_err(ApiError), False),  # an HTTP 4xx without a SPEC reply
    ],
)
def test_default_policy_retries_what_spec_1_and_1b_say(error, retried):
    assert DEFAULT_RETRY.should_retry(error) is retried
    assert HARD_RETRY.should_retry(error) is retried


def test_without_codes_keeps_timing_and_retries_only_transient_failures():
    raw = DEFAULT_RETRY.without_codes()
    assert (raw.attempts, raw.base, raw.cap, raw.deadline) == (
        DEFAULT_RETRY.attempts,
        DEFAULT_RETRY.base,
        DEFAULT_RETRY.cap,
        DEFAULT_RETRY.deadline,
    )
    assert raw.should_retry(_err(ApiTransientError))
    assert not raw.should_retry(_err(TooManyCalls))


def test_named_policies_have_the_intended_shape():
    assert NO_RETRY.attempts == 1 and list(NO_RETRY.delays()) == []
    assert HARD_RETRY.attempts > DEFAULT_RETRY.attempts
    assert HARD_RETRY.deadline >= 60
    # the hard policy's waits can add up to its deadline (it does not give up early)
    assert sum(HARD_RETRY.ceiling(n) for n in range(HARD_RETRY.attempts - 1)) > HARD_RETRY.deadline


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"base": -1.0}, {"deadline": -1.0}])
def test_invalid_policies_are_refused(kwargs):
    args = {"attempts": 3, "base": 1.0, "cap": 2.0, "deadline": 5.0, **kwargs}
    with pytest.raises(ValueError):
        RetryPolicy(**args)
