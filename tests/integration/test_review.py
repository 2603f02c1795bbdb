"""The correction queue on the real Redis, and the review round trip through the real broker:

claim → the lease lapses → claimed again → submitted → exactly one golden record on `vlm.golden`, then a snapshot.
The golden agent runs in a Faust worker of its own (tests/support/golden_app.py) in a child process.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer
from PIL import Image
from redis.asyncio import Redis

from schemas.cases import Correction, GoldenRecord, HardCase, Signal
from schemas.codec import encode
from schemas.connections import object_store
from schemas.logs import ImageInfo, NormalizedLog
from schemas.settings import Settings
from schemas.topics import Topic
from streams.review.queue import ClaimLost, CorrectionQueue
from tests.support.flywheel_worker import worker_env
from tests.support.ops_data import read_topic
from tests.support.processes import stop_process
from vlmflow.cli import main

pytestmark = pytest.mark.timeout(240)
GOLDEN_APP = Path(__file__).parents[1] / "support" / "golden_app.py"
ANSWER = {"objects": [{"label": "cat", "bbox_xyxy": [10.0, 20.0, 110.0, 220.0]}]}


def hard_case(name: str, priority: int, task: str = "detect") -> HardCase:
    log = NormalizedLog(
        log_id=f"log-{name}",
        source_format="openai-chat",
        request_id=f"req-{name}",
        timestamp=datetime(2024, 5, 1, tzinfo=UTC),
        task=task,
        prompt="Find every cat.",
        images=[ImageInfo(uri=f"s3://vlm-images/{name}.png", width=640, height=480)],
        output_text='{"objects": []}',
        output={"objects": []},
        feedback="negative",
    )
    signals = [Signal(name="negative_feedback", weight=priority / 100)]
    return HardCase(
        case_id=f"case-{name}", log_id=log.log_id, score=priority / 100, priority=priority, signals=signals, log=log
    )


@pytest.fixture
async def queue(stack_settings: Settings) -> AsyncIterator[CorrectionQueue]:
    redis = Redis.from_url(stack_settings.redis.url)
    try:
        yield CorrectionQueue(redis, f"test-{uuid.uuid4().hex[:8]}")
    finally:
        await redis.aclose()


async def test_highest_priority_first_and_a_lapsed_lease_returns(queue: CorrectionQueue) -> None:
    for name, priority in (("low", 120), ("high", 450), ("mid", 300)):
        assert await queue.enqueue(hard_case(name, priority))
    first = await queue.claim("alice", lease_s=0.3)
    second = await queue.claim("bob", lease_s=30)
    assert (first.case.case_id, second.case.case_id) == ("case-high", "case-mid")
    assert (await queue.stats()).leased == 2

    await asyncio.sleep(0.5)
    again = await queue.claim("carol", lease_s=30)
    assert again is not None and again.case.case_id == "case-high"
    with pytest.raises(ClaimLost, match="another reviewer"):
        await queue.complete("case-high", first.token)
    await queue.complete("case-high", again.token)
    with pytest.raises(ClaimLost, match="already submitted"):
        await queue.complete("case-high", again.token)

    stats = await queue.stats()
    assert (stats.pending, stats.leased, stats.submitted, stats.top_priority) == (1, 1, 1, 120)
    assert stats.counters == {"enqueued": 3, "claimed": 3, "lapsed": 1, "submitted": 1}
    assert not await queue.enqueue(hard_case("high", 999)), "a submitted case is never queued again"


async def test_skip_gives_the_case_to_others_and_suggestions_travel_with_it(queue: CorrectionQueue) -> None:
    await queue.enqueue(hard_case("a", 200))
    await queue.enqueue(hard_case("b", 100))
    assert await queue.suggest("case-a", ANSWER)
    claim = await queue.claim("alice", lease_s=30)
    assert claim.case.case_id == "case-a" and claim.suggestion == ANSWER
    await queue.skip("case-a", claim.token)
    assert (await queue.claim("alice", lease_s=30)).case.case_id == "case-b", "alice skipped case-a"
    assert await queue.claim("alice", lease_s=30) is None
    bobs = await queue.claim("bob", lease_s=30)
    assert bobs.case.case_id == "case-a" and bobs.suggestion == ANSWER
    renewed = await queue.renew("case-a", bobs.token, lease_s=120)
    assert renewed.lease_ends > bobs.lease_ends and renewed.reviewer == "bob"
    assert [case.case_id for case, _ in await queue.peek(10)] == []
    assert (await queue.stats()).counters["skipped"] == 1


def review_env(settings: Settings, queue_name: str) -> dict[str, str]:
    """`flywheel_worker.worker_env` with a Faust app and review queue of this test's own, and quick snapshots."""
    streams = settings.streams.model_copy(update={"app_id": f"golden-{queue_name}", "review_queue": queue_name})
    return {
        **worker_env(settings.model_copy(update={"streams": streams})),
        "VLMFLOW_STREAMS__GOLDEN_SNAPSHOT_INTERVAL_S": "3",
    }


@contextmanager
def golden_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(GOLDEN_APP)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop_process(process)


def golden_records(
    settings: Settings, want: int, worker: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 90
) -> list[GoldenRecord]:
    """The records on vlm.golden once there are `want` of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [GoldenRecord.model_validate_json(r.value) for r in read_topic(settings, Topic.GOLDEN)]
        if len(records) >= want:
            return records
        problem = "the golden worker died" if worker.poll() is not None else None
        if problem is None and time.monotonic() > deadline:
            problem = f"{len(records)} golden records, want {want}"
        assert problem is None, f"{problem}:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)


def snapshots_holding(settings: Settings, record_id: str) -> list[list[dict]]:
    store = object_store(settings)
    found = []
    for item in store.list_objects(settings.s3.dataset_bucket, prefix="golden/snapshots/", recursive=True):
        response = store.get_object(settings.s3.dataset_bucket, item.object_name)
        lines = [json.loads(line) for line in response.read().splitlines()]
        response.close()
        response.release_conn()
        if any(line["record_id"] == record_id for line in lines):
            found.append(lines)
    return found


def test_review_round_trip(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    queue_name = f"rt-{uuid.uuid4().hex[:8]}"
    env = review_env(settings, queue_name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    case = hard_case(f"round-{queue_name}", 500)

    async def enqueue() -> None:
        redis = Redis.from_url(settings.redis.url)
        await CorrectionQueue(redis, queue_name).enqueue(case)
        await redis.aclose()

    asyncio.run(enqueue())
    answer_file = tmp_path / "answer.json"
    answer_file.write_text(json.dumps(ANSWER))
    log_path = tmp_path / "golden-worker.log"
    with golden_worker(env, log_path) as worker:
        # Claim, let the lease lapse, claim again.
        assert main(["review", "next", "--reviewer", "alice", "--lease-s", "0.5"]) == 0
        assert case.case_id in capsys.readouterr().out
        time.sleep(1.0)
        assert main(["review", "next", "--reviewer", "bob", "--lease-s", "60"]) == 0
        shown = capsys.readouterr().out
        assert case.case_id in shown and "s3://vlm-images/" in shown and "negative_feedback" in shown

        # The lapsed claim cannot submit; a bad answer is refused in one line; the live claim submits.
        assert main(["review", "submit", str(answer_file), "--reviewer", "alice"]) == 2
        assert "another reviewer claimed it" in capsys.readouterr().err
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"objects": [{"label": "cat", "bbox_xyxy": [1, 2, 3]}]}))
        assert main(["review", "submit", str(bad), "--reviewer", "bob"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "bbox_xyxy" in error and "too short" in error
        assert main(["review", "submit", str(answer_file), "--reviewer", "bob"]) == 0

        (record,) = golden_records(settings, 1, worker, log_path)
        assert (record.record_id, record.version, record.task, record.answer) == (case.case_id, 1, "detect", ANSWER)
        assert record.images == case.log.images and record.prompt == case.log.prompt

        # The same correction delivered again adds nothing; a changed answer becomes version 2 (same key, same
        # partition, so once it is there the duplicate before it has been handled).
        (delivered,) = [Correction.model_validate_json(r.value) for r in read_topic(settings, Topic.CORRECTIONS_DONE)]
        assert delivered.reviewer == "bob" and delivered.case == case
        changed = delivered.model_copy(update={"output": {"objects": []}})
        producer = KafkaProducer(**settings.kafka.client_options())
        for correction in (delivered, changed):
            producer.send(Topic.CORRECTIONS_DONE, key=case.case_id.encode(), value=encode(correction))
        producer.flush()
        producer.close()
        records = golden_records(settings, 2, worker, log_path)
        assert [(r.record_id, r.version) for r in records] == [(case.case_id, 1), (case.case_id, 2)]

        # Snapshots: one on demand, and the leader's timer (every 3 s); each holds one version of the record.
        assert main(["golden", "snapshot"]) == 0
        assert "golden snapshot: 1 records" in capsys.readouterr().out
        deadline = time.monotonic() + 30
        while True:
            versions = [
                [line["version"] for line in lines if line["record_id"] == case.case_id]
                for lines in snapshots_holding(settings, case.case_id)
            ]
            assert all(len(held) == 1 for held in versions), versions
            if versions.count([2]) >= 2:
                break
            assert time.monotonic() < deadline, f"no timer snapshot:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)

    assert main(["review", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["pending"], stats["leased"], stats["submitted"]) == (0, 0, 1)
    assert stats["counters"]["lapsed"] == 1


def test_suggest_pre_fills_and_a_person_confirms(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`review suggest` through the worker's engine protocol (the instant engine: no model needed), then
    `submit --accept-suggestion` publishes it as the model's correction, confirmed by a person."""
    queue_name = f"sg-{uuid.uuid4().hex[:8]}"
    for name, value in {**review_env(settings, queue_name), "VLMFLOW_ENGINE__KIND": "instant"}.items():
        monkeypatch.setenv(name, value)
    case = hard_case(f"suggest-{queue_name}", 300)
    image = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(image, format="PNG")
    object_store(settings).put_object(
        "vlm-images", f"{case.log.images[0].uri.split('/', 3)[3]}", io.BytesIO(image.getvalue()), len(image.getvalue())
    )

    async def enqueue() -> None:
        redis = Redis.from_url(settings.redis.url)
        await CorrectionQueue(redis, queue_name).enqueue(case)
        await redis.aclose()

    asyncio.run(enqueue())
    assert main(["review", "suggest", "--limit", "5"]) == 0
    assert "suggested 1 of 1" in capsys.readouterr().out
    assert main(["review", "next", "--reviewer", "dana", "--json"]) == 0
    claim = json.loads(capsys.readouterr().out)
    assert claim["suggestion"] == {"objects": []}
    assert main(["review", "submit", "--accept-suggestion", "--reviewer", "dana"]) == 0
    (correction,) = [Correction.model_validate_json(r.value) for r in read_topic(settings, Topic.CORRECTIONS_DONE)]
    assert (correction.source, correction.reviewer, correction.output) == ("model", "dana", {"objects": []})
