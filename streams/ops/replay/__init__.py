"""Replay: copy a window of a topic (by offsets or time, filtered, rate-limited) into a target topic, with
headers that mark replayed records, resumable from a checkpoint without duplicates.

`plan` resolves the request into per-partition offset ranges (pure), `checkpoint` keeps progress on disk,
`run` reads, filters and produces.
"""

from streams.ops.replay.checkpoint import ReplayCheckpoint, ReplayCounts, load_checkpoint
from streams.ops.replay.plan import ReplayError, ReplayPlan, ReplayRequest, plan_replay
from streams.ops.replay.run import ReplayOutcome, run_replay, start_replay

__all__ = [
    "ReplayCheckpoint",
    "ReplayCounts",
    "ReplayError",
    "ReplayOutcome",
    "ReplayPlan",
    "ReplayRequest",
    "load_checkpoint",
    "plan_replay",
    "run_replay",
    "start_replay",
]
