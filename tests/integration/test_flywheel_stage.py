"""The raw-log stage in this process on the real broker and Redis: a consumer replaced mid-stream (what the stage
does when its fetches stop answering) leaves the group, a new one joins and fetches from the last commit, and
every raw record still has exactly one outcome."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from schemas.codec import decode
from schemas.logs import Lineage, NormalizedLog, RejectedLog
from schemas.settings import Settings
from schemas.topics import Topic
from streams.flywheel.metrics import CONSUMER_REPLACED, StreamsMetrics
from streams.flywheel.stage import BATCH_MAX, Counts, RawLogStage
from tests.support.flywheel_data import mixed_raw_logs
from tests.support.flywheel_worker import produce, read_topics

REPLACE_AFTER = BATCH_MAX
LOGS = 6 * BATCH_MAX
"""Records are left to fetch after the replacement: at most the batch in hand and the one ahead are fetched."""

pytestmark = pytest.mark.timeout(300)


async def test_a_replaced_consumer_resumes_from_the_last_commit_and_writes_nothing_twice(settings: Settings) -> None:
    unique = uuid.uuid4().hex[:8]
    streams = settings.streams.model_copy(update={"app_id": f"stage-{unique}", "review_queue": f"stage-{unique}"})
    settings = settings.model_copy(update={"streams": streams})
    planned = await asyncio.to_thread(produce, settings, mixed_raw_logs(LOGS, seed=41))
    counts, metrics = Counts(), StreamsMetrics()
    stage = RawLogStage(settings, counts, metrics)
    await stage.start()
    try:
        await _until(lambda: _outcomes(counts) >= REPLACE_AFTER, "the first outcomes")
        first_consumer = stage.consumer
        stage.replace_consumer("replaced by the test")
        await _until(lambda: _outcomes(counts) >= LOGS, "every outcome")
        assert stage.consumer is not first_consumer
        assert metrics.registry.get_sample_value(CONSUMER_REPLACED) == 1
    finally:
        await stage.stop()

    final = await asyncio.to_thread(
        read_topics, settings, [Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED], lambda _: False, 3
    )
    outcomes: list[NormalizedLog | RejectedLog] = [
        *(decode(Topic.LOGS_NORMALIZED, r.value) for r in final[Topic.LOGS_NORMALIZED]),
        *(decode(Topic.LOGS_REJECTED, r.value) for r in final[Topic.LOGS_REJECTED]),
    ]
    positions = Counter(_where(item.lineage) for item in outcomes)
    assert [at for at, n in positions.items() if n > 1] == []
    assert set(positions) == set(planned)


def _outcomes(counts: Counts) -> int:
    return counts.normalized + sum(counts.rejected.values())


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def _where(lineage: Lineage | None) -> tuple[int, int]:
    assert lineage is not None and lineage.topic == Topic.LOGS_RAW
    return lineage.partition, lineage.offset
