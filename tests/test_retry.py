"""RetryPolicy: validated, exponential with full jitter, capped, honouring Retry-After."""
import math

import pytest

from notifier.config import ConfigError, Settings
from notifier.retry import RetryPolicy


def policy(base=1.0, cap=300.0, max_attempts=8):
    return RetryPolicy(base=base, cap=cap, max_attempts=max_attempts)


@pytest.mark.parametrize("kwargs", [
    dict(base=0), dict(base=-1), dict(base=math.inf), dict(base=math.nan), dict(base="1"),
    dict(cap=0), dict(cap=math.inf), dict(base=10, cap=5),
    dict(max_attempts=0), dict(max_attempts=-3), dict(max_attempts=2.5), dict(max_attempts=True),
])
def test_nonsense_is_a_value_error(kwargs):
    with pytest.raises(ValueError):
        policy(**kwargs)


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        policy().base = 2


def test_ceiling_doubles_per_attempt_until_cap():
    p = policy(base=1, cap=10)
    top = lambda: 1.0  # the top of the jitter range
    assert [p.delay_for(n, rand=top) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_full_jitter_spans_zero_to_ceiling():
    p = policy(base=2, cap=100)
    assert p.delay_for(3, rand=lambda: 0.0) == 0.0
    assert p.delay_for(3, rand=lambda: 0.5) == 4.0
    delays = [p.delay_for(3) for _ in range(200)]
    assert all(0 <= d < 8 for d in delays)
    assert max(delays) - min(delays) > 1  # really random


def test_retry_after_is_a_floor():
    p = policy(base=1, cap=10)
    assert p.delay_for(1, retry_after=30, rand=lambda: 0.0) == 30   # above cap: the provider asked
    assert p.delay_for(5, retry_after=2, rand=lambda: 1.0) == 10    # already longer: unchanged
    assert p.delay_for(5, retry_after=2, rand=lambda: 0.0) == 2
    assert p.delay_for(1, retry_after=None, rand=lambda: 0.5) == 0.5


def test_huge_attempt_numbers_do_not_overflow():
    assert policy(cap=300).delay_for(10_000, rand=lambda: 1.0) == 300


@pytest.mark.parametrize("attempt", [0, -1, 1.5, None])
def test_attempt_must_be_positive_int(attempt):
    with pytest.raises(ValueError):
        policy().delay_for(attempt)


def test_exhausted_after_max_attempts():
    p = policy(max_attempts=3)
    assert not p.exhausted(0) and not p.exhausted(2)
    assert p.exhausted(3) and p.exhausted(4)


def test_from_settings_and_config_error_naming_variables():
    p = RetryPolicy.from_settings(Settings(push_retry_base=2, push_retry_max=60, push_max_attempts=5))
    assert p == RetryPolicy(base=2, cap=60, max_attempts=5)
    with pytest.raises(ConfigError, match="PUSH_RETRY_MAX"):
        RetryPolicy.from_settings(Settings(push_retry_base=100, push_retry_max=60))
