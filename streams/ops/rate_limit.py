"""Pacing sends to a rate, without I/O: the caller asks how long to wait and sleeps itself.

A schedule (GCRA): send n is due at `start + n / rate`. Sends may run up to `slack_s` ahead of it, which makes
up for short pauses (a checkpoint's flush, a busy CPU) without which a paced loop always ends up slower than its
rate; a longer pause is not made up, so no stretch of t seconds ever sees more than `rate · (t + slack_s) + 1`
sends.
"""

from __future__ import annotations

from schemas.errors import VlmflowError

RATE_HELP = "records per second, e.g. 500 or 500/s"
DEFAULT_SLACK_S = 0.05


class RateError(VlmflowError, ValueError):
    """A rate that cannot be read or is not positive."""


def parse_rate(text: str) -> float:
    """`500`, `500/s` or `2.5/s` → records per second."""
    value = text.strip().removesuffix("/s")
    try:
        rate = float(value)
    except ValueError:
        raise RateError(f"cannot read rate {text!r}: use {RATE_HELP}") from None
    if not 0 < rate < float("inf"):
        raise RateError(f"rate {text!r} must be a positive number of {RATE_HELP}")
    return rate


class RateLimiter:
    """Books sends at `per_second`, letting them run up to `slack_s` ahead of the schedule."""

    def __init__(self, per_second: float, *, slack_s: float = DEFAULT_SLACK_S):
        if per_second <= 0 or slack_s < 0:
            raise RateError(
                f"rate {per_second}/s with slack {slack_s} s: the rate must be positive, the slack not negative"
            )
        self.interval_s = 1.0 / per_second
        self.slack_s = slack_s
        self._due_s: float | None = None
        """When the next send is due on the schedule; None before the first."""

    def reserve(self, now_s: float) -> float:
        """Book one send asked for at `now_s`; returns the seconds to wait before it may go."""
        due = now_s if self._due_s is None else max(self._due_s, now_s)
        self._due_s = due + self.interval_s
        return max(0.0, due - self.slack_s - now_s)
