"""The correction queue on the real Redis, and the review round trip through the real broker:

claim → the lease lapses → claimed again → submitted → exactly one golden record on `vlm.golden`, then a snapshot.
The golden agent runs in a Faust worker of its own (tests/support/golden_app.py) in a child process.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer
from PIL import Image
from redis.asyncio import Redis

from schemas.cases import Correction, HardCase, Signal
from schemas.codec import encode
from schemas.connections import object_store
from schemas.logs import ImageInfo, NormalizedLog
from schemas.settings import Settings
from schemas.tasks import InvalidAnswer
from schemas.topics import Topic
from streams.review.queue import ClaimLost, CorrectionQueue
from streams.review.submit import submit_correction
from tests.support.golden import golden_records, golden_worker, review_env
from tests.support.ops_data import read_topic
from vlmflow.cli import main

pytestmark = pytest.mark.timeout(240)
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


async def test_a_refused_answer_leaves_the_reviewers_lease_as_it_was(queue: CorrectionQueue) -> None:
    """A submission validates before it touches the claim: a slip does not cut a 900 s lease to the publish grace."""
    await queue.enqueue(hard_case("a", 200))
    claim = await queue.claim("alice", lease_s=900)
    published: list[Correction] = []

    async def publish(correction: Correction) -> None:
        published.append(correction)

    with pytest.raises(InvalidAnswer):
        await submit_correction(
            queue, publish, case_id="case-a", token=claim.token, answer={"objects": "none"}, reviewer="alice"
        )
    assert published == []
    assert (await queue.held("case-a", claim.token)).lease_ends == claim.lease_ends

    correction = await submit_correction(
        queue, publish, case_id="case-a", token=claim.token, answer=ANSWER, reviewer="alice"
    )
    assert published == [correction] and (await queue.stats()).submitted == 1


async def test_a_renewal_never_shortens_a_lease(queue: CorrectionQueue) -> None:
    await queue.enqueue(hard_case("a", 200))
    claim = await queue.claim("alice", lease_s=900)
    assert (await queue.renew("case-a", claim.token, lease_s=60)).lease_ends == claim.lease_ends
    longer = await queue.renew("case-a", claim.token, lease_s=1_800)
    assert longer.lease_ends > claim.lease_ends


async def test_enqueue_many_queues_each_case_once(queue: CorrectionQueue) -> None:
    cases = [hard_case(f"m{index}", 100 + index) for index in range(50)]
    assert await queue.enqueue_many(cases) == 50
    top = await queue.claim("alice", lease_s=30)
    await queue.complete(top.case.case_id, top.token)
    assert await queue.claim("bob", lease_s=30) is not None
    assert await queue.enqueue_many([*cases, hard_case("new", 1)]) == 1, "queued, claimed and submitted stay so"
    assert await queue.enqueue_many([]) == 0
    stats = await queue.stats()
    assert (stats.pending, stats.leased, stats.submitted) == (49, 1, 1)
    assert stats.counters["enqueued"] == 51


async def test_stats_tell_how_long_the_oldest_pending_case_has_waited(queue: CorrectionQueue) -> None:
    assert (await queue.stats()).oldest_pending_age_s is None
    await queue.enqueue(hard_case("first", 100))
    await asyncio.sleep(0.3)
    await queue.enqueue(hard_case("second", 500))
    await queue.enqueue(hard_case("first", 100))  # an update does not make it younger
    age = (await queue.stats()).oldest_pending_age_s
    assert age is not None and age >= 0.3
    second = await queue.claim("alice", lease_s=30)
    first = await queue.claim("bob", lease_s=30)
    assert (second.case.case_id, first.case.case_id) == ("case-second", "case-first")
    assert (await queue.stats()).oldest_pending_age_s is None, "claimed cases are not pending"
    await queue.skip("case-first", first.token)
    age = (await queue.stats()).oldest_pending_age_s
    assert age is not None and age >= 0.3, "a skipped case keeps the time it was first queued"


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
        assert main(["review", "next", "--reviewer", "bob", "--lease-s", "900"]) == 0
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
        deadline = time.monotonic() + 120  # NOTE: generous for a loaded machine; the timer fires every 3 s
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
