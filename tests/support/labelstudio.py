"""Label Studio for the tests: started once from its own environment (scripts/labelstudio-env.sh), per-test
settings with projects, a queue and a webhook port of their own, cases with real images in S3, the bridge as a
child process, and annotations made through Label Studio's API."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from redis.asyncio import Redis

from schemas.cases import HardCase, Signal
from schemas.connections import object_store
from schemas.logs import ImageInfo, NormalizedLog
from schemas.settings import Settings
from streams.review.labelstudio import labelstudio_client
from streams.review.labelstudio_client import case_id_query
from streams.review.labelstudio_config import project_title
from streams.review.queue import CorrectionQueue
from tests.support.flywheel_worker import worker_env
from tests.support.processes import child_process
from vlmflow.stack import LocalStack

IMAGE_SIZE = (640, 480)


def start_labelstudio(state_dir: Path, base: Settings, port: int) -> tuple[LocalStack, Settings]:
    """Label Studio as the local stack's fourth child, on `port`, reading images from `base`'s S3 store."""
    settings = base.model_copy(
        update={
            "state_dir": state_dir,
            "labelstudio": base.labelstudio.model_copy(update={"url": f"http://127.0.0.1:{port}"}),
        }
    )
    stack = LocalStack(settings, only=(), extras=("labelstudio",))
    stack.up()
    return stack, settings


def isolated_settings(base: Settings, labelstudio_url: str, webhook_port: int) -> Settings:
    """`base` (the test's broker, the session's Redis and S3) with projects, a queue and an app id of its own."""
    unique = uuid.uuid4().hex[:8]
    return base.model_copy(
        update={
            "labelstudio": base.labelstudio.model_copy(
                update={
                    "url": labelstudio_url,
                    "project_prefix": f"test-{unique}",
                    "webhook_listen": f"127.0.0.1:{webhook_port}",
                    "labels": ["cat", "dog", "person"],
                }
            ),
            "streams": base.streams.model_copy(update={"review_queue": f"ls-{unique}", "app_id": f"golden-{unique}"}),
        }
    )


def put_image(settings: Settings, key: str) -> str:
    """A 640×480 PNG with two coloured rectangles where the model's boxes are, stored in the image bucket."""
    image = Image.new("RGB", IMAGE_SIZE, (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.rectangle((100, 80, 260, 240), fill=(220, 120, 40))
    draw.rectangle((380, 200, 560, 400), fill=(60, 110, 200))
    data = io.BytesIO()
    image.save(data, "PNG")
    bucket = settings.s3.image_buckets[0]
    object_store(settings).put_object(bucket, key, io.BytesIO(data.getvalue()), len(data.getvalue()))
    return f"s3://{bucket}/{key}"


def hard_case(
    name: str, uri: str, *, task: str = "detect", output: Any = None, priority: int = 500, sized: bool = True
) -> HardCase:
    width, height = IMAGE_SIZE
    log = NormalizedLog(
        log_id=f"log-{name}",
        source_format="openai-chat",
        request_id=f"req-{name}",
        timestamp=datetime(2026, 3, 1, tzinfo=UTC),
        task=task,
        prompt="Find every cat and dog.",
        images=[ImageInfo(uri=uri, width=width if sized else None, height=height if sized else None)],
        output=output,
        output_text="model text",
        feedback="negative",
    )
    signals = [Signal(name="negative_feedback", weight=1.0, detail="thumbs down")]
    return HardCase(case_id=f"case-{name}", log_id=log.log_id, score=1.0, priority=priority, signals=signals, log=log)


DETECTED = {
    "objects": [
        {"label": "cat", "bbox_xyxy": [100.0, 80.0, 260.0, 240.0]},
        {"label": "truck", "bbox_xyxy": [380.0, 200.0, 560.0, 400.0]},
    ]
}
"""The model's answer to the image of `put_image`: a cat and an unlisted label (imported as `other`)."""


def enqueue(settings: Settings, *cases: HardCase) -> None:
    async def run() -> None:
        redis = Redis.from_url(settings.redis.url)
        try:
            queue = CorrectionQueue(redis, settings.streams.review_queue)
            for case in cases:
                assert await queue.enqueue(case)
        finally:
            await redis.aclose()

    asyncio.run(run())


def queue_stats(settings: Settings) -> Any:
    async def run() -> Any:
        redis = Redis.from_url(settings.redis.url)
        try:
            return await CorrectionQueue(redis, settings.streams.review_queue).stats()
        finally:
            await redis.aclose()

    return asyncio.run(run())


def ls_call(settings: Settings, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
    async def run() -> Any:
        async with labelstudio_client(settings) as client:
            return await client.request(method, path, body, params=params)

    return asyncio.run(run())


def task_of(settings: Settings, task: str, case_id: str) -> dict[str, Any]:
    """The Label Studio task of `case_id` in `task`'s project, with predictions and annotations."""

    async def run() -> dict[str, Any]:
        async with labelstudio_client(settings) as client:
            title = project_title(settings.labelstudio.project_prefix, task)
            (project,) = [p for p in await client.projects() if p["title"] == title]
            (found,) = await client.tasks(int(project["id"]), case_id_query(case_id))
            return found

    return asyncio.run(run())


def annotate(settings: Settings, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
    """A submitted annotation, made through the API as Label Studio's editor makes it."""
    answer: dict[str, Any] = ls_call(settings, "POST", f"/api/tasks/{task_id}/annotations/", {"result": result})
    return answer


def verdict(value: str) -> dict[str, Any]:
    return {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [value]}}


def bridge_env(settings: Settings) -> dict[str, str]:
    ls = settings.labelstudio
    return {
        **worker_env(settings),
        "VLMFLOW_LABELSTUDIO__URL": ls.url,
        "VLMFLOW_LABELSTUDIO__PROJECT_PREFIX": ls.project_prefix,
        "VLMFLOW_LABELSTUDIO__WEBHOOK_LISTEN": ls.webhook_listen,
        "VLMFLOW_LABELSTUDIO__LABELS": '["cat", "dog", "person"]',
        "VLMFLOW_LABELSTUDIO__POLL_INTERVAL_S": str(ls.poll_interval_s),
    }


@contextmanager
def bridge_process(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`vlmflow review ls run` as a child process; the caller stops or kills it."""
    args = [sys.executable, "-m", "vlmflow.cli", "review", "ls", "run"]
    with child_process(args, {**os.environ, **bridge_env(settings)}, log_path, stop_timeout_s=None) as process:
        yield process
