"""The raw-log stage's ledger on the real broker and Redis (`streams.flywheel.ledger`): a member that died in the
middle of writing a batch left part of its outputs on the broker, and the next member writes exactly the rest; a
member still writing its batch (it holds the writer lease) is waited for, and nothing is written twice."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.structs import TopicPartition
from kafka import KafkaProducer
from redis.asyncio import Redis

from schemas.cases import HardCase
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
STILL_WRITING = b"member-still-writing"

pytestmark = pytest.mark.timeout(300)


def raw_log(index: int) -> bytes:
    return json.dumps({"req_id": f"ledger-{index}", "ts": 1772366400 + index, "app": "shop",
                       "img": f"vlm-images/ledger/{index}.png", "q": f"what is in picture {index}?",
                       "ans": json.dumps({"caption": f"thing {index}"})}).encode()  # fmt: skip


def hard_raw_log(index: int) -> bytes:
    """A raw log whose normalized log is a hard case (its answer is not JSON)."""
    return json.dumps({**json.loads(raw_log(index)), "ans": f"no JSON here {index}"}).encode()


def test_an_unfinished_batch_is_completed_without_writing_twice(settings: Settings, tmp_path: Path) -> None:
    settings = _own_group(settings)
    partition, offsets = _raw_logs(settings)
    outputs_of_dead_member = offsets[:WRITTEN_BEFORE]

    # The dead member: its ledger entry says it began the batch, and the first outputs reached the broker.
    _write_outputs(settings, partition, outputs_of_dead_member, DEAD_MEMBER)
    asyncio.run(_begin(settings, DEAD_MEMBER, partition, offsets, writer_ttl_s=0.0))

    log_path = tmp_path / "streams.log"
    records = _run_worker(settings, log_path)
    assert sorted(records) == offsets
    assert sorted(o for o, h in records.items() if h.get("x-test") == DEAD_MEMBER) == outputs_of_dead_member
    assert f"had {WRITTEN_BEFORE} records written" in log_path.read_text()


def test_an_outcome_written_without_its_hard_case_gets_only_the_hard_case(settings: Settings, tmp_path: Path) -> None:
    """A member killed mid-batch may have written a record's normalized log and not its hard case (they go to
    different topics): the next member writes the hard case, and not the normalized log again."""
    settings = _own_group(settings)
    partition, offsets = _raw_logs(settings, hard_raw_log)
    _write_outputs(settings, partition, offsets, DEAD_MEMBER, hard_raw_log)
    asyncio.run(_begin(settings, DEAD_MEMBER, partition, offsets, writer_ttl_s=0.0))

    log_path = tmp_path / "streams.log"
    with streams_worker(settings, log_path) as worker:
        read_topics(
            settings, [Topic.CASES_HARD], lambda f: worker.poll() is not None or len(f[Topic.CASES_HARD]) >= LOGS, 60
        )
        records = _read_outcomes(settings, worker, log_path)
    assert sorted(records) == offsets and all(h.get("x-test") == DEAD_MEMBER for h in records.values())
    time.sleep(3)  # a hard case written twice would arrive now
    cases = read_topics(settings, [Topic.CASES_HARD], lambda _: False, 3)[Topic.CASES_HARD]
    lineages = sorted(HardCase.model_validate_json(r.value).log.lineage.offset for r in cases)  # type: ignore[union-attr]
    assert lineages == offsets, "each record's hard case once"
    assert f"had {LOGS} records written" in log_path.read_text()


def test_a_member_still_writing_its_batch_is_waited_for(settings: Settings, tmp_path: Path) -> None:
    """The group gave the partition to a new member while its old owner still wrote its batch (a member dropped
    by the coordinator while it finished its work): a scan made now would miss the outputs still on their way,
    so the new member waits until the old one has finished (or its writer lease lapsed), then writes nothing."""
    settings = _own_group(settings)
    partition, offsets = _raw_logs(settings)
    _write_outputs(settings, partition, offsets[:WRITTEN_BEFORE], STILL_WRITING)
    begun = asyncio.run(_begin(settings, STILL_WRITING, partition, offsets, writer_ttl_s=120.0))

    log_path = tmp_path / "streams.log"
    with streams_worker(settings, log_path) as worker:
        deadline = time.monotonic() + 120
        while b"to finish writing" not in (log_path.read_bytes() if log_path.exists() else b""):
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        # The old owner goes on: the rest of its outputs, then its finish gives the lease back.
        _write_outputs(settings, partition, offsets[WRITTEN_BEFORE:], STILL_WRITING)
        asyncio.run(_finish(settings, STILL_WRITING, partition, begun))
        records = _read_outcomes(settings, worker, log_path)
    assert sorted(records) == offsets, "every raw record has exactly one outcome"
    assert all(h.get("x-test") == STILL_WRITING for h in records.values()), "the new member wrote nothing"
    assert "records written" not in log_path.read_text(), "nothing was looked up while the old owner wrote"


def _own_group(settings: Settings) -> Settings:
    unique = uuid.uuid4().hex[:8]
    streams = settings.streams.model_copy(update={"app_id": f"ledger-{unique}", "review_queue": f"ledger-{unique}"})
    return settings.model_copy(update={"streams": streams})


def _raw_logs(settings: Settings, make: Callable[[int], bytes] = raw_log) -> tuple[int, list[int]]:
    """`LOGS` raw logs on one partition: the partition and their offsets."""
    placed = produce(settings, [PlannedLog(b"one-key", make(i), "normalized") for i in range(LOGS)])
    (partition,) = {at[0] for at in placed}
    return partition, sorted(offset for _, offset in placed)


def _write_outputs(
    settings: Settings, partition: int, offsets: list[int], member: bytes, make: Callable[[int], bytes] = raw_log
) -> None:
    """The normalized logs a member of the stage writes for these raw records (not their hard cases), tagged with
    the member's name."""
    config = ScreenConfig.from_settings(settings.streams)
    producer = KafkaProducer(**settings.kafka.client_options(), acks="all")
    for offset in offsets:
        outcome = screen(make(offset), lineage=Lineage(topic=Topic.LOGS_RAW, partition=partition, offset=offset),
                         config=config)  # fmt: skip
        assert isinstance(outcome, NormalizedLog)
        _, value = encode_outcome(outcome, make(offset), config)
        key = key_of(Topic.LOGS_NORMALIZED, outcome)
        headers = [(SOURCE_HEADER, Source(Topic.LOGS_RAW, partition, offset).header()), ("x-test", member)]
        producer.send(Topic.LOGS_NORMALIZED, key=key, value=value, headers=headers,
                      partition=partition_for(key, 6))  # fmt: skip
    producer.flush()
    producer.close()


def _run_worker(settings: Settings, log_path: Path) -> dict[int, dict[str, bytes]]:
    with streams_worker(settings, log_path) as worker:
        return _read_outcomes(settings, worker, log_path)


def _read_outcomes(settings: Settings, worker: subprocess.Popen[bytes], log_path: Path) -> dict[int, dict[str, bytes]]:
    """Once `LOGS` outcomes are on the topics (a few seconds more for any written twice): each raw offset's headers,
    after checking that there are exactly `LOGS` outcomes, all normalized."""
    read_topics(
        settings,
        [Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED],
        lambda f: worker.poll() is not None or sum(map(len, f.values())) >= LOGS,
        120,
    )
    assert worker.poll() is None, log_path.read_text()[-3000:]
    final = read_topics(settings, [Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED], lambda _: False, 3)
    records = final[Topic.LOGS_NORMALIZED] + final[Topic.LOGS_REJECTED]
    assert len(final[Topic.LOGS_REJECTED]) == 0 and len(records) == LOGS, log_path.read_text()[-3000:]
    return {NormalizedLog.model_validate_json(r.value).lineage.offset: dict(r.headers) for r in records}  # type: ignore[union-attr]


STARTS = {output_partition_text(TopicPartition(t, p)): 0 for t, n in ((Topic.LOGS_NORMALIZED, 6),
          (Topic.LOGS_REJECTED, 3), (Topic.CASES_HARD, 3)) for p in range(n)}  # fmt: skip


async def _begin(
    settings: Settings, member: bytes, partition: int, offsets: list[int], *, writer_ttl_s: float
) -> LedgerEntry:
    """What a member's step 4 writes for the batch `offsets` (with its writer lease when `writer_ttl_s`)."""
    redis = Redis.from_url(settings.redis.url)
    try:
        ledger = Ledger(redis, app_id=settings.streams.app_id, owner=member.decode())
        tp = TopicPartition(Topic.LOGS_RAW, partition)
        begun = ledger.begun(LedgerEntry(), (offsets[0], offsets[-1]), STARTS)
        assert await ledger.write({tp: (LedgerEntry(), begun)}, writer_ttl_s=writer_ttl_s) == {tp}
        return begun
    finally:
        await redis.aclose()


async def _finish(settings: Settings, member: bytes, partition: int, begun: LedgerEntry) -> None:
    """What a member's step 6 writes (giving its writer lease back)."""
    redis = Redis.from_url(settings.redis.url)
    try:
        ledger = Ledger(redis, app_id=settings.streams.app_id, owner=member.decode())
        tp = TopicPartition(Topic.LOGS_RAW, partition)
        assert await ledger.write({tp: (begun, ledger.finished(begun))}) == {tp}
        assert await redis.exists(ledger.writer_key(tp)) == 0
    finally:
        await redis.aclose()
