"""The Label Studio bridge: the correction queue's cases out to Label Studio, reviewers' annotations back as
corrections on `vlm.corrections.done`.

The queue in Redis stays the one source of truth for who holds a case: the bridge claims cases under its own
reviewer name, renews each claim while its task is open in Label Studio, and completes it once the annotation's
correction is published. One project per task type (`labelstudio_config`); conversions are pure
(`labelstudio_tasks`); this module is the I/O around them.

One pass (`Bridge.sync_once`), in this order:
  1. back   every task updated since the project's cursor (with an overlap), each annotation version
            (`<annotation id>@<updated_at>`) not seen before: refused → the problem is written on the task and the
            case stays open; valid → published, then the case is completed in the queue
  2. renew  every open case's claim; a claim lost (lapsed while the bridge was away) with no annotation yet
            takes its task out of Label Studio, and the case comes back through the queue
  3. out    claim cases up to `max_open_tasks` and import each as a task with the model's answer as a prediction

A webhook (authenticated by a shared secret header) only wakes the loop early; the poll alone suffices, since
Label Studio sends each webhook once, inside the reviewer's request, with a 1 s timeout and no retry.

Restarts lose and duplicate nothing:
  - a case is recorded (`claimed`) before its task is imported; on start, a `claimed` case whose task exists is
    adopted, otherwise imported;
  - before a correction is sent, a marker records its bytes, partition and a floor offset (the end of the
    bridge's last acknowledged send to that partition); on start, a marker is resolved by reading that partition
    from the floor: the record found means it was published (the case is completed now), none means it was not
    (the annotation is published again by the next pass);
  - a version is marked done only after publishing and completing, and the cursor only moves after a pass.
One bridge per queue runs at a time: it holds a lease in Redis while it runs (`bridge_lease`).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from schemas.cases import Correction, HardCase
from schemas.codec import encode, key_of
from schemas.connections import cancel_and_wait
from schemas.jobs import TASKS, Task
from schemas.settings import Settings
from schemas.topics import Topic
from streams.review.labelstudio_client import LabelStudioClient, LabelStudioError, case_id_query, updated_after_query
from streams.review.labelstudio_config import IMAGE, labeling_config, project_labels, project_title
from streams.review.labelstudio_tasks import (
    EXTRACT_SCHEMA,
    ImageSize,
    InvalidAnnotation,
    UnsupportedCase,
    annotation_answer,
    case_image_size,
    case_task,
    problem_text,
    task_payload,
)
from streams.review.queue import ClaimLost, CorrectionQueue
from streams.review.submit import submit_correction

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhook"
SECRET_HEADER = "X-Vlmflow-Webhook-Secret"
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
MAX_WEBHOOK_BYTES = 1024 * 1024
"""A webhook body is read and dropped (it only wakes the loop); larger ones are refused."""
CURSOR_OVERLAP = timedelta(seconds=5)
"""Tasks are polled from this long before the newest update seen: a save committed late is still found."""
LEASE_TTL_S = 30.0
"""The bridge's own lease (one bridge per queue); renewed every third of it."""
PUBLISH_READBACK_TIMEOUT_S = 30.0

CaseState = Literal["claimed", "open", "closed"]
"""`claimed`: the queue holds it for the bridge, Label Studio may not have its task yet; `open`: its task is in
Label Studio and the claim is renewed; `closed`: its correction is published, or the claim was lost after a
reviewer annotated it (later annotations are still published, as new versions of the golden record)."""


class BridgeRecord(BaseModel):
    """What the bridge remembers of one case, in Redis."""

    model_config = ConfigDict(extra="forbid")

    case: HardCase
    task: Task
    token: str
    state: CaseState
    project_id: int
    task_id: int | None = None
    size: tuple[int, int] | None = None
    """The image's (width, height) the task's boxes were placed with."""


class PendingPublish(BaseModel):
    model_config = ConfigDict(extra="forbid")

    case_id: str
    value: str
    partition: int
    floor: int
    """The partition's end after the bridge's previous acknowledged send there: the record, if sent, is above."""


class BridgeStore:
    """The bridge's state in Redis; every key carries the hash tag `{labelstudio:<queue>}`."""

    def __init__(self, redis: Redis, queue_name: str):
        self.redis = redis
        prefix = f"vlmflow:{{labelstudio:{queue_name}}}"
        self.cases_key = f"{prefix}:cases"
        """case_id → `BridgeRecord` JSON"""
        self.versions_key = f"{prefix}:versions"
        """annotation version → `published`, `refused`, `cancelled`"""
        self.pending_key = f"{prefix}:pending"
        """annotation version → `PendingPublish` JSON, while a send is unconfirmed"""
        self.floors_key = f"{prefix}:floors"
        """partition → the end of the bridge's last acknowledged send there"""
        self.cursors_key = f"{prefix}:cursors"
        """project id → ISO time of the newest task update handled"""

    async def records(self) -> dict[str, BridgeRecord]:
        raw = await self.redis.hgetall(self.cases_key)
        return {_text(key): BridgeRecord.model_validate_json(value) for key, value in raw.items()}

    async def record(self, case_id: str) -> BridgeRecord | None:
        raw = await self.redis.hget(self.cases_key, case_id)
        return BridgeRecord.model_validate_json(raw) if raw else None

    async def put(self, record: BridgeRecord) -> None:
        await self.redis.hset(self.cases_key, record.case.case_id, record.model_dump_json())

    async def drop(self, case_id: str) -> None:
        await self.redis.hdel(self.cases_key, case_id)

    async def version(self, version: str) -> str | None:
        raw = await self.redis.hget(self.versions_key, version)
        return _text(raw) if raw else None

    async def mark(self, version: str, outcome: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.versions_key, version, outcome)
            pipe.hdel(self.pending_key, version)
            await pipe.execute()

    async def pending(self) -> dict[str, PendingPublish]:
        raw = await self.redis.hgetall(self.pending_key)
        return {_text(key): PendingPublish.model_validate_json(value) for key, value in raw.items()}

    async def put_pending(self, version: str, pending: PendingPublish) -> None:
        await self.redis.hset(self.pending_key, version, pending.model_dump_json())

    async def drop_pending(self, version: str) -> None:
        await self.redis.hdel(self.pending_key, version)

    async def floor(self, partition: int) -> int:
        raw = await self.redis.hget(self.floors_key, str(partition))
        return int(raw) if raw else 0

    async def raise_floor(self, partition: int, end: int) -> None:
        current = await self.floor(partition)
        if end > current:
            await self.redis.hset(self.floors_key, str(partition), end)

    async def cursor(self, project_id: int) -> datetime | None:
        raw = await self.redis.hget(self.cursors_key, str(project_id))
        return datetime.fromisoformat(_text(raw)) if raw else None

    async def set_cursor(self, project_id: int, value: datetime) -> None:
        await self.redis.hset(self.cursors_key, str(project_id), value.isoformat())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@asynccontextmanager
async def bridge_lease(redis: Redis, queue_name: str, *, ttl_s: float = LEASE_TTL_S) -> AsyncIterator[None]:
    """Hold the queue's bridge lease: acquired (waiting while another bridge holds it: a standby, or the lease of a
    bridge that was killed, which lapses within `ttl_s`), renewed while held, released on exit."""
    key = f"vlmflow:{{labelstudio:{queue_name}}}:lease"
    token = uuid.uuid4().hex
    waited = False
    while not await redis.set(key, token, nx=True, px=round(ttl_s * 1000)):
        if not waited:
            log.info("another bridge holds the lease of queue %r; waiting (it lapses within %g s)", queue_name, ttl_s)
            waited = True
        await asyncio.sleep(ttl_s / 10)
    renew = redis.register_script(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
    )
    release = redis.register_script(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
    )

    async def keep() -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            if not await renew(keys=[key], args=[token, round(ttl_s * 1000)]):
                log.error("the bridge lease on %s was lost", queue_name)
                return

    keeper = asyncio.create_task(keep())
    try:
        yield
    finally:
        await cancel_and_wait(keeper)
        await release(keys=[key], args=[token])


# -- the webhook receiver -----------------------------------------------------------------------------------------


def webhook_app(secret: str, wake: asyncio.Event) -> web.Application:
    """A receiver that checks the shared secret header, wakes the bridge and answers at once."""

    async def receive(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            log.warning("webhook refused: missing or wrong %s header (from %s)", SECRET_HEADER, request.remote)
            return web.json_response({"error": f"missing or wrong {SECRET_HEADER} header"}, status=401)
        await request.read()
        wake.set()
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
    app.router.add_post(WEBHOOK_PATH, receive)
    return app


# -- publishing without duplicates -----------------------------------------------------------------------------


class Producer(Protocol):
    """What the bridge needs of a Kafka producer (aiokafka's `AIOKafkaProducer` has it)."""

    async def partitions_for(self, topic: str) -> set[int]: ...

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, partition: int) -> Any: ...


def partition_of(key: bytes, partitions: set[int]) -> int:
    """The partition Kafka's default partitioner (murmur2) gives `key`: the same as any other producer's choice."""
    from aiokafka.partitioner import DefaultPartitioner

    ordered = sorted(partitions)
    return int(DefaultPartitioner()(key, ordered, ordered))


ReadBack = Callable[[int, int], Awaitable[list[bytes]]]
"""Values on `vlm.corrections.done` partition P from offset F to its end: `await read_back(P, F)`."""


# -- the bridge -------------------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    """What one pass did, for logs and `review ls run --once`."""

    imported: int = 0
    published: int = 0
    refused: int = 0
    released: int = 0
    problems: list[str] = field(default_factory=list)


class Bridge:
    """One bridge between the queue and one Label Studio. `setup` once, `recover` at start, then `sync_once`."""

    def __init__(
        self,
        settings: Settings,
        queue: CorrectionQueue,
        store: BridgeStore,
        client: LabelStudioClient,
        producer: Producer,
        read_back: ReadBack,
        image_size: Callable[[str], Awaitable[ImageSize | None]],
    ):
        self.settings = settings
        self.ls = settings.labelstudio
        self.queue = queue
        self.store = store
        self.client = client
        self.producer = producer
        self.read_back = read_back
        self.image_size = image_size
        self.labels = project_labels(self.ls.labels)
        self.projects: dict[Task, int] = {}
        """task type → Label Studio project id"""

    # -- setup: projects, storages, webhooks --------------------------------------------------------------------
    async def setup(self) -> dict[Task, int]:
        """Create or update one project per task type, an S3 storage per image bucket and the webhook."""
        existing = {project["title"]: project for project in await self.client.projects()}
        for task in TASKS:
            title = project_title(self.ls.project_prefix, task)
            config = labeling_config(task, self.labels)
            project = existing.get(title)
            if project is None:
                description = f"vlmflow correction queue {self.settings.streams.review_queue!r}: {task} cases"
                project = await self.client.create_project(title, config, description)
            elif project.get("label_config") != config:
                await self.client.update_project(int(project["id"]), {"label_config": config})
            self.projects[task] = int(project["id"])
            await self._ensure_storages(self.projects[task])
            await self._ensure_webhook(self.projects[task])
        return dict(self.projects)

    async def _ensure_storages(self, project_id: int) -> None:
        s3 = self.settings.s3
        secret = self.ls.s3_secret_key or s3.secret_key
        existing = {storage.get("bucket"): storage for storage in await self.client.s3_storages(project_id)}
        for bucket in s3.image_buckets:
            fields: dict[str, Any] = {
                "project": project_id,
                "title": f"vlmflow {bucket}",
                "bucket": bucket,
                "presign": self.ls.presign,
                "use_blob_urls": False,
                "aws_access_key_id": self.ls.s3_access_key or s3.access_key,
                "aws_secret_access_key": secret.get_secret_value(),
                "region_name": s3.region or "us-east-1",
            }
            if self.ls.s3_endpoint is not None:
                fields["s3_endpoint"] = self.ls.s3_endpoint
            if bucket in existing:
                await self.client.update_s3_storage(int(existing[bucket]["id"]), fields)
            else:
                await self.client.create_s3_storage(fields)

    async def _ensure_webhook(self, project_id: int) -> None:
        listen = self.ls.webhook_listen
        url = self.ls.webhook_url or f"http://{listen}{WEBHOOK_PATH}"
        fields = {
            "project": project_id,
            "url": url,
            "send_payload": False,
            "send_for_all_actions": False,
            "actions": WEBHOOK_ACTIONS,
            "headers": {SECRET_HEADER: self.ls.webhook_secret.get_secret_value()},
            "is_active": True,
        }
        existing = [hook for hook in await self.client.webhooks(project_id) if hook.get("project") == project_id]
        if existing:
            await self.client.update_webhook(int(existing[0]["id"]), fields)
        else:
            await self.client.create_webhook(fields)

    # -- recovery at start -------------------------------------------------------------------------------------
    async def recover(self) -> None:
        """Resolve sends that were not confirmed, and cases recorded before their task was imported."""
        for version, pending in (await self.store.pending()).items():
            values = await self.read_back(pending.partition, pending.floor)
            if pending.value.encode() in values:
                log.info("recovery: the correction of %s (%s) was published before the stop", pending.case_id, version)
                record = await self.store.record(pending.case_id)
                if record is not None:
                    await self._complete(record)
                await self.store.mark(version, "published")
            else:
                await self.store.drop_pending(version)
        for record in (await self.store.records()).values():
            if record.state == "claimed":
                tasks = await self.client.tasks(record.project_id, case_id_query(record.case.case_id))
                if tasks:
                    record.task_id = int(tasks[0]["id"])
                    record.state = "open"
                    await self.store.put(record)
                else:
                    await self._import(record.project_id, [record])

    # -- one pass -------------------------------------------------------------------------------------------------
    async def sync_once(self) -> SyncReport:
        report = SyncReport()
        for task, project_id in self.projects.items():
            await self._collect(task, project_id, report)
        await self._renew(report)
        await self._fill(report)
        return report

    async def _collect(self, task: Task, project_id: int, report: SyncReport) -> None:
        """Step 1: every annotation version not handled yet, of the tasks updated since the cursor."""
        cursor = await self.store.cursor(project_id)
        since = (cursor - CURSOR_OVERLAP) if cursor is not None else datetime(2000, 1, 1)
        tasks = await self.client.tasks(project_id, updated_after_query(since))
        newest = cursor
        for item in tasks:
            updated = _parse_time(item.get("updated_at"))
            await self._task_annotations(task, item, report)
            if updated is not None and (newest is None or updated > newest):
                newest = updated
        if newest is not None and newest != cursor:
            await self.store.set_cursor(project_id, newest)

    async def _task_annotations(self, task: Task, item: dict[str, Any], report: SyncReport) -> None:
        data = item.get("data") if isinstance(item.get("data"), dict) else {}
        case_id = data.get("case_id") if isinstance(data, dict) else None
        record = await self.store.record(case_id) if isinstance(case_id, str) else None
        if record is None:
            return
        if record.task_id is None:
            record.task_id = int(item["id"])
            await self.store.put(record)
        annotations = item.get("annotations") if isinstance(item.get("annotations"), list) else []
        for annotation in sorted(annotations or [], key=lambda a: str(a.get("updated_at", ""))):
            version = f"{annotation.get('id')}@{annotation.get('updated_at')}"
            if await self.store.version(version) is not None:
                continue
            if annotation.get("was_cancelled"):
                await self.store.mark(version, "cancelled")
                continue
            await self._annotation(record, item, annotation, version, report)

    async def _annotation(
        self, record: BridgeRecord, item: dict[str, Any], annotation: dict[str, Any], version: str, report: SyncReport
    ) -> None:
        meta = item["data"].get("vlmflow")
        origin = meta.get("origin_labels") if isinstance(meta, dict) else None
        origin = origin if isinstance(origin, dict) else {}
        size = ImageSize(*record.size) if record.size else case_image_size(record.case)
        try:
            reviewed = annotation_answer(
                record.task,
                annotation.get("result"),
                labels=self.labels,
                origin_labels={str(k): str(v) for k, v in origin.items()},
                size=size,
                tolerance_px=self.settings.streams.mining.box_tolerance_px,
            )
        except InvalidAnnotation as exc:
            log.warning("annotation %s of case %s refused: %s", version, record.case.case_id, exc)
            await self._show_problem(record, item, problem_text(str(exc)))
            await self.store.mark(version, "refused")
            report.refused += 1
            report.problems.append(f"case {record.case.case_id}: {exc}")
            return
        reviewer = _reviewer(annotation)
        await self._publish_answer(record, reviewed.answer, reviewer, version)
        if item["data"].get("review_problem"):
            await self._show_problem(record, item, "")
        log.info("case %s: %s answer of %s published (%s)", record.case.case_id, reviewed.verdict, reviewer, version)
        report.published += 1

    async def _show_problem(self, record: BridgeRecord, item: dict[str, Any], problem: str) -> None:
        """Write `problem` on the task. NOTE: Label Studio returns the image resolved to a URL of its own, and a
        PATCH replaces the whole data: the case's own URI goes back in."""
        data = {**item["data"], IMAGE: record.case.log.images[0].uri, "review_problem": problem}
        await self.client.update_task_data(int(item["id"]), data)

    async def _publish_answer(self, record: BridgeRecord, answer: dict[str, Any], reviewer: str, version: str) -> None:
        """Publish (behind a pending marker), complete the claim, then mark the version done."""
        case = record.case

        async def publish(correction: Correction) -> None:
            await self._send(version, correction)

        output_schema = EXTRACT_SCHEMA if record.task == "extract" else None
        if record.state != "closed":
            try:
                await submit_correction(
                    self.queue, publish, case_id=case.case_id, token=record.token, answer=answer,
                    reviewer=reviewer, task=record.task, output_schema=output_schema,
                )  # fmt: skip
            except ClaimLost as exc:
                log.warning("case %s: %s; its correction is published all the same", case.case_id, exc)
                record.state = "closed"
        if record.state == "closed":
            correction = Correction(
                case_id=case.case_id, log_id=case.log_id, task=record.task, output=answer, reviewer=reviewer, case=case
            )
            await self._send(version, correction)
        record.state = "closed"
        await self.store.put(record)
        await self.store.mark(version, "published")

    async def _send(self, version: str, correction: Correction) -> None:
        value = encode(correction)
        key = key_of(Topic.CORRECTIONS_DONE, correction)
        partition = partition_of(key, await self.producer.partitions_for(Topic.CORRECTIONS_DONE))
        floor = await self.store.floor(partition)
        pending = PendingPublish(case_id=correction.case_id, value=value.decode(), partition=partition, floor=floor)
        await self.store.put_pending(version, pending)
        sent = await self.producer.send_and_wait(Topic.CORRECTIONS_DONE, value=value, key=key, partition=partition)
        await self.store.raise_floor(partition, int(sent.offset) + 1)

    async def _complete(self, record: BridgeRecord) -> None:
        if record.state != "closed":
            try:
                await self.queue.complete(record.case.case_id, record.token)
            except ClaimLost as exc:
                log.info("case %s: %s", record.case.case_id, exc)
            record.state = "closed"
            await self.store.put(record)

    async def _renew(self, report: SyncReport) -> None:
        """Step 2: keep every open case's claim; give back the tasks of claims lost while nobody annotated."""
        for record in (await self.store.records()).values():
            if record.state != "open":
                continue
            try:
                await self.queue.renew(record.case.case_id, record.token, self.settings.streams.review_lease_s)
                continue
            except ClaimLost as exc:
                reason = exc.reason
            task = await self.client.task(record.task_id) if record.task_id is not None else None
            if task is not None and task.get("total_annotations"):
                record.state = "closed"
                await self.store.put(record)
                continue
            if task is not None and reason != "submitted":
                await self.client.delete_task(int(task["id"]))
            await self.store.drop(record.case.case_id)
            report.released += 1
            log.warning("case %s: claim lost (%s); its task left Label Studio", record.case.case_id, reason)

    async def _fill(self, report: SyncReport) -> None:
        """Step 3: claim cases up to `max_open_tasks` and import them, one batch per project."""
        records = await self.store.records()
        room = self.ls.max_open_tasks - sum(record.state != "closed" for record in records.values())
        batches: dict[Task, list[BridgeRecord]] = {}
        while room > 0:
            claim = await self.queue.claim(self.ls.reviewer, self.settings.streams.review_lease_s)
            if claim is None:
                break
            try:
                task = case_task(claim.case)
            except UnsupportedCase as exc:
                log.info("%s", exc)
                await self.queue.skip(claim.case.case_id, claim.token)
                continue
            record = BridgeRecord(
                case=claim.case, task=task, token=claim.token, state="claimed", project_id=self.projects[task]
            )
            await self.store.put(record)
            batches.setdefault(task, []).append(record)
            room -= 1
        for task, batch in batches.items():
            await self._import(self.projects[task], batch)
            report.imported += len(batch)

    async def _import(self, project_id: int, records: list[BridgeRecord]) -> None:
        payloads = []
        for record in records:
            size = case_image_size(record.case) or await self.image_size(record.case.log.images[0].uri)
            record.size = (size.width, size.height) if size else None
            payloads.append(task_payload(record.case, self.labels, size, record.case.log.model or "model"))
        await self.client.import_tasks(project_id, payloads)
        for record in records:
            record.state = "open"
            await self.store.put(record)

    # -- running ------------------------------------------------------------------------------------------------
    async def run(self, wake: asyncio.Event, *, stop: asyncio.Event) -> None:
        """Pass after pass until `stop`: at once after a webhook, else every `poll_interval_s`."""
        while not stop.is_set():
            try:
                report = await self.sync_once()
                if report.imported or report.published or report.refused or report.released:
                    log.info(
                        "imported %d, published %d, refused %d, released %d",
                        report.imported, report.published, report.refused, report.released,
                    )  # fmt: skip
            except LabelStudioError as exc:
                log.warning("Label Studio: %s", exc)
            wake.clear()
            waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=self.ls.poll_interval_s, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _reviewer(annotation: dict[str, Any]) -> str:
    """The annotator's name as Label Studio shows it (`email, id`), else its user id."""
    name = annotation.get("created_username")
    if isinstance(name, str) and name.strip():
        return name.split(",")[0].strip()[:200]
    return f"labelstudio-user-{annotation.get('completed_by', 'unknown')}"


def read_image_size(settings: Settings) -> Callable[[str], Awaitable[ImageSize | None]]:
    """Reads an s3:// image's size from its header (the log had none); None when it cannot be read."""
    from PIL import Image

    from schemas.connections import object_store

    ls = settings.labelstudio
    # NOTE: the bridge reads with Label Studio's read-only credentials of the image buckets where it has them.
    s3 = settings.s3.model_copy(
        update={
            "access_key": ls.s3_access_key or settings.s3.access_key,
            "secret_key": ls.s3_secret_key or settings.s3.secret_key,
        }
    )
    store = object_store(settings.model_copy(update={"s3": s3}))
    limit = settings.worker.max_image_bytes

    def read(uri: str) -> ImageSize | None:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or bucket not in settings.s3.image_buckets:
            return None
        response = store.get_object(bucket, key)
        try:
            data = response.read(limit)
        finally:
            response.close()
            response.release_conn()
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return ImageSize(width, height)

    async def size(uri: str) -> ImageSize | None:
        try:
            return await asyncio.to_thread(read, uri)
        except Exception as exc:
            log.warning("size of %s unknown (%s): its task shows no boxes", uri, type(exc).__name__)
            return None

    return size


def kafka_read_back(settings: Settings) -> ReadBack:
    """Reads `vlm.corrections.done` partition P from offset F to its end (recovery only; a thread, kafka-python)."""
    from kafka import TopicPartition

    from streams.cluster import OffsetRange, RangeReader, high_watermarks, open_consumer

    def read(partition: int, floor: int) -> list[bytes]:
        consumer = open_consumer(settings)
        try:
            tp = TopicPartition(Topic.CORRECTIONS_DONE, partition)
            end = high_watermarks(consumer, [tp], timeout_s=PUBLISH_READBACK_TIMEOUT_S)[tp]
            reader = RangeReader(consumer, {tp: OffsetRange(floor, end)}, stall_timeout_s=PUBLISH_READBACK_TIMEOUT_S)
            return [record.value for record in reader if record.value is not None]
        finally:
            consumer.close()

    async def read_back(partition: int, floor: int) -> list[bytes]:
        return await asyncio.to_thread(read, partition, floor)

    return read_back


def labelstudio_client(settings: Settings) -> LabelStudioClient:
    return LabelStudioClient(settings.labelstudio.url, settings.labelstudio.token.get_secret_value())


@asynccontextmanager
async def open_bridge(settings: Settings, *, serving: Literal["serve", "setup"] = "serve") -> AsyncIterator[Bridge]:
    """A bridge with its connections (Redis, Label Studio, a Kafka producer) and its projects set up. To `serve`,
    it holds the queue's bridge lease until the block ends and recovers first; `setup` only sets up projects."""
    from aiokafka import AIOKafkaProducer

    from schemas.connections import aiokafka_options, redis_client

    redis = redis_client(settings)
    queue_name = settings.streams.review_queue
    try:
        async with AsyncExitStack() as stack:
            if serving == "serve":
                await stack.enter_async_context(bridge_lease(redis, queue_name))
            producer = AIOKafkaProducer(**aiokafka_options(settings.kafka), acks="all")
            await producer.start()
            stack.push_async_callback(producer.stop)
            client = await stack.enter_async_context(labelstudio_client(settings))
            bridge = Bridge(
                settings, CorrectionQueue(redis, queue_name), BridgeStore(redis, queue_name), client, producer,
                kafka_read_back(settings), read_image_size(settings),
            )  # fmt: skip
            await bridge.setup()
            if serving == "serve":
                await bridge.recover()
            yield bridge
    finally:
        await redis.aclose()


async def status(settings: Settings) -> dict[str, Any]:
    """The projects in Label Studio and the cases the bridge holds, by state."""
    from schemas.connections import redis_client

    redis = redis_client(settings)
    try:
        store = BridgeStore(redis, settings.streams.review_queue)
        records = await store.records()
        pending = await store.pending()
    finally:
        await redis.aclose()
    async with labelstudio_client(settings) as client:
        titles = {project_title(settings.labelstudio.project_prefix, task): task for task in TASKS}
        projects = {titles[p["title"]]: int(p["id"]) for p in await client.projects() if p.get("title") in titles}
    states = [record.state for record in records.values()]
    return {
        "projects": projects,
        "cases": {state: states.count(state) for state in ("claimed", "open", "closed")},
        "unconfirmed_sends": len(pending),
    }


async def serve(settings: Settings, *, once: bool = False, ready: Callable[[str], None] = lambda _: None) -> SyncReport:
    """Run the bridge with its webhook receiver until SIGTERM/SIGINT (or one pass with `once`)."""
    import signal

    async with open_bridge(settings) as bridge:
        if once:
            return await bridge.sync_once()
        wake, stop = asyncio.Event(), asyncio.Event()
        host, port = settings.labelstudio.webhook_listen.rsplit(":", 1)
        runner = web.AppRunner(webhook_app(settings.labelstudio.webhook_secret.get_secret_value(), wake))
        await runner.setup()
        await web.TCPSite(runner, host, int(port)).start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        ready(f"bridge serving projects {bridge.projects}; webhooks on http://{host}:{port}{WEBHOOK_PATH}")
        try:
            await bridge.run(wake, stop=stop)
        finally:
            await runner.cleanup()
        return SyncReport()
