"""The flywheel on the real local broker and Redis: 5,000 mixed raw logs through `vlmflow streams`, its
Prometheus metrics read while they flow."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from schemas.cases import HardCase
from schemas.codec import decode
from schemas.logs import REJECT_CODES, Lineage, NormalizedLog, RejectedLog
from schemas.settings import Settings
from schemas.topics import Topic
from streams.flywheel import metrics
from streams.flywheel.mining import hard_case
from streams.review.queue import CorrectionQueue
from tests.support.flywheel_data import PlannedLog, mixed_raw_logs
from tests.support.flywheel_worker import Records, metrics_port, produce, read_topics, streams_worker
from tests.support.ops_data import read_topic

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


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of the worker's /metrics, by series name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(value for (series, have), value in samples.items()
               if series == name and set(labels.items()) <= set(have))  # fmt: skip


def test_flywheel_stream(settings: Settings, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    settings = settings.model_copy(
        update={
            "streams": settings.streams.model_copy(
                update={"app_id": f"flywheel-{unique}", "review_queue": f"test-{unique}"}
            )
        }  # fmt: skip
    )
    logs = [*mixed_raw_logs(LOG_COUNT - 1, seed=11), oversized_log()]
    half = LOG_COUNT // 2
    planned = produce(settings, logs[:half])
    worker_log = tmp_path / "streams.log"
    with streams_worker(settings, worker_log) as worker:

        def screened_all(count: int) -> Callable[[Records], bool]:
            return lambda found: worker.poll() is not None or len(found[NORMALIZED]) + len(found[REJECTED]) >= count

        read_topics(settings, [NORMALIZED, REJECTED], screened_all(half), DEADLINE_S)
        port = metrics_port(worker_log)
        # The metrics while logs flow: the first half counted, the second half on its way in.
        planned |= produce(settings, logs[half:])
        flowing = scrape(port)
        assert total(flowing, f"{metrics.RECORDS_IN}", agent="raw") >= half
        assert total(flowing, f"{metrics.RECORDS_OUT}", agent="raw") >= half
        assert {dict(labels)["partition"] for (name, labels) in flowing if name == metrics.CONSUMER_LAG} == {
            str(partition) for partition in range(6)
        }

        screened = read_topics(settings, [NORMALIZED, REJECTED], screened_all(LOG_COUNT), DEADLINE_S)
        assert worker.poll() is None, worker_log.read_text()[-3000:]
        over = over_threshold(settings, [decode(NORMALIZED, record.value) for record in screened[NORMALIZED]])
        queued = asyncio.run(queued_cases(settings, len(over), 60))
        time.sleep(3 * 2)  # the progress interval (2 s): the queue gauge and the lag catch up
        done = scrape(port)
    assert worker.returncode == 0, worker_log.read_text()[-3000:]
    assert "flywheel: normalized" in worker_log.read_text()

    final = {topic: read_topic(settings, topic) for topic in (NORMALIZED, REJECTED, HARD)}
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

    # the metrics at the end agree with the topics and the queue
    assert total(done, metrics.RECORDS_IN, agent="raw") == LOG_COUNT
    for name, records in ((NORMALIZED, normalized), (REJECTED, rejected), (HARD, hard)):
        assert total(done, metrics.RECORDS_OUT, agent="raw", topic=name) == len(records), name
    by_code = Counter((r.code, r.rule or "") for r in rejected)
    assert {key: total(done, metrics.REJECTIONS, code=key[0], rule=key[1]) for key in by_code} == by_code
    assert total(done, metrics.HARD_CASES) == len(hard)
    assert total(done, metrics.QUEUE_PENDING) == len(queued)
    assert total(done, metrics.CONSUMER_LAG) == 0


def _where(lineage: Lineage | None) -> tuple[int, int]:
    assert lineage is not None and lineage.topic == Topic.LOGS_RAW
    return lineage.partition, lineage.offset
