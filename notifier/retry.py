"""The one retry layer: a small validated value object (rq's ``Retry`` style).

The attempt count and the next-attempt time live in the database (the dispatcher
stores them); this object only answers "how long until the next attempt?" and
"is this delivery out of attempts?". The providers' own retries are turned off.
"""
from __future__ import annotations

import email.utils
import math
import random
import time
from datetime import timezone
from dataclasses import dataclass
from typing import Callable

from notifier.config import ConfigError, Settings

_MAX_EXPONENT = 64  # 2**64 * base is far beyond any cap: stop growing before floats overflow


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with full jitter, capped, honouring Retry-After.

    base: the first back-off ceiling in seconds (> 0).
    cap: the largest back-off ceiling in seconds (>= base).
    max_attempts: attempts allowed in total, the first one included (>= 1).
    """

    base: float
    cap: float
    max_attempts: int

    def __post_init__(self) -> None:
        for name in ("base", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"RetryPolicy.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"RetryPolicy.{name} must be a positive finite number, got {value!r}")
        if self.cap < self.base:
            raise ValueError(f"RetryPolicy.cap ({self.cap}) must not be less than base ({self.base})")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"RetryPolicy.max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}")

    @classmethod
    def from_settings(cls, settings: Settings) -> "RetryPolicy":
        """PUSH_RETRY_BASE, PUSH_RETRY_MAX, PUSH_MAX_ATTEMPTS; ConfigError naming them on nonsense."""
        try:
            return cls(base=settings.push_retry_base, cap=settings.push_retry_max,
                       max_attempts=settings.push_max_attempts)
        except ValueError as exc:
            raise ConfigError(f"PUSH_RETRY_BASE/PUSH_RETRY_MAX/PUSH_MAX_ATTEMPTS: {exc}") from None

    def delay_for(self, attempt: int, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the next attempt, after ``attempt`` attempts failed (attempt >= 1).

        Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))). Never less than
        ``retry_after`` when the provider sent one (even above ``cap``: the provider
        asked us to wait).
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
        delay = ceiling * min(max(rand(), 0.0), 1.0)
        if retry_after is not None and math.isfinite(retry_after) and retry_after > delay:
            delay = float(retry_after)
        return delay

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` attempts have been made and no more are allowed."""
        return attempts >= self.max_attempts


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if seconds >= 0 and seconds == seconds else None
