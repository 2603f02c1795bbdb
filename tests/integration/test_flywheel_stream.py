"""The flywheel's agents on the real local broker and Redis: 5,000 mixed raw logs through `vlmflow streams`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from redis.asyncio import Redis

from schemas.cases import HardCase
from schemas.codec import decode
from schemas.logs import REJECT_CODES, Lineage, NormalizedLog, RejectedLog
from schemas.settings import Settings
from schemas.topics import Topic
from streams.flywheel.mining import hard_case
from streams.review.queue import CorrectionQueue
from tests.support.flywheel_data import PlannedLog, mixed_raw_logs
from tests.support.flywheel_worker import Records, produce, read_topics, streams_worker

LOG_COUNT = 5_000
DEADLINE_S = 150.0
NORMALIZED, REJECTED, HARD = Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED, Topic.CASES_HARD

pytestmark = pytest.mark.timeout(300)


def over_threshold(settings: Settings, logs: list[NormalizedLog]) -> list[NormalizedLog]:
    mining, threshold = settings.streams.mining, settings.streams.hard_case_threshold
    return [log for log in logs if hard_case(log, mining, threshold=threshold) is not None]


async def queued_cases(settings: Settings, expected: int, timeout_s: float) -> list[HardCase]:
    """The correction queue's pending cases in serving order, once `expected` are there (or the time is up)."""
    redis = Redis.from_url(settings.redis.url)
    try:
        queue = CorrectionQueue(redis, settings.streams.review_queue)
        deadline = time.monotonic() + timeout_s
        while (await queue.stats()).pending < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        return [case for case, _ in await queue.peek(expected + 100)]
    finally:
        await redis.aclose()


def oversized_log() -> PlannedLog:
    """A legal raw log whose normalized record (answer text and parsed answer) would not fit a Kafka message."""
    answer = json.dumps({"caption": "x" * 600_000})
    raw = {"req_id": "huge", "ts": 1772366400, "img": "vlm-images/huge.png", "q": "describe", "ans": answer}
    return PlannedLog(b"huge", json.dumps(raw).encode(), "rejected:too_large")


def test_flywheel_stream(settings: Settings, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    settings = settings.model_copy(
        update={
            "streams": settings.streams.model_copy(
                update={"app_id": f"flywheel-{unique}", "review_queue": f"test-{unique}"}
            )
        }  # fmt: skip
    )
    planned = produce(settings, [*mixed_raw_logs(LOG_COUNT - 1, seed=11), oversized_log()])
    worker_log = tmp_path / "streams.log"
    with streams_worker(settings, worker_log) as worker:

        def all_screened(found: Records) -> bool:
            return worker.poll() is not None or len(found[NORMALIZED]) + len(found[REJECTED]) >= LOG_COUNT

        screened = read_topics(settings, [NORMALIZED, REJECTED], all_screened, DEADLINE_S)
        assert worker.poll() is None, worker_log.read_text()[-3000:]
        over = over_threshold(settings, [decode(NORMALIZED, record.value) for record in screened[NORMALIZED]])
        queued = asyncio.run(queued_cases(settings, len(over), 60))
    assert worker.returncode == 0, worker_log.read_text()[-3000:]
    assert "flywheel: normalized" in worker_log.read_text()

    final = read_topics(settings, [NORMALIZED, REJECTED, HARD], lambda _: False, 3)
    normalized: list[NormalizedLog] = [decode(NORMALIZED, record.value) for record in final[NORMALIZED]]
    rejected: list[RejectedLog] = [decode(REJECTED, record.value) for record in final[REJECTED]]
    hard: list[HardCase] = [decode(HARD, record.value) for record in final[HARD]]

    # normalized + rejected = input, exactly: every raw record once, with the outcome planned for it
    outcomes: dict[tuple[int, int], str] = {}
    for log in normalized:
        outcomes[_where(log.lineage)] = "normalized"
    for rejection in rejected:
        assert rejection.code in REJECT_CODES and (rejection.code != "rule" or rejection.rule), rejection
        reason = {"rule": f"rule:{rejection.rule}", "duplicate": "duplicate"}.get(rejection.code)
        outcomes[_where(rejection.lineage)] = reason or f"rejected:{rejection.code}"
    assert len(normalized) + len(rejected) == LOG_COUNT == len(outcomes)
    assert set(outcomes) == set(planned)
    mismatches = Counter((planned[at].expect, got) for at, got in outcomes.items() if planned[at].expect != got)
    assert not mismatches, mismatches

    # no planted PII on any output topic (rejected originals included) nor in the queue
    everything = b"".join(record.value for records in final.values() for record in records).decode()
    everything += "".join(case.model_dump_json() for case in queued)
    leaked = [canary for log in planned.values() for canary in log.canaries if canary in everything]
    assert not leaked, leaked[:5]

    # every log over the threshold is a hard case, once, and nothing else is; the planted ones are among them
    over = over_threshold(settings, normalized)
    assert sorted(case.log_id for case in hard) == sorted(log.log_id for log in over)
    planted = {log.log_id for log in normalized if planned[_where(log.lineage)].planted_hard}
    assert planted and planted <= {case.log_id for case in hard}
    by_id = {log.log_id: log for log in normalized}
    assert all(case.priority == round(case.score * 100) and case.log == by_id[case.log_id] for case in hard)

    # ... and all of them wait in the correction queue, highest priority first
    assert sorted(case.case_id for case in queued) == sorted(case.case_id for case in hard)
    priorities = [case.priority for case in queued]
    assert priorities == sorted(priorities, reverse=True) and priorities[0] > priorities[-1]

    # two tries of one request: the one screened second counts one earlier try
    attempts: dict[str, list[int]] = defaultdict(list)
    for log in normalized:
        group = planned[_where(log.lineage)].retry_group
        if group is not None:
            attempts[group].append(log.attempt)
    assert attempts and all(sorted(tries) == [0, 1] for tries in attempts.values()), attempts


def _where(lineage: Lineage | None) -> tuple[int, int]:
    assert lineage is not None and lineage.topic == Topic.LOGS_RAW
    return lineage.partition, lineage.offset
