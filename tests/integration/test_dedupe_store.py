"""`streams.flywheel.dedupe.SeenStore` on the real Redis: duplicates, redeliveries and repeated requests."""

from __future__ import annotations

import json
import uuid

from redis.asyncio import Redis

from schemas.logs import Lineage, NormalizedLog
from schemas.settings import Settings
from schemas.topics import Topic
from streams.flywheel.dedupe import SeenStore, content_hash, lineage_text, request_fingerprint
from streams.flywheel.normalize import normalize


def legacy(req_id: str, answer: str) -> bytes:
    return json.dumps({"req_id": req_id, "ts": 1772366400, "app": "shop", "img": "b/a.png", "q": "what?",
                       "ans": answer}).encode()  # fmt: skip


def at(offset: int) -> Lineage:
    return Lineage(topic=Topic.LOGS_RAW, partition=0, offset=offset)


def keyed(log: NormalizedLog, offset: int) -> tuple[str, str, str]:
    return content_hash(log), request_fingerprint(log), lineage_text(at(offset))


async def test_duplicates_redeliveries_and_tries(stack_settings: Settings) -> None:
    redis = Redis.from_url(stack_settings.redis.url)
    prefix = f"test:{uuid.uuid4().hex[:8]}"
    store = SeenStore(redis, prefix=prefix, dedupe_ttl_s=60, retry_window_s=60)
    try:
        first = normalize(legacy("r-1", '{"a": 1}'))
        resent = normalize(legacy("r-2", '{"a": 1}'))
        retried = normalize(legacy("r-3", '{"a": 2}'))

        [seen] = await store.sight([keyed(first, 0)])
        assert not seen.is_duplicate_of(at(0)) and seen.earlier_tries == 0
        [again] = await store.sight([keyed(first, 0)])
        assert not again.is_duplicate_of(at(0)) and again.earlier_tries == 0, "a redelivery is not a duplicate"
        duplicate, retry = await store.sight([keyed(resent, 1), keyed(retried, 2)])
        assert duplicate.is_duplicate_of(at(1)) and duplicate.first_lineage == f"{Topic.LOGS_RAW}:0:0"
        assert duplicate.earlier_tries == 1
        assert not retry.is_duplicate_of(at(2)) and retry.earlier_tries == 2
        assert [s.earlier_tries for s in await store.sight([keyed(retried, 2), keyed(first, 0)])] == [2, 0]
        assert await store.sight([]) == []

        ttls = [await redis.ttl(key) async for key in redis.scan_iter(f"{prefix}:*")]
        assert len(ttls) == 3 and all(0 < ttl <= 60 for ttl in ttls)
    finally:
        await redis.aclose()
