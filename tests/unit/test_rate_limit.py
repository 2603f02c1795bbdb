"""The rate limiter's schedule, checked on a simulated clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.ops.rate_limit import RateError, RateLimiter, parse_rate


def _send_times(limiter: RateLimiter, gaps: list[float]) -> list[float]:
    """Send times of a caller that asks `gap` seconds after its previous send and sleeps as told."""
    now, sent = 0.0, []
    for gap in gaps:
        now += gap
        now += limiter.reserve(now)
        sent.append(now)
    return sent


@given(
    st.floats(1, 10_000),
    st.floats(0, 0.5),
    st.lists(st.one_of(st.just(0.0), st.floats(0, 0.05), st.floats(0, 2)), min_size=2, max_size=300),
)
def test_no_stretch_of_time_sees_more_than_rate_plus_slack(rate: float, slack: float, gaps: list[float]) -> None:
    sent = _send_times(RateLimiter(rate, slack_s=slack), gaps)
    for first in range(len(sent)):
        for last in range(first, len(sent)):
            assert last - first + 1 <= rate * (sent[last] - sent[first] + slack) + 1 + 1e-6


@given(st.floats(1, 10_000), st.integers(2, 2_000))
def test_an_eager_caller_runs_at_the_rate(rate: float, count: int) -> None:
    sent = _send_times(RateLimiter(rate, slack_s=0), [0.0] * count)
    assert sent[-1] - sent[0] == pytest.approx((count - 1) / rate)


@given(st.floats(0.001, 0.1), st.integers(20, 150))
def test_pauses_within_the_slack_are_made_up(pause: float, at: int) -> None:
    limiter, now, sent = RateLimiter(100, slack_s=0.1), 0.0, []
    for index in range(200):
        now += limiter.reserve(now) + (pause if index == at else 0.0)
        sent.append(now)
    assert sent[-1] == pytest.approx(199 / 100 - 0.1, abs=1e-9)


def test_a_long_pause_is_not_made_up() -> None:
    limiter = RateLimiter(10, slack_s=0)
    assert limiter.reserve(0.0) == 0.0
    assert limiter.reserve(5.0) == 0.0
    assert limiter.reserve(5.0) == pytest.approx(0.1)


@pytest.mark.parametrize(("text", "rate"), [("500", 500.0), ("500/s", 500.0), ("2.5/s", 2.5)])
def test_rates(text: str, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "0", "-5/s", "inf", "nan", "5/m"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(RateError):
        parse_rate(text)
