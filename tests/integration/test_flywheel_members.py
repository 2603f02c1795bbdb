"""Three `vlmflow streams` members in one group, one SIGKILLed mid-stream and another started: 20,000 raw logs and
a stream of corrections, each raw log's outcome written exactly once, no hard case queued twice, and no golden
version created by a redelivery (docs/flywheel.md, "Delivery")."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from redis.asyncio import Redis

from schemas.cases import Correction, GoldenRecord, HardCase
from schemas.codec import decode, encode
from schemas.logs import Lineage, NormalizedLog, RejectedLog
from schemas.settings import Settings
from schemas.topics import Topic
from streams.flywheel.mining import hard_case
from streams.flywheel.normalize import normalize, raw_log_id
from streams.review.queue import CorrectionQueue
from tests.support.flywheel_data import PlannedLog, mixed_raw_logs
from tests.support.flywheel_worker import produce, read_topics, streams_worker
from tests.support.ops_data import read_topic

LOG_COUNT = 20_000
CASES = 40
KILL_AT = 0.25
"""Member 0 is killed once this share of the logs has an outcome."""
DEADLINE_S = 600.0
NORMALIZED, REJECTED, HARD = Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED, Topic.CASES_HARD
T1 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

pytestmark = pytest.mark.timeout(900)


class Tail:
    """Counts the records on some topics as they arrive (an assigned consumer that keeps its position)."""

    def __init__(self, settings: Settings, topics: list[str]):
        self.consumer = KafkaConsumer(**settings.kafka.client_options(), enable_auto_commit=False, group_id=None)
        partitions = [TopicPartition(t, p) for t in topics for p in self.consumer.partitions_for_topic(t)]
        self.consumer.assign(partitions)
        for tp in partitions:
            self.consumer.seek(tp, 0)
        self.count = 0

    def poll(self) -> int:
        for records in self.consumer.poll(timeout_ms=500).values():
            self.count += len(records)
        return self.count

    def close(self) -> None:
        self.consumer.close()


def corrections(logs: list[PlannedLog]) -> tuple[list[Correction], list[Correction]]:
    """Two corrections per case (answers A then B, an hour apart), as submitted and as delivered again later."""
    first, second = [], []
    for index, planned in enumerate(logs):
        log = normalize(planned.value, lineage=Lineage(topic=Topic.LOGS_RAW, partition=0, offset=index))
        case = HardCase(case_id=f"case-{log.log_id}", log_id=log.log_id, score=1.5, priority=150, signals=[], log=log)
        for answer, at, into in (("a", T1, first), ("b", T1 + timedelta(hours=1), second)):
            into.append(
                Correction(
                    case_id=case.case_id,
                    log_id=log.log_id,
                    task="detect",
                    reviewer="rita",
                    case=case,
                    output={"objects": [], "answer": answer, "case": index},
                    submitted_at=at,
                )  # fmt: skip
            )
    return first, second


def send_corrections(settings: Settings, items: list[Correction]) -> None:
    producer = KafkaProducer(**settings.kafka.client_options(), acks="all")
    for item in items:
        producer.send(Topic.CORRECTIONS_DONE, key=item.case_id.encode(), value=encode(item))
    producer.flush()
    producer.close()


async def queue_contents(settings: Settings) -> tuple[list[HardCase], dict[str, int]]:
    redis = Redis.from_url(settings.redis.url)
    try:
        queue = CorrectionQueue(redis, settings.streams.review_queue)
        stats = await queue.stats()
        return [case for case, _ in await queue.peek(stats.pending + 10)], stats.counters
    finally:
        await redis.aclose()


def test_three_members_one_killed_write_each_outcome_once(settings: Settings, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    streams = settings.streams.model_copy(update={"app_id": f"members-{unique}", "review_queue": f"members-{unique}"})
    settings = settings.model_copy(update={"streams": streams})
    planned = produce(settings, mixed_raw_logs(LOG_COUNT, seed=29))
    corrected = [log for log in planned.values() if log.expect == "normalized"][:CASES]
    submitted, resubmitted = corrections(corrected)
    send_corrections(settings, [item for pair in zip(submitted, resubmitted, strict=True) for item in pair])

    tail = Tail(settings, [NORMALIZED, REJECTED])
    logs = [tmp_path / f"member-{n}.log" for n in range(4)]
    with contextlib.ExitStack() as members:
        workers = [members.enter_context(streams_worker(settings, logs[n])) for n in range(3)]
        deadline = time.monotonic() + DEADLINE_S
        while tail.poll() < LOG_COUNT * KILL_AT:
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), _logs(logs)
        workers[0].send_signal(signal.SIGKILL)
        assert workers[0].wait(timeout=30) == -signal.SIGKILL
        killed_at = tail.count
        # The older and the newer correction of every case again, the older last (a replay or a redelivery).
        send_corrections(settings, [item for pair in zip(resubmitted, submitted, strict=True) for item in pair])
        workers.append(members.enter_context(streams_worker(settings, logs[3])))
        while tail.poll() < LOG_COUNT:
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers[1:]), _logs(logs)
        golden = _wait_for_golden(settings, 2 * CASES, deadline)
        time.sleep(5)  # anything written twice would arrive now
        final = {
            topic: read_topic(settings, topic, timeout_s=120) for topic in (NORMALIZED, REJECTED, HARD, Topic.GOLDEN)
        }
        assert all(w.poll() is None for w in workers[1:]), _logs(logs)
    tail.close()
    assert LOG_COUNT * KILL_AT <= killed_at < LOG_COUNT, "the kill must happen mid-stream"

    # normalized ∪ rejected = the input: every raw record once (by lineage), the same log ids as often as sent
    normalized: list[NormalizedLog] = [decode(NORMALIZED, r.value) for r in final[NORMALIZED]]
    rejected: list[RejectedLog] = [decode(REJECTED, r.value) for r in final[REJECTED]]
    positions = Counter(_where(item.lineage) for item in [*normalized, *rejected])
    twice = sorted(at for at, n in positions.items() if n > 1)
    assert not twice, f"{len(twice)} raw records have two outcomes, e.g. {twice[:10]}\n{_what_members_did(logs)}"
    assert set(positions) == set(planned) and len(normalized) + len(rejected) == LOG_COUNT
    assert Counter(item.log_id for item in [*normalized, *rejected]) == Counter(
        raw_log_id(log.value) for log in planned.values()
    )
    # the same decisions a single member makes: every planned outcome
    outcomes = {_where(log.lineage): "normalized" for log in normalized}
    for item in rejected:
        reason = {"rule": f"rule:{item.rule}", "duplicate": "duplicate"}.get(item.code)
        outcomes[_where(item.lineage)] = reason or f"rejected:{item.code}"
    mismatches = Counter((planned[at].expect, got) for at, got in outcomes.items() if planned[at].expect != got)
    assert not mismatches, mismatches

    # hard cases: each once on the topic, each once in the queue
    hard: list[HardCase] = [decode(HARD, r.value) for r in final[HARD]]
    mining, threshold = settings.streams.mining, settings.streams.hard_case_threshold
    expected = sorted(f"case-{log.log_id}" for log in normalized if hard_case(log, mining, threshold=threshold))
    assert sorted(case.case_id for case in hard) == expected
    queued, counters = asyncio.run(queue_contents(settings))
    assert sorted(case.case_id for case in queued) == expected and counters["enqueued"] == len(expected)

    # golden: per case version 1 (answer a) and version 2 (answer b), nothing from the corrections delivered again
    versions: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for record in [GoldenRecord.model_validate_json(r.value) for r in final[Topic.GOLDEN]]:
        versions[record.record_id][record.version].add(record.answer["answer"])
    assert len(golden) >= 2 * CASES and len(versions) == CASES
    assert all({v: a for v, a in by_version.items()} == {1: {"a"}, 2: {"b"}} for by_version in versions.values()), {
        record: dict(by_version) for record, by_version in versions.items() if set(by_version) != {1, 2}
    }


def _wait_for_golden(settings: Settings, want: int, deadline: float) -> list[object]:
    while True:
        found = read_topics(settings, [Topic.GOLDEN], lambda f: len(f[Topic.GOLDEN]) >= want, 10)[Topic.GOLDEN]
        if len(found) >= want or time.monotonic() > deadline:
            return list(found)


def _where(lineage: Lineage | None) -> tuple[int, int]:
    assert lineage is not None and lineage.topic == Topic.LOGS_RAW
    return lineage.partition, lineage.offset


def _logs(paths: list[Path]) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in paths if p.exists())


_NOTABLE = ("WARNING", "ERROR", "raw-log stage holds", "finish writing", "taking the batch", "records written")


def _what_members_did(paths: list[Path]) -> str:
    """The lines of the members' logs that explain a duplicate: rebalances, retries, waits and lookups."""
    lines = [f"{p.name}: {line}" for p in paths if p.exists() for line in p.read_text().splitlines()
             if any(mark in line for mark in _NOTABLE)]  # fmt: skip
    return "\n".join(lines[-200:])
