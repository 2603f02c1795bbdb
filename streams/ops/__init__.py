"""Ops tools over kafka-python (no Faust): replay a window of a topic, reset a consumer group, lag, tail and
describe. Windows and filters are pure (`window`, `filter_expr`, `rate_limit`); the rest reads through
`streams.cluster`. `reset` was `offsets` (the worker has its own `workers.offsets`, its commit bookkeeping).
"""

from streams.ops.describe import describe_topic, render_description
from streams.ops.filter_expr import FilterError, matches, parse, render
from streams.ops.lag import GroupLag, UnknownGroup, group_lags, render_lag
from streams.ops.rate_limit import RateError, RateLimiter, parse_rate
from streams.ops.reset import GroupActive, ResetError, ResetPlan, apply_reset, plan_reset, render_plan
from streams.ops.tail import follow, format_record, last_records
from streams.ops.window import TimeWindow, WindowError, format_time, parse_time

__all__ = [
    "FilterError",
    "GroupActive",
    "GroupLag",
    "RateError",
    "RateLimiter",
    "ResetError",
    "ResetPlan",
    "TimeWindow",
    "UnknownGroup",
    "WindowError",
    "apply_reset",
    "describe_topic",
    "follow",
    "format_record",
    "format_time",
    "group_lags",
    "last_records",
    "matches",
    "parse",
    "parse_rate",
    "parse_time",
    "plan_reset",
    "render",
    "render_description",
    "render_lag",
    "render_plan",
]
