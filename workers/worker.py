"""The inference worker: image jobs from Kafka, admitted by the shared vision-token budget, served by the engine,
answered with one result each.

Many jobs are in flight at once, each in its own task, and the budget decides how many reach the engine together,
so vLLM batches them: one budget pool per engine (per GPU), named by the worker and sized at start from the KV
cache the engine allocated (`workers.capacity`); `worker.max_in_flight` is only a safety bound.
`Worker._handle` is the whole life of one job, as numbered steps. Offsets are committed by one owner
(`_commit_loop`) from the `OffsetTracker`, only below records whose jobs are fully handled, so a crash at any point
leads to redelivery, never to a lost job; the idempotency record (`workers.idempotency`) turns redelivery into no
second result.

The worker orchestrates; the parts live apart: the pure pieces of serving one job in `workers.serving`, producing
and the partition bookkeeping in `workers.publisher`, the claim and the lease as `async with` holds that renew
themselves (`IdempotencyRecords.hold`, `TokenBudget.hold`).

Failure policy: anything wrong with a job (bad input, the engine failing on it, the budget or deadline running
out, its lease lost, a defect of vlmflow that only this job meets) becomes an error result or a retry, and the
worker goes on: no input can stop it. Kafka or Redis failing (`INFRASTRUCTURE`, beyond the blips that renewals
and the clients' own retries ride out) is not the job's fault: the job is left unacknowledged, the worker stops
with an error, and the records are redelivered when it (or another member of the group) runs again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from schemas.base import utc_now
from schemas.codec import decode
from schemas.connections import (
    REDIS_SOCKET_TIMEOUT_S,
    aiokafka_options,
    cancel_and_wait,
    object_store,
    redis_options,
)
from schemas.errors import ErrorCode, InvalidMessage
from schemas.jobs import ImageJob, JobError, JobResult, RetryJob
from schemas.metrics_http import MetricsServer
from schemas.settings import Settings
from schemas.tasks import MODEL_BOX_FIELD, BoxField, InvalidTaskSchema, task_schema
from schemas.topics import TOPICS, Topic
from workers.budget import BudgetTimeout, BudgetUnavailable, CostExceedsCapacity, LeaseLost, TokenBudget
from workers.capacity import engine_pool_capacity, pool_name
from workers.engines.base import Engine, EngineOutput, EngineRequest
from workers.idempotency import ClaimHold, IdempotencyRecords
from workers.images import ImageError, LoadedImage, load_images
from workers.limits import TooManyTokens, check_job, derive_limits, max_in_flight
from workers.metrics import WorkerMetrics
from workers.offsets import OffsetTracker, Ticket
from workers.prompts import MissingPrompt, task_prompt
from workers.publisher import Producer, PublishOutcome, ResultPublisher
from workers.retries import decide, exhausted
from workers.serving import (
    MAX_ERROR_MESSAGE_CHARS,
    JobFailure,
    Served,
    job_result,
    seconds_left,
    validated_output,
    vision_tokens,
)

log = logging.getLogger("vlmflow.worker")

CONSUMED_TOPICS = (Topic.JOBS_IMAGE, Topic.JOBS_RETRY)
COMMIT_INTERVAL_S = 0.5
GAUGE_INTERVAL_S = 2.0
FETCH_TIMEOUT_MS = 200
REDIS_CONNECTIONS = 64
"""Redis connections of one worker: commands are short, so more would queue at Redis instead of here."""
READY_LINE = "vlmflow worker ready"
"""Printed once the engine is loaded and the consumer started (the demo and the tests wait for it)."""
CHECK_TIMEOUT_S = 10.0
"""Longest a job's schema check or its output's validation may take (off the event loop): both are bounded in
time by construction (`schemas.tasks`), so this only guards against a defect."""
CHECK_THREADS = 2
INFRASTRUCTURE = (RedisError, BudgetUnavailable, KafkaError)
"""Failures of what the worker stands on rather than of a job: they stop the worker (the job is redelivered)."""

T = TypeVar("T")


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

    def __init__(
        self, settings: Settings, engine: Engine, *, model_name: str | None = None, producer: Producer | None = None
    ):
        self.settings = settings
        self.engine = engine
        self.model_name = model_name or settings.model.name
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.claim_ttl_s = settings.budget.lease_ttl_s
        self.box_field: BoxField = MODEL_BOX_FIELD[settings.model.family]
        """Boxes are asked for, and answered, in the model's own convention; the key names it."""
        self.pool = pool_name(settings)
        """This engine's budget pool: one per GPU."""
        self.limits = derive_limits(settings, None)
        """What a job may bring (its text is checked in step 3); raises `LimitsConflict` on settings that conflict."""
        self.metrics = WorkerMetrics(self.pool)
        self.metrics_server: MetricsServer | None = None
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        # NOTE: a blocking pool: hundreds of jobs in flight each touch Redis (claim, lease, renewals), and beyond its
        # connections a command waits for one rather than failing the worker (redis-py's default pool raises).
        self.redis = Redis.from_pool(
            BlockingConnectionPool.from_url(
                settings.redis.url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_SOCKET_TIMEOUT_S, **redis_options()
            )
        )
        self.max_in_flight = max_in_flight(settings, None)
        self.records = IdempotencyRecords(
            self.redis, claim_ttl_s=self.claim_ttl_s, record_ttl_s=settings.worker.idempotency_ttl_s
        )
        self.store = object_store(settings)
        kafka = aiokafka_options(settings.kafka)
        self.producer: Producer = producer or AIOKafkaProducer(
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
        self.publisher = ResultPublisher(settings, self.producer, self.metrics)
        self._checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="vlmflow-check")
        """Schema checks and output validation run here, off the event loop."""
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
            stack.callback(self._checks.shutdown, wait=False, cancel_futures=True)
            await self.engine.start()
            stack.push_async_callback(self.engine.close)
            self.budget = await self.open_budget()
            await self.producer.start()
            await self.publisher.learn_result_ends()
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
                    await cancel_and_wait(task)
                await self.commit()
        if self._fatal is not None:
            raise self._fatal

    async def open_budget(self) -> TokenBudget:
        """This engine's pool, its capacity taken from the KV cache the engine allocated and stored in the pool
        (where `vlmflow budget status` reads it); the in-flight bound follows the engine's batch. Call once the
        engine has started (`run` does; so does a caller serving records with `handle`)."""
        kv = self.engine.kv_cache()
        pool = engine_pool_capacity(kv, self.settings.budget.capacity, self.limits.text_reserve)
        budget = TokenBudget(self.redis, self.pool, pool.capacity, self.settings.budget.lease_ttl_s)
        await budget.set_capacity(pool.capacity)
        self.max_in_flight = max_in_flight(self.settings, kv)
        over_cache = kv is not None and pool.capacity > pool.kv_tokens - pool.text_reserve_tokens - pool.headroom_tokens
        level = logging.WARNING if over_cache else logging.INFO
        log.log(level, "budget pool %s: %s; at most %d jobs in flight", self.pool, "; ".join(pool.lines),
                self.max_in_flight)  # fmt: skip
        return budget

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
        while not self._stopping.is_set():
            room = self.max_in_flight - len(self._tasks)
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
            try:
                state = await self.budget.state()
            except BudgetUnavailable as exc:
                log.warning("budget gauges not updated: %s", exc)
            else:
                self.metrics.set_budget(state.capacity, state.in_use)
            for tp in self.consumer.assignment():
                highwater = self.consumer.highwater(tp)
                position = self.tracker.position(tp)
                if highwater is not None and position is not None:
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))
            await asyncio.sleep(GAUGE_INTERVAL_S)

    # -- one job --------------------------------------------------------------------------------------------------
    async def handle(self, record: ConsumerRecord) -> None:
        """Serve one record from start to end, as the consume loop does with each (it runs the same `_handle`); for
        driving the serving path without a consumer."""
        tp = TopicPartition(record.topic, record.partition)
        await self._handle(record, self.tracker.start(tp, record.offset))

    async def _handle(self, record: ConsumerRecord, ticket: Ticket[TopicPartition]) -> None:
        """Everything that happens to one record, in this order:

        1. Decode: an `ImageJob`, or a `RetryJob` from the retry topic (served once its backoff has passed).
           A record that is neither gets an `invalid_message` result when its key is a job id.
        2. Claim the job's idempotency record: a job answered before is skipped (step 10 follows), one served
           by a live worker is waited for, one a dead worker left in doubt is looked up on the result topic. The
           claim is renewed from here on.
        3. Check: a job past its deadline is answered with `deadline_exceeded`; one with more images than the
           engine takes per prompt, a `reply_to` outside `reply_to_prefixes`, a vlmflow topic or missing, a
           prompt or output over the engine's room, or an output schema the worker refuses (checked off the event
           loop), with `invalid_message`, `too_many_tokens` or `invalid_output_schema`.
        4. Load the images (S3, inline or allow-listed URL), each failure with its own code.
        5. Estimate the exact vision tokens; a job that can never fit the budget is answered at once.
        6. Lease the tokens from the shared budget, waiting in line; the lease is renewed while held.
        7. Infer: the engine, constrained to the task's JSON Schema; then release the lease. A lease lost while
           inferring stops the inference (`lease_lost`, retried).
        8. Validate the output again, off the event loop.
        9. Publish the result (to `reply_to` too) and the log event, then mark the claim done. A retryable
           failure goes to `vlm.jobs.retry` instead (the claim is released), or to `vlm.jobs.dlq` with a
           `retries_exhausted` result.
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
        async with self._claim(job.job_id, owner) as claim:
            if claim.answered:
                self.metrics.duplicate.inc()
            else:
                # Steps 3-8.
                served = await self._serve(job, picked_at)
                # Step 9.
                await self._conclude(job, claim, served)
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

    def _claim(self, job_id: str, owner: str) -> ClaimHold:
        """Step 2: the job's claim for an `async with`; `answered` when its result is already published."""
        return self.records.hold(job_id, owner, read_back=self.publisher.published_before)

    async def _serve(self, job: ImageJob, picked_at: datetime) -> Served:
        """Steps 3-8: the output, or the failure that stopped the job. Only `INFRASTRUCTURE` failures raise."""
        served = Served(picked_at)
        try:
            # Step 3.
            served.reply_to = await self._check(job)
            prompt = self._prompt(job)
            schema = await self._off_loop(self._schema, job)
            # Step 4.
            images = await self._load(job)
            served.image_sizes = [image.size for image in images]
            # Step 5.
            served.vision_tokens = vision_tokens(served.image_sizes, self.settings)
            # Steps 6-7.
            served.engine = await self._infer_with_lease(job, served, images, prompt, schema)
            # Step 8.
            served.output = await self._off_loop(validated_output, served.engine, job, self.box_field)
        except JobFailure as failure:
            served.failure = failure
        except INFRASTRUCTURE:
            raise
        except Exception as exc:
            log.exception("job %s: a defect met this job; it gets an internal_error", job.job_id)
            served.failure = JobFailure("internal_error", f"{type(exc).__name__}: {exc}")
        return served

    async def _check(self, job: ImageJob) -> str | None:
        """Step 3 up to the schema; returns the `reply_to` topic accepted for the result's copy."""
        deadline_s = seconds_left(job.deadline, utc_now())
        if deadline_s is not None and deadline_s <= 0:
            raise JobFailure("deadline_exceeded", f"the deadline {job.deadline} passed before the job was picked up")
        limit = self.settings.engine.limit_images_per_prompt
        if len(job.images) > limit:
            raise JobFailure("invalid_message", f"{len(job.images)} images; the engine takes at most {limit} per job")
        if job.reply_to is None:
            return None
        if job.reply_to in TOPICS:
            raise JobFailure("invalid_message", f"reply_to {job.reply_to!r} is a vlmflow topic, not a reply topic")
        prefixes = self.settings.worker.reply_to_prefixes
        if not job.reply_to.startswith(tuple(prefixes)):
            allowed = ", ".join(repr(prefix) for prefix in prefixes) or "none (reply_to is turned off)"
            raise JobFailure(
                "invalid_message", f"reply_to {job.reply_to!r} does not start with an allowed prefix: {allowed}"
            )
        if not await self.publisher.topic_exists(job.reply_to):
            raise JobFailure("invalid_message", f"reply_to topic {job.reply_to!r} does not exist")
        return job.reply_to

    async def _off_loop(self, check: Callable[..., T], *args: Any) -> T:
        """`check(*args)` in a check thread, so a slow check cannot stall heartbeats and renewals; bounded by
        `CHECK_TIMEOUT_S` (a check past it goes on in its thread, and the job fails)."""
        future = asyncio.get_running_loop().run_in_executor(self._checks, check, *args)
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                return await future
        except TimeoutError:
            raise JobFailure(
                "invalid_output_schema", f"checking against the schema took over {CHECK_TIMEOUT_S} s"
            ) from None

    async def _load(self, job: ImageJob) -> list[LoadedImage]:
        try:
            return await load_images(job.images, self.settings, self.store)
        except ImageError as exc:
            raise JobFailure(exc.code, str(exc)) from None
        except Exception as exc:
            log.exception("job %s: image loading failed unexpectedly", job.job_id)
            raise JobFailure("internal_error", f"loading images: {type(exc).__name__}: {exc}") from None

    def _prompt(self, job: ImageJob) -> str:
        """The task's prompt, within the room the engine keeps for each sequence's text (`workers.limits`)."""
        try:
            prompt = task_prompt(job, self.box_field)
            check_job(self.limits, prompt, job.max_output_tokens)
        except MissingPrompt as exc:
            raise JobFailure("invalid_message", str(exc)) from None
        except TooManyTokens as exc:
            raise JobFailure(exc.code, str(exc)) from None
        return prompt

    def _schema(self, job: ImageJob) -> dict[str, Any]:
        try:
            return task_schema(job.task, job.output_schema, box_field=self.box_field)
        except InvalidTaskSchema as exc:
            raise JobFailure("invalid_output_schema", str(exc)) from None

    async def _infer_with_lease(
        self, job: ImageJob, served: Served, images: list[LoadedImage], prompt: str, schema: dict[str, Any]
    ) -> EngineOutput:
        """Steps 6-7: lease the job's tokens, waiting in line up to the budget's wait or the job's deadline, and
        run the engine while holding them. Not getting the lease, or losing it, is the job's failure."""
        cost = served.vision_tokens
        wait_s = self.settings.budget.wait_timeout_s
        deadline_s = seconds_left(job.deadline, utc_now())
        bounded_by_deadline = deadline_s is not None and deadline_s < wait_s
        timeout_s = min(wait_s, deadline_s) if deadline_s is not None else wait_s
        self.metrics.vision_tokens.observe(cost)
        self.metrics.waiting.inc()
        started = time.monotonic()
        waiting = True
        try:
            # Step 6.
            async with self.budget.hold(cost, f"{self.worker_id}/{job.job_id}", timeout_s=timeout_s):
                served.admission_s = time.monotonic() - started
                waiting = False
                self.metrics.waiting.dec()
                self.metrics.admission_seconds.observe(served.admission_s)
                self.metrics.admitted.inc()
                # Step 7.
                inference_started = time.monotonic()
                engine_output = await self._infer(job, images, prompt, schema)
                served.inference_s = time.monotonic() - inference_started
        except CostExceedsCapacity as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise JobFailure(exc.code, str(exc)) from None
        except BudgetTimeout as exc:
            code: ErrorCode = "deadline_exceeded" if bounded_by_deadline else exc.code
            self.metrics.rejected.labels(code).inc()
            raise JobFailure(code, str(exc)) from None
        except LeaseLost as exc:
            raise JobFailure(exc.code, str(exc)) from None
        finally:
            if waiting:
                self.metrics.waiting.dec()
                self.metrics.admission_seconds.observe(time.monotonic() - started)
        self.metrics.inference_seconds.observe(served.inference_s)
        return engine_output

    async def _infer(
        self, job: ImageJob, images: list[LoadedImage], prompt: str, schema: dict[str, Any]
    ) -> EngineOutput:
        request = EngineRequest(
            prompt=prompt,
            images=[image.image for image in images],
            json_schema=schema,
            max_tokens=job.max_output_tokens,
            images_at_final_size=True,
        )
        deadline_s = seconds_left(job.deadline, utc_now())
        try:
            async with asyncio.timeout(deadline_s):
                return await self.engine.generate(request)
        except TimeoutError:
            raise JobFailure("deadline_exceeded", f"the deadline {job.deadline} passed during inference") from None
        except Exception as exc:
            log.exception("job %s: engine failed", job.job_id)
            raise JobFailure("engine_error", f"{type(exc).__name__}: {exc}") from None

    # -- step 9 ---------------------------------------------------------------------------------------------------
    async def _conclude(self, job: ImageJob, claim: ClaimHold, served: Served) -> None:
        """Step 9: publish the answer, or hand the job to the retry or dead-letter topic (its claim is then
        given back, for the next attempt)."""
        if served.failure is None:
            await self._publish(job, claim, served)
            return
        error = served.failure.error()
        decision = decide(job, error, self.settings.worker, utc_now())
        if decision.route == "answer" or decision.record is None:
            await self._publish(job, claim, served)
            return
        topic = Topic.JOBS_RETRY if decision.route == "retry" else Topic.JOBS_DLQ
        await self.publisher.send(topic, decision.record, key=job.job_id.encode())
        if decision.route == "retry":
            self.metrics.retried.inc()
            return
        self.metrics.dead_lettered.inc()
        final = replace(served, failure=JobFailure("retries_exhausted", exhausted(error, job.attempt + 1).message))
        await self._publish(job, claim, final)

    async def _publish(self, job: ImageJob, claim: ClaimHold, served: Served) -> PublishOutcome:
        result = job_result(job, served, model=self.model_name, worker=self.worker_id)
        return await self.publisher.publish(
            claim, result, job=job, reply_to=served.reply_to, image_sizes=served.image_sizes
        )

    async def _answer_undecodable(self, record: ConsumerRecord, invalid: InvalidMessage, owner: str) -> None:
        """Step 1 for a record that is no job: an error result keyed by the record key when that is a job id;
        otherwise nobody can be answered, so it is only counted and logged."""
        job_id = record.key.decode(errors="replace") if record.key else ""
        try:
            result = JobResult(
                job_id=job_id,
                status="error",
                error=JobError(code=invalid.code, message=str(invalid)[:MAX_ERROR_MESSAGE_CHARS]),
                worker=self.worker_id,
            )
        except ValueError:
            log.warning(
                "%s[%d]@%d: %s; no job id in the key, no result", record.topic, record.partition, record.offset, invalid
            )
            self.metrics.errors.labels(invalid.code).inc()
            return
        async with self._claim(job_id, owner) as claim:
            if claim.answered:
                self.metrics.duplicate.inc()
            else:
                await self.publisher.publish(claim, result, job=None, reply_to=None, image_sizes=[])
