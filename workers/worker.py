"""The inference worker: image jobs from Kafka, admitted by the shared vision-token budget, served by the engine,
answered with one result each.

Many jobs are in flight at once (up to `worker.max_in_flight`), each in its own task, and the budget decides how
many reach the engine together, so vLLM batches them. `Worker._handle` is the whole life of one job, as numbered
steps. Offsets are committed by one owner (`_commit_loop`) from the `OffsetTracker`, only below records whose jobs
are fully handled, so a crash at any point leads to redelivery, never to a lost job; the idempotency record
(`workers.idempotency`) turns redelivery into no second result.

Failure policy: anything wrong with a job (bad input, the engine failing on it, the budget or deadline running
out) becomes an error result or a retry, and the worker goes on. Kafka or Redis failing is not the job's fault:
the job is left unacknowledged, the worker stops with an error, and the records are redelivered when it (or
another member of the group) runs again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel

from schemas.base import utc_now
from schemas.codec import decode, encode, key_of
from schemas.connections import aiokafka_options, object_store, redis_client
from schemas.errors import ErrorCode, InvalidMessage, VlmflowError
from schemas.jobs import ImageJob, JobError, JobResult, RetryJob, Timings
from schemas.logs import JobEvent
from schemas.settings import Settings
from schemas.tasks import MODEL_BOX_FIELD, BoxField, InvalidAnswer, InvalidTaskSchema, task_schema, validate_answer
from schemas.topics import TOPICS, Topic
from workers.budget import BudgetTimeout, CostExceedsCapacity, Lease, LeaseExpired, TokenBudget
from workers.engines.base import Engine, EngineOutput, EngineRequest
from workers.idempotency import IdempotencyRecords, published_before
from workers.images import ImageError, LoadedImage, load_images
from workers.metrics import MetricsServer, WorkerMetrics
from workers.offsets import OffsetTracker, Ticket
from workers.prompts import MissingPrompt, task_prompt
from workers.retries import decide, exhausted
from workers.tokens import MAX_ASPECT_RATIO, image_tokens

log = logging.getLogger("vlmflow.worker")

CONSUMED_TOPICS = (Topic.JOBS_IMAGE, Topic.JOBS_RETRY)
COMMIT_INTERVAL_S = 0.5
GAUGE_INTERVAL_S = 2.0
FETCH_TIMEOUT_MS = 200
MISSING_TOPIC_MEMORY_S = 60.0
READY_LINE = "vlmflow worker ready"
"""Printed once the engine is loaded and the consumer started (the demo and the tests wait for it)."""


class JobFailure(VlmflowError):
    """This job cannot be served: it gets an error result with `code` (or another attempt, if retryable)."""

    def __init__(self, code: ErrorCode, message: str):
        self.code: ErrorCode = code
        super().__init__(message)

    def error(self) -> JobError:
        return JobError(code=self.code, message=str(self)[:2_000])


@dataclass
class _Served:
    """What serving one job produced, success or not (the payload of steps 8-9)."""

    picked_at: datetime
    """When this worker took the job (after a retry's backoff)."""
    output: dict[str, Any] | None = None
    failure: JobFailure | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    vision_tokens: int = 0
    engine: EngineOutput | None = None
    admission_s: float = 0.0
    inference_s: float = 0.0


def vision_tokens(sizes: Sequence[tuple[int, int]], settings: Settings) -> int:
    """The job's exact vision tokens at the engine's `min_pixels`/`max_pixels`: the cost of its lease."""
    model = settings.model
    total = 0
    for width, height in sizes:
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise JobFailure("aspect_ratio", f"a {width}x{height} image is over the aspect ratio {MAX_ASPECT_RATIO}")
        total += image_tokens(
            width, height, family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels
        )
    return total


def validated_output(engine_output: EngineOutput, job: ImageJob, box_field: BoxField) -> dict[str, Any]:
    """The engine's JSON, checked again against the task schema (constrained decoding can be cut off)."""
    parsed = engine_output.parsed_json
    if not isinstance(parsed, dict):
        reason = "was cut off at max_output_tokens" if engine_output.finish_reason == "length" else "is no JSON object"
        raise JobFailure("output_invalid", f"the model's output {reason}: {engine_output.text[:200]!r}")
    try:
        validate_answer(job.task, parsed, job.output_schema, box_field=box_field)
    except InvalidAnswer as exc:
        raise JobFailure("output_invalid", str(exc)) from None
    return parsed


class _KeepAlive:
    """Renews a job's claim (and its lease, once it has one) while the job is served."""

    def __init__(self, worker: Worker, job_id: str, owner: str):
        self._worker = worker
        self._job_id = job_id
        self._owner = owner
        self.lease: Lease | None = None
        interval = min(worker.settings.budget.lease_ttl_s, worker.claim_ttl_s) / 3
        self._task = asyncio.create_task(self._loop(interval), name=f"keepalive {job_id}")

    async def _loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not await self._worker.records.renew(self._job_id, self._owner):
                log.warning(
                    "job %s: claim lost (presumed dead and taken over); its result will not be published", self._job_id
                )
            if self.lease is not None:
                try:
                    self.lease = await self._worker.budget.renew(self.lease)
                except LeaseExpired:
                    log.warning("job %s: lease lapsed before renewal; its tokens went back to the pool", self._job_id)
                    self.lease = None

    async def stop(self) -> None:
        """Stop renewing and give the lease back (step 9)."""
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        if self.lease is not None:
            lease, self.lease = self.lease, None
            await self._worker.budget.release(lease)


class _Rebalance(ConsumerRebalanceListener):
    """Commits what is done of the partitions leaving this worker, then forgets their books."""

    def __init__(self, worker: Worker):
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker.commit(revoked)
        self._worker.tracker.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class Worker:
    """One member of the worker group. `run()` serves until `stop()` (SIGTERM) or until Kafka/Redis fail."""

    def __init__(self, settings: Settings, engine: Engine, *, model_name: str | None = None):
        self.settings = settings
        self.engine = engine
        self.model_name = model_name or settings.model.name
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.claim_ttl_s = settings.budget.lease_ttl_s
        self.box_field: BoxField = MODEL_BOX_FIELD[settings.model.family]
        """Boxes are asked for, and answered, in the model's own convention; the key names it."""
        self.metrics = WorkerMetrics(settings.budget.pool)
        self.metrics_server: MetricsServer | None = None
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.redis = redis_client(settings)
        self.budget = TokenBudget(
            self.redis, settings.budget.pool, settings.budget.capacity, settings.budget.lease_ttl_s
        )
        self.records = IdempotencyRecords(
            self.redis, claim_ttl_s=self.claim_ttl_s, record_ttl_s=settings.worker.idempotency_ttl_s
        )
        self.store = object_store(settings)
        kafka = aiokafka_options(settings.kafka)
        self.producer = AIOKafkaProducer(
            **kafka, acks="all", linger_ms=2, max_request_size=settings.worker.max_message_bytes + 65_536
        )
        self.consumer = AIOKafkaConsumer(
            **kafka,
            group_id=settings.worker.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=max(100, settings.kafka.session_timeout_ms // 3),
            max_partition_fetch_bytes=settings.worker.max_message_bytes + 65_536,
        )
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}  # topic -> its partitions, for topics this worker produces to
        self._missing_topics: dict[str, float] = {}  # reply_to topic -> monotonic time until which it counts as missing
        self._result_ends: dict[int, int] = {}  # result partition -> an offset at or below its end
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking work; `run()` then finishes or hands back the jobs in flight and returns."""
        self._stopping.set()

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        """Serve until stopped. Raises what stopped it when that was Kafka or Redis failing."""
        async with AsyncExitStack() as stack:
            # NOTE: every client is closed on the way out, started or not (a failed start still holds sockets).
            stack.push_async_callback(self.redis.aclose)
            stack.push_async_callback(self.producer.stop)
            stack.push_async_callback(self.consumer.stop)
            await self.engine.start()
            stack.push_async_callback(self.engine.close)
            await self.producer.start()
            await self._learn_result_ends()
            await self.consumer.start()
            self.consumer.subscribe(list(CONSUMED_TOPICS), listener=_Rebalance(self))
            if self.settings.worker.metrics_port >= 0:
                self.metrics_server = self.metrics.serve(self.settings.worker.metrics_port)
                stack.callback(self.metrics_server.close)
                log.info("metrics on http://0.0.0.0:%d/metrics", self.metrics_server.port)
            background = [asyncio.create_task(self._commit_loop()), asyncio.create_task(self._gauge_loop())]
            for task in background:
                task.add_done_callback(self._stop_on_failure)
            print(READY_LINE, flush=True)
            if ready is not None:
                ready.set()
            try:
                await self._consume_loop()
            finally:
                await self._drain()
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await self.commit()
        if self._fatal is not None:
            raise self._fatal

    async def _learn_result_ends(self) -> None:
        """A lower bound of each result partition's end, for in-doubt read-back (`workers.idempotency`).

        NOTE: ListOffsets "latest" of the local broker can answer below the true end, never above it, which is
        all a lower bound needs; produce acknowledgements raise the bounds from then on.
        """
        partitions = await self._topic_partitions(Topic.JOBS_RESULT)
        probe = AIOKafkaConsumer(**aiokafka_options(self.settings.kafka), enable_auto_commit=False)
        try:
            await probe.start()
            ends = await probe.end_offsets([TopicPartition(Topic.JOBS_RESULT, p) for p in partitions])
        finally:
            await probe.stop()
        self._result_ends = {tp.partition: offset for tp, offset in ends.items()}

    async def _drain(self) -> None:
        """Let the jobs in flight finish for up to `shutdown_grace_s`, then cancel the rest: their leases and
        claims are given back and their offsets stay uncommitted, so the group serves them again."""
        if not self._tasks:
            return
        log.info(
            "stopping: %d jobs in flight, waiting up to %.0f s", len(self._tasks), self.settings.worker.shutdown_grace_s
        )
        _, pending = await asyncio.wait(self._tasks, timeout=self.settings.worker.shutdown_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- the loops ----------------------------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        """Take records while there is room in flight; each becomes a task running `_handle`."""
        limit = self.settings.worker.max_in_flight
        while not self._stopping.is_set():
            room = limit - len(self._tasks)
            if room <= 0:
                await asyncio.wait(self._tasks, timeout=FETCH_TIMEOUT_MS / 1000, return_when=asyncio.FIRST_COMPLETED)
                continue
            batches = await self.consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=room)
            for tp, records in batches.items():
                for record in records:
                    ticket = self.tracker.start(tp, record.offset)
                    task = asyncio.create_task(
                        self._handle(record, ticket), name=f"job {tp.topic}[{tp.partition}]@{record.offset}"
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._finished)
            self.metrics.in_flight.set(len(self._tasks))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.metrics.in_flight.set(len(self._tasks))
        self._stop_on_failure(task)

    def _stop_on_failure(self, task: asyncio.Task[None]) -> None:
        """A task that raised met Kafka or Redis failing (job failures never raise): stop, and say why."""
        if task.cancelled() or task.exception() is None:
            return
        if self._fatal is None:
            self._fatal = task.exception()
            log.error("stopping: %s failed", task.get_name(), exc_info=self._fatal)
        self._stopping.set()

    async def commit(self, partitions: Sequence[TopicPartition] | set[TopicPartition] | None = None) -> None:
        """Commit the positions below which every record is handled (of `partitions`, or of all)."""
        assigned = self.consumer.assignment()
        points = {tp: offset for tp, offset in self.tracker.commit_points(partitions).items() if tp in assigned}
        if not points:
            return
        try:
            await self.consumer.commit(points)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("commit of %d partitions failed (%s); the records will be redelivered", len(points), exc)
            return
        self.tracker.committed(points)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self.commit()

    async def _gauge_loop(self) -> None:
        while True:
            state = await self.budget.state()
            self.metrics.set_budget(state.capacity, state.in_use)
            for tp in self.consumer.assignment():
                highwater = self.consumer.highwater(tp)
                position = self.tracker.position(tp)
                if highwater is not None and position is not None:
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))
            await asyncio.sleep(GAUGE_INTERVAL_S)

    # -- one job --------------------------------------------------------------------------------------------------
    async def _handle(self, record: ConsumerRecord, ticket: Ticket[TopicPartition]) -> None:
        """Everything that happens to one record, in this order:

        1. Decode: an `ImageJob`, or a `RetryJob` from the retry topic (served once its backoff has passed).
           A record that is neither gets an `invalid_message` result when its key is a job id.
        2. Claim the job's idempotency record: a job answered before is skipped (step 10 follows), one served
           by a live worker is waited for, one a dead worker left in doubt is looked up on the result topic.
        3. Check: a job past its deadline is answered with `deadline_exceeded`; one with more images than the
           engine takes per prompt, or a `reply_to` that is a vlmflow topic or does not exist, `invalid_message`.
        4. Load the images (S3, inline or allow-listed URL), each failure with its own code.
        5. Estimate the exact vision tokens; a job that can never fit the budget is answered at once.
        6. Lease the tokens from the shared budget, waiting in line; claim and lease are renewed from here on.
        7. Infer: the engine, constrained to the task's JSON Schema; the output is validated again.
        8. Publish the result (to `reply_to` too) and the log event, then mark the claim done. A retryable
           failure goes to `vlm.jobs.retry` instead, or to `vlm.jobs.dlq` with a `retries_exhausted` result.
        9. Release the lease.
        10. Mark the offset done; the commit loop commits it once every record below it is done too.
        """
        owner = f"{self.worker_id}/{uuid.uuid4().hex[:8]}"
        # Step 1.
        try:
            job = await self._decode(record)
        except InvalidMessage as invalid:
            await self._answer_undecodable(record, invalid, owner)
            self.tracker.done(ticket)
            return
        picked_at = utc_now()
        self.metrics.queue_seconds.observe(max(0.0, (picked_at - job.submitted_at).total_seconds()))
        # Step 2.
        if not await self._claim(job.job_id, owner):
            self.metrics.duplicate.inc()
            self.tracker.done(ticket)
            return
        keepalive = _KeepAlive(self, job.job_id, owner)
        published = False
        try:
            # Steps 3-7.
            served = await self._serve(job, keepalive, picked_at)
            # Step 8.
            published = await self._conclude(job, owner, served)
        finally:
            # Step 9.
            await keepalive.stop()
            if not published:
                await self.records.release(job.job_id, owner)
        # Step 10.
        self.tracker.done(ticket)

    async def _decode(self, record: ConsumerRecord) -> ImageJob:
        limit = self.settings.worker.max_message_bytes
        if record.topic != Topic.JOBS_RETRY:
            job: ImageJob = decode(record.topic, record.value, max_bytes=limit)
            return job
        retry: RetryJob = decode(record.topic, record.value, max_bytes=limit)
        wait_s = (retry.not_before - utc_now()).total_seconds()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        return retry.job.model_copy(update={"attempt": retry.attempt})

    async def _claim(self, job_id: str, owner: str) -> bool:
        """Step 2: True when this task now serves the job; False when its result is already published."""
        while True:
            claim = await self.records.claim(job_id, owner)
            if claim.state == "done":
                return False
            if claim.state == "busy":
                await asyncio.sleep(min(max(claim.retry_in_s, 0.05), 1.0))
                continue
            if claim.in_doubt:
                assert claim.previous_partition is not None, "a publishing claim records its partition"
                key = job_id.encode()
                if await published_before(
                    self.settings, Topic.JOBS_RESULT, claim.previous_partition, claim.previous_offset, key
                ):
                    log.info("job %s: a dead worker had published its result; skipping", job_id)
                    await self.records.done(job_id, owner)
                    return False
            return True

    async def _serve(self, job: ImageJob, keepalive: _KeepAlive, picked_at: datetime) -> _Served:
        """Steps 3-7: the output, or the failure that stopped the job."""
        served = _Served(picked_at)
        try:
            # Step 3.
            await self._check(job)
            # Step 4.
            images = await self._load(job)
            served.image_sizes = [image.size for image in images]
            # Step 5.
            served.vision_tokens = vision_tokens(served.image_sizes, self.settings)
            prompt, schema = self._prompt(job), self._schema(job)
            # Step 6.
            admission_started = time.monotonic()
            keepalive.lease = await self._lease(job, served.vision_tokens)
            served.admission_s = time.monotonic() - admission_started
            # Step 7.
            inference_started = time.monotonic()
            served.engine = await self._infer(job, images, prompt, schema)
            served.inference_s = time.monotonic() - inference_started
            self.metrics.inference_seconds.observe(served.inference_s)
            served.output = validated_output(served.engine, job, self.box_field)
        except JobFailure as failure:
            served.failure = failure
        return served

    async def _check(self, job: ImageJob) -> None:
        deadline_s = self._seconds_left(job.deadline)
        if deadline_s is not None and deadline_s <= 0:
            raise JobFailure("deadline_exceeded", f"the deadline {job.deadline} passed before the job was picked up")
        limit = self.settings.engine.limit_images_per_prompt
        if len(job.images) > limit:
            raise JobFailure("invalid_message", f"{len(job.images)} images; the engine takes at most {limit} per job")
        if job.reply_to is None:
            return
        if job.reply_to in TOPICS:
            raise JobFailure("invalid_message", f"reply_to {job.reply_to!r} is a vlmflow topic, not a reply topic")
        if not await self._topic_exists(job.reply_to):
            raise JobFailure("invalid_message", f"reply_to topic {job.reply_to!r} does not exist")

    async def _topic_exists(self, topic: str) -> bool:
        """Whether the cluster has `topic` (a cluster that creates topics on first use always says yes). A no is
        remembered for a minute, so a stream of jobs naming a missing topic does not wait for metadata each."""
        if self._missing_topics.get(topic, 0.0) > time.monotonic():
            return False
        try:
            async with asyncio.timeout(self.settings.kafka.request_timeout_ms / 1000):
                await self._topic_partitions(topic)
        except (TimeoutError, KafkaError):
            self._missing_topics[topic] = time.monotonic() + MISSING_TOPIC_MEMORY_S
            return False
        return True

    def _seconds_left(self, deadline: datetime | None) -> float | None:
        return None if deadline is None else (deadline - utc_now()).total_seconds()

    async def _load(self, job: ImageJob) -> list[LoadedImage]:
        try:
            return await load_images(job.images, self.settings, self.store)
        except ImageError as exc:
            raise JobFailure(exc.code, str(exc)) from None
        except Exception as exc:
            log.exception("job %s: image loading failed unexpectedly", job.job_id)
            raise JobFailure("internal_error", f"loading images: {type(exc).__name__}: {exc}") from None

    def _prompt(self, job: ImageJob) -> str:
        try:
            return task_prompt(job, self.box_field)
        except MissingPrompt as exc:
            raise JobFailure("invalid_message", str(exc)) from None

    def _schema(self, job: ImageJob) -> dict[str, Any]:
        try:
            return task_schema(job.task, job.output_schema, box_field=self.box_field)
        except InvalidTaskSchema as exc:
            raise JobFailure("invalid_output_schema", str(exc)) from None

    async def _lease(self, job: ImageJob, cost: int) -> Lease:
        wait_s = self.settings.budget.wait_timeout_s
        deadline_s = self._seconds_left(job.deadline)
        bounded_by_deadline = deadline_s is not None and deadline_s < wait_s
        self.metrics.vision_tokens.observe(cost)
        self.metrics.waiting.inc()
        started = time.monotonic()
        try:
            timeout_s = min(wait_s, deadline_s) if deadline_s is not None else wait_s
            lease = await self.budget.reserve(cost, holder=f"{self.worker_id}/{job.job_id}", timeout_s=timeout_s)
        except CostExceedsCapacity as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise JobFailure(exc.code, str(exc)) from None
        except BudgetTimeout as exc:
            code: ErrorCode = "deadline_exceeded" if bounded_by_deadline else exc.code
            self.metrics.rejected.labels(code).inc()
            raise JobFailure(code, str(exc)) from None
        finally:
            self.metrics.waiting.dec()
            self.metrics.admission_seconds.observe(time.monotonic() - started)
        self.metrics.admitted.inc()
        return lease

    async def _infer(
        self, job: ImageJob, images: list[LoadedImage], prompt: str, schema: dict[str, Any]
    ) -> EngineOutput:
        request = EngineRequest(
            prompt=prompt,
            images=[image.image for image in images],
            json_schema=schema,
            max_tokens=job.max_output_tokens,
        )
        deadline_s = self._seconds_left(job.deadline)
        try:
            async with asyncio.timeout(deadline_s):
                return await self.engine.generate(request)
        except TimeoutError:
            raise JobFailure("deadline_exceeded", f"the deadline {job.deadline} passed during inference") from None
        except Exception as exc:
            log.exception("job %s: engine failed", job.job_id)
            raise JobFailure("engine_error", f"{type(exc).__name__}: {exc}") from None

    # -- step 8 ---------------------------------------------------------------------------------------------------
    async def _conclude(self, job: ImageJob, owner: str, served: _Served) -> bool:
        """Step 8: publish the answer, or hand the job to the retry or dead-letter topic.

        Returns True when a result was published (the claim is then done), False when the job went to the
        retry topic (the claim is to be released for the next attempt)."""
        if served.failure is None:
            assert served.output is not None
            return await self._publish(job, owner, self._result(job, served), served.image_sizes)
        error = served.failure.error()
        decision = decide(job, error, self.settings.worker, utc_now())
        if decision.route == "answer" or decision.record is None:
            return await self._publish(job, owner, self._result(job, served), served.image_sizes)
        topic = Topic.JOBS_RETRY if decision.route == "retry" else Topic.JOBS_DLQ
        await self._send(topic, decision.record, key=job.job_id.encode())
        if decision.route == "retry":
            self.metrics.retried.inc()
            return False
        self.metrics.dead_lettered.inc()
        final = replace(served, failure=JobFailure("retries_exhausted", exhausted(error, job.attempt + 1).message))
        return await self._publish(job, owner, self._result(job, final), served.image_sizes)

    def _result(self, job: ImageJob, served: _Served) -> JobResult:
        engine = served.engine
        timings = Timings(
            queue_ms=max(0.0, (served.picked_at - job.submitted_at).total_seconds() * 1000),
            admission_ms=served.admission_s * 1000,
            inference_ms=served.inference_s * 1000,
            total_ms=(utc_now() - served.picked_at).total_seconds() * 1000,
        )
        return JobResult(
            job_id=job.job_id,
            status="ok" if served.failure is None else "error",
            task=job.task,
            output=served.output,
            error=None if served.failure is None else served.failure.error(),
            vision_tokens=served.vision_tokens,
            prompt_tokens=engine.num_prompt_tokens if engine else 0,
            completion_tokens=engine.num_completion_tokens if engine else 0,
            model=self.model_name,
            worker=self.worker_id,
            attempt=job.attempt,
            timings=timings,
        )

    async def _publish(
        self, job: ImageJob | None, owner: str, result: JobResult, image_sizes: list[tuple[int, int]]
    ) -> bool:
        """Publish one result: the `reply_to` copy and the log event first, the result on `vlm.jobs.result` last,
        so a result found there proves the rest went out (the in-doubt read-back relies on it). Then `done`.

        Returns False without publishing when the claim was lost to a worker that presumed this one dead."""
        key = key_of(Topic.JOBS_RESULT, result)
        partition = await self._partition_of(Topic.JOBS_RESULT, key)
        if not await self.records.publishing(result.job_id, owner, partition, self._result_ends.get(partition)):
            log.warning("job %s: claim lost before publishing; the worker that took it over answers it", result.job_id)
            return True
        firsts = []
        if job is not None:
            if job.reply_to is not None:
                firsts.append(self._send(job.reply_to, result, key=key))
            firsts.append(
                self._send(Topic.LOGS_RAW, JobEvent(job=job, result=result, image_sizes=image_sizes), key=key)
            )
        await asyncio.gather(*firsts)
        metadata = await self._send(Topic.JOBS_RESULT, result, key=key, partition=partition)
        self._result_ends[partition] = max(self._result_ends.get(partition, 0), metadata.offset + 1)
        await self.records.done(result.job_id, owner)
        self.metrics.completed.labels(result.status).inc()
        if result.error is not None:
            self.metrics.errors.labels(result.error.code).inc()
        return True

    async def _answer_undecodable(self, record: ConsumerRecord, invalid: InvalidMessage, owner: str) -> None:
        """Step 1 for a record that is no job: an error result keyed by the record key when that is a job id;
        otherwise nobody can be answered, so it is only counted and logged."""
        job_id = record.key.decode(errors="replace") if record.key else ""
        try:
            result = JobResult(
                job_id=job_id,
                status="error",
                error=JobError(code=invalid.code, message=str(invalid)[:2_000]),
                worker=self.worker_id,
            )
        except ValueError:
            log.warning(
                "%s[%d]@%d: %s; no job id in the key, no result", record.topic, record.partition, record.offset, invalid
            )
            self.metrics.errors.labels(invalid.code).inc()
            return
        if await self._claim(job_id, owner):
            await self._publish(None, owner, result, [])
        else:
            self.metrics.duplicate.inc()

    # -- producing ------------------------------------------------------------------------------------------------
    async def _topic_partitions(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        return self._partitions[topic]

    async def _partition_of(self, topic: str, key: bytes) -> int:
        """The partition the default partitioner picks for `key`, fixed before producing so the claim can say
        where the result will be."""
        partitions = await self._topic_partitions(topic)
        return int(self._partitioner(key, partitions, partitions))

    async def _send(self, topic: str, value: BaseModel, *, key: bytes, partition: int | None = None) -> Any:
        """Produce one record and wait for the broker's acknowledgement."""
        return await self.producer.send_and_wait(topic, encode(value), key=key, partition=partition)
