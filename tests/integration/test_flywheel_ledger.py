"""The raw-log stage's ledger on the real broker and Redis: a member that died in the middle of writing a batch
left part of its outputs on the broker; the next member writes exactly the rest (`streams.flywheel.ledger`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from aiokafka.structs import TopicPartition
from kafka import KafkaProducer
from redis.asyncio import Redis

from schemas.codec import key_of
from schemas.logs import Lineage, NormalizedLog
from schemas.settings import Settings
from schemas.topics import Topic
from streams.flywheel.ledger import Ledger, LedgerEntry, output_partition_text
from streams.flywheel.outputs import SOURCE_HEADER, Source, partition_for
from streams.flywheel.screen import ScreenConfig, encode_outcome, screen
from tests.support.flywheel_data import PlannedLog
from tests.support.flywheel_worker import produce, read_topics, streams_worker

LOGS = 12
WRITTEN_BEFORE = 5
DEAD_MEMBER = b"dead-member"

pytestmark = pytest.mark.timeout(300)


def raw_log(index: int) -> bytes:
    return json.dumps({"req_id": f"ledger-{index}", "ts": 1772366400 + index, "app": "shop",
                       "img": f"vlm-images/ledger/{index}.png", "q": f"what is in picture {index}?",
                       "ans": json.dumps({"caption": f"thing {index}"})}).encode()  # fmt: skip


def test_an_unfinished_batch_is_completed_without_writing_twice(settings: Settings, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    streams = settings.streams.model_copy(update={"app_id": f"ledger-{unique}", "review_queue": f"ledger-{unique}"})
    settings = settings.model_copy(update={"streams": streams})
    placed = produce(settings, [PlannedLog(b"one-key", raw_log(i), "normalized") for i in range(LOGS)])
    (partition,) = {at[0] for at in placed}
    offsets = sorted(offset for _, offset in placed)
    outputs_of_dead_member = offsets[:WRITTEN_BEFORE]

    # The dead member: its ledger entry says it began the batch, and the first outputs reached the broker.
    config = ScreenConfig.from_settings(settings.streams)
    producer = KafkaProducer(**settings.kafka.client_options(), acks="all")
    for offset in outputs_of_dead_member:
        outcome = screen(raw_log(offset), lineage=Lineage(topic=Topic.LOGS_RAW, partition=partition, offset=offset),
                         config=config)  # fmt: skip
        assert isinstance(outcome, NormalizedLog)
        _, value = encode_outcome(outcome, raw_log(offset), config)
        key = key_of(Topic.LOGS_NORMALIZED, outcome)
        headers = [(SOURCE_HEADER, Source(Topic.LOGS_RAW, partition, offset).header()), ("x-test", DEAD_MEMBER)]
        producer.send(Topic.LOGS_NORMALIZED, key=key, value=value, headers=headers,
                      partition=partition_for(key, 6))  # fmt: skip
    producer.flush()
    producer.close()
    starts = {output_partition_text(TopicPartition(t, p)): 0 for t, n in ((Topic.LOGS_NORMALIZED, 6),
              (Topic.LOGS_REJECTED, 3), (Topic.CASES_HARD, 3)) for p in range(n)}  # fmt: skip
    asyncio.run(_begin(settings, partition, (offsets[0], offsets[-1]), starts))

    log_path = tmp_path / "streams.log"
    with streams_worker(settings, log_path) as worker:
        found = read_topics(
            settings,
            [Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED],
            lambda f: worker.poll() is not None or sum(map(len, f.values())) >= LOGS,
            120,
        )
        assert worker.poll() is None, log_path.read_text()[-3000:]
    final = read_topics(settings, [Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED], lambda _: False, 3)
    records = final[Topic.LOGS_NORMALIZED] + final[Topic.LOGS_REJECTED]
    assert len(found[Topic.LOGS_REJECTED]) == 0 and len(records) == LOGS, log_path.read_text()[-3000:]
    by_offset = {NormalizedLog.model_validate_json(r.value).lineage.offset: dict(r.headers) for r in records}  # type: ignore[union-attr]
    assert sorted(by_offset) == offsets
    assert sorted(o for o, h in by_offset.items() if h.get("x-test") == DEAD_MEMBER) == outputs_of_dead_member
    assert f"had {WRITTEN_BEFORE} records written" in log_path.read_text()


async def _begin(settings: Settings, partition: int, span: tuple[int, int], starts: dict[str, int]) -> None:
    redis = Redis.from_url(settings.redis.url)
    try:
        ledger = Ledger(redis, app_id=settings.streams.app_id, owner="dead-member")
        tp = TopicPartition(Topic.LOGS_RAW, partition)
        assert await ledger.write({tp: (LedgerEntry(), ledger.begun(LedgerEntry(), span, starts))}) == {tp}
    finally:
        await redis.aclose()
