"""The raw-log stage of `vlmflow streams`: vlm.logs.raw → screen, dedupe, mine, queue → normalized | rejected | hard.

    vlm.logs.raw ──▶ screen (normalize, rules, PII) ──▶ dedupe (Redis) ──▶ vlm.logs.normalized
                      └─ rejected with code/rule ──────┴─ duplicate ──▶ vlm.logs.rejected
                     normalized ──▶ mine (signals, score) ──▶ correction queue (Redis) + vlm.cases.hard

It is the hot path of the flywheel, so it runs on aiokafka directly rather than as a Faust agent: Faust's
per-event machinery cost more than screening itself (docs/flywheel.md has the measurements). It runs inside the
Faust worker as a `mode.Service`, in a consumer group of its own (`<app_id>`), and owns its offsets.

One batch (`_handle`), in order:

    1. ledger: skip records whose outputs are already written (a redelivery after a crash or a rebalance); of an
       unfinished batch, find which outputs reached the broker (an outcome may have, its hard case not); wait
       while another member still writes an unfinished batch of the same partition
    2. screen every other record (pure), sight the normalized ones in Redis (dedupe, tries), mine hard cases
    3. queue the hard cases (idempotent per case id)
    4. ledger: begin (the batch's offsets, the outputs' known ends) and take the partitions' writer leases
    5. produce every output with its source header, wait for every acknowledgement
    6. ledger: finish (giving the leases back); commit the batch's offsets

Delivery: each raw record's outputs are written once (`streams.flywheel.ledger`), whatever crashes between the
steps; Redis effects are idempotent. Failure policy: a defect met while screening a record becomes that record's
`internal_error` rejection; Redis errors are retried with backoff (the stage pauses); a produce failure or a lost
writer lease takes the batch again from step 1, which finds what was written; so does a partition whose ledger
entry another member wrote meanwhile, while this member still holds the partition. Only a failure of the stage's
own setup stops the worker.

Watching itself (`_watch`, every `WATCH_INTERVAL_S`): a partition held for `FETCH_STALL_S` without one fetch
answer means the consumer's fetcher is stuck (aiokafka waits without a limit for a committed offset, and one such
wait holds up every fetch from that broker), so the consumer is replaced: it leaves the group and a new one joins,
and the records after the last commit are fetched again (the ledger keeps their outputs unique). A loop that has
not come round for `STALL_WARN_S` is logged with the chain of awaits it sits in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, IllegalStateError, KafkaError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition
from mode import Service

from schemas.connections import aiokafka_options, redis_client
from schemas.settings import Settings
from schemas.topics import Topic
from streams.flywheel.dedupe import RETRY_BACKOFF_S, SeenStore, retrying
from streams.flywheel.ledger import (
    Ledger,
    LedgerEntry,
    ScanStalled,
    WriterLease,
    WriterLost,
    find_written,
    output_partition_text,
    plan,
)
from streams.flywheel.metrics import StreamsMetrics
from streams.flywheel.outputs import SOURCE_HEADER, Output, partition_of
from streams.flywheel.screen import MAX_REQUEST_BYTES
from streams.flywheel.screening import RawRecord, Screened, Screener, adjusted, build_name
from streams.review.queue import CorrectionQueue

log = logging.getLogger(__name__)

AGENT = "raw"
"""The stage's name in metrics."""
BATCH_MAX = 2000
"""Records taken at once: dedupe, the ledger and the queue cost one Redis round trip per batch, not per log, and
each batch waits once for the broker's acknowledgements and commits once (together 10-35 ms a batch, measured)."""
POLL_TIMEOUT_MS = 200
PRODUCER_LINGER_MS = 5
PRODUCER_BATCH_BYTES = 256 * 1024
"""The producer's batch size per partition. aiokafka holds one batch per partition until it is sent, so with its
default (16 kB, about 15 outputs) a batch's outputs went out a linger at a time: 40-150 ms of a 2,000-record
batch, against 25-65 ms with this size (measured)."""
SCAN_STALL_TIMEOUT_S = 60.0
BUSY_POLL_S = 0.2
"""How often step 1 looks again at a partition whose unfinished batch another member is still writing."""
STOP_TIMEOUT_S = 30.0
"""On stop, how long the batch in progress may take to finish before the stage is cancelled."""
OUTPUT_TOPICS = (Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED, Topic.CASES_HARD)
OUTCOME_TOPICS = frozenset({Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED})
"""Where a raw record's one outcome goes (its hard case, if any, goes to `vlm.cases.hard` besides)."""
WATCH_INTERVAL_S = 10.0
FETCH_STALL_S = 60.0
"""A partition held this long without one fetch answer (a healthy fetcher answers within a second) is stuck."""
STALL_WARN_S = 120.0
"""A fetch-and-handle round this long is logged with where it waits."""


@dataclass
class Counts:
    """What this worker did since it started, for the progress line."""

    normalized: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    hard_cases: int = 0
    redelivered: int = 0
    golden: Counter[str] = field(default_factory=Counter)
    skipped: int = 0

    def line(self) -> str:
        reasons = ", ".join(f"{code} {number}" for code, number in self.rejected.most_common())
        golden = ", ".join(f"{step} {number}" for step, number in sorted(self.golden.items()))
        return (
            f"normalized {self.normalized}, rejected {sum(self.rejected.values())}"
            f"{f' ({reasons})' if reasons else ''}, hard cases {self.hard_cases} (queued), "
            f"redelivered and skipped {self.redelivered}, golden corrections: {golden or 'none'}, "
            f"undecodable skipped {self.skipped}"
        )


@dataclass
class Batch:
    """Raw records fetched together, and their screening (running in the worker processes)."""

    records: list[RawRecord]
    screening: asyncio.Future[list[Screened]]
    generation: int

    def only(self, tps: set[TopicPartition]) -> Batch:
        """The records of `tps`, with their screening."""
        keep = [i for i, record in enumerate(self.records) if TopicPartition(record.topic, record.partition) in tps]

        async def screened() -> list[Screened]:
            every = await self.screening
            return [every[i] for i in keep]

        return Batch([self.records[i] for i in keep], asyncio.ensure_future(screened()), self.generation)


class RawLogStage(Service):
    """The raw-log stage as a service of the Faust worker (started and stopped with it)."""

    def __init__(self, settings: Settings, counts: Counts, metrics: StreamsMetrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.counts = counts
        self.metrics = metrics
        self.member = f"{settings.kafka.client_id}-{uuid.uuid4().hex[:8]}"
        self.batch_lock = asyncio.Lock()
        self._finished = asyncio.Event()
        self._ends: dict[TopicPartition, int] = {}
        """output partition -> an offset at or below its end (acknowledgements move it up)"""
        self._partitions: dict[str, int] = {}
        self._ahead: Batch | None = None
        """The batch fetched last, being screened while the one before it is handled."""
        self._generation = 0
        """Bumped when partitions move: a batch fetched under an older generation is dropped."""
        self._assigned_at: dict[TopicPartition, float] = {}
        """held partition -> when it was assigned (monotonic)"""
        self._replacement = ""
        """Why the consumer must be replaced (`replace_consumer`; `_run` does it); empty when it need not be."""
        self._round_started = self._stall_warned_at = time.monotonic()
        self._run_task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        settings, streams = self.settings, self.settings.streams
        options = aiokafka_options(settings.kafka)
        session_ms = settings.kafka.session_timeout_ms
        self.consumer = self._new_consumer()
        self.producer = AIOKafkaProducer(
            **options,
            acks="all",
            linger_ms=PRODUCER_LINGER_MS,
            max_request_size=MAX_REQUEST_BYTES,
            max_batch_size=PRODUCER_BATCH_BYTES,
        )
        self.scanner = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False)
        self.redis = redis_client(settings)
        self.seen = SeenStore(
            self.redis,
            prefix=f"vlmflow:{{streams:{streams.app_id}}}",
            dedupe_ttl_s=streams.dedupe_ttl_s,
            retry_window_s=streams.retry_window_s,
        )
        self.ledger = Ledger(self.redis, app_id=streams.app_id, owner=self.member)
        self.writer_ttl_s = session_ms / 1000
        """A writer lease lasts a session timeout: a member the group would find dead has stopped writing too."""
        self.queue = CorrectionQueue(self.redis, streams.review_queue)
        self.screener = Screener(streams, streams.screen_processes)
        processes = self.screener.processes
        where = f"{processes} processes" if processes else "its own process"
        log.info("raw-log stage screens on %s, %s", where, build_name())
        await self.producer.start()
        await self.scanner.start()
        for topic in OUTPUT_TOPICS:
            self._partitions[topic] = len(await self.producer.partitions_for(topic))
        outputs = [TopicPartition(t, p) for t in OUTPUT_TOPICS for p in range(self._partitions[t])]
        # NOTE: ListOffsets "latest" is a lower bound on the local broker, which is all a scan start needs.
        self._ends = dict(await self.scanner.end_offsets(outputs))
        await self._join(self.consumer)

    def _new_consumer(self) -> AIOKafkaConsumer:
        session_ms = self.settings.kafka.session_timeout_ms
        return AIOKafkaConsumer(
            **aiokafka_options(self.settings.kafka),
            group_id=self.settings.streams.app_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=BATCH_MAX,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
        )

    async def _join(self, consumer: AIOKafkaConsumer) -> None:
        consumer.subscribe([Topic.LOGS_RAW], listener=_Rebalance(self))
        await consumer.start()

    @Service.task
    async def _run(self) -> None:
        """Fetch a batch and start screening it, then handle the batch before it: the worker processes screen
        while this process waits for Redis and the broker."""
        self._run_task = asyncio.current_task()
        try:
            while not self.should_stop:
                self._round_started = time.monotonic()
                if self._replacement:
                    await self._replace(self._replacement)
                consumer = self.consumer
                try:
                    fetched = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=BATCH_MAX)
                except ConsumerStoppedError:
                    if consumer is self.consumer:
                        raise
                    continue
                batch = self._screening(fetched) if fetched else None
                async with self.batch_lock:
                    if self._ahead is not None:
                        await self._handle_until_written(self._ahead)
                    self._ahead = batch
                await self._update_lag()
            async with self.batch_lock:
                if self._ahead is not None:
                    await self._handle_until_written(self._ahead)
                    self._ahead = None
        finally:
            self._finished.set()

    def _screening(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> Batch:
        records = [_raw_record(record) for records in fetched.values() for record in records]
        return Batch(records, asyncio.ensure_future(self.screener.screen(records)), self._generation)

    async def on_stop(self) -> None:
        try:
            await asyncio.wait_for(self._finished.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("the raw-log stage did not finish its batch within %.0f s", STOP_TIMEOUT_S)
        await self.consumer.stop()
        await self.producer.stop()
        await self.scanner.stop()
        await self.redis.aclose()
        self.screener.close()

    def assigned(self, partitions: set[TopicPartition]) -> None:
        now = time.monotonic()
        self._assigned_at.update((tp, now) for tp in partitions)

    def revoked(self, partitions: set[TopicPartition]) -> None:
        """Called with the batch lock held when partitions move: the batch fetched ahead is dropped (its records
        are not committed; their owner after the rebalance fetches them again)."""
        self._generation += 1
        self._ahead = None
        for tp in partitions:
            self._assigned_at.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(tp.topic, str(tp.partition))

    @Service.timer(WATCH_INTERVAL_S)
    async def _watch(self) -> None:
        now = time.monotonic()
        held = self.consumer.assignment()
        stuck = never_fetched(
            {tp: since for tp, since in self._assigned_at.items() if tp in held},
            self.consumer.highwater,
            now,
            FETCH_STALL_S,
        )
        if stuck and not self._replacement:
            where = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in stuck)
            why = f"no fetch answer for {where} within {FETCH_STALL_S:.0f} s of their assignment"
            log.warning("the raw-log stage's consumer is stuck (%s); replacing it", why)
            self.replace_consumer(why)
        waited = now - self._round_started
        task = self._run_task
        if waited >= STALL_WARN_S and now - self._stall_warned_at >= STALL_WARN_S and task and not task.done():
            self._stall_warned_at = now
            log.warning("the raw-log stage has not come round for %.0f s; it waits in %s", waited, awaits_of(task))

    def replace_consumer(self, why: str) -> None:
        """Have the loop replace the consumer before its next fetch (it alone fetches, so it alone may)."""
        self._replacement = why

    async def _replace(self, why: str) -> None:
        """A new consumer in place of a stuck one: the old one leaves the group (not holding the batch lock: its
        leaving may call the rebalance listener), the new one joins and fetches from the last commit."""
        old = self.consumer
        async with self.batch_lock:
            self.revoked(old.assignment())
            self.consumer = self._new_consumer()
        await old.stop()
        await self._join(self.consumer)
        self._replacement = ""
        self.metrics.consumer_replaced.inc()
        log.info("the raw-log stage's consumer was replaced (%s)", why)

    async def _handle_until_written(self, batch: Batch) -> None:
        """`_handle`, taken again after a produce failure or a lost writer lease (step 1 then finds what was
        written), and for the partitions whose ledger entry another member wrote meanwhile while this member
        still holds them (their records must not be left behind: the consumer is past them)."""
        if batch.generation != self._generation:
            return
        for attempt in count(1):
            try:
                again = await self._handle(batch) & self.consumer.assignment()
            except (KafkaError, ScanStalled, WriterLost) as exc:
                wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S)) - 1]
                log.warning("raw batch failed (try %d, again in %.1f s): %s", attempt, wait, exc)
                self.metrics.kafka_retries.inc()
                await asyncio.sleep(wait)
                continue
            if not again:
                return
            log.info("taking the batch of %s again: its ledger entry changed meanwhile", sorted(map(str, again)))
            batch = batch.only(again)

    async def _handle(self, batch: Batch) -> set[TopicPartition]:
        """One batch; returns the partitions not written because their ledger entry changed meanwhile."""
        started = time.monotonic()
        self.metrics.records_in.labels(AGENT).inc(len(batch.records))
        by_tp: dict[TopicPartition, list[int]] = defaultdict(list)
        for index, record in enumerate(batch.records):
            by_tp[TopicPartition(record.topic, record.partition)].append(index)
        # Step 1: what the ledger says is written already.
        entries = await self._read_ledger(list(by_tp))
        keep: list[int] = []
        found: dict[int, set[str]] = {}
        """batch index -> the output topics of that record an unfinished batch already wrote"""
        for tp, indexes in by_tp.items():
            written = await self._written(tp, entries[tp])
            done = entries[tp].done
            for i in indexes:
                if batch.records[i].offset > done:
                    keep.append(i)
                    if topics := written.get(batch.records[i].offset):
                        found[i] = topics
        skipped = len(batch.records) - len(keep) + sum(1 for topics in found.values() if topics & OUTCOME_TOPICS)
        self.counts.redelivered += skipped
        self.metrics.redelivered.labels(AGENT).inc(skipped)
        # Step 2: screened and mined by the worker processes (started when fetched), dedupe here.
        screened_all = await batch.screening
        keep.sort()
        records = [batch.records[i] for i in keep]
        befores = [found.get(i, set()) for i in keep]
        screened = await self._dedupe([screened_all[i] for i in keep], records)
        # Step 3: queue the hard cases.
        cases = [(item.case_id, item.case_priority, item.case) for item in screened if item.case and item.case_id]
        await self._redis(lambda: self.queue.enqueue_encoded(cases), "correction queue")
        # Step 4: begin.
        spans: dict[TopicPartition, tuple[int, int]] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first, _ = spans.get(tp, (record.offset, record.offset))
            spans[tp] = (first, record.offset)
        ends = {output_partition_text(tp): offset for tp, offset in self._ends.items()}
        begun = {tp: self.ledger.begun(entries[tp], spans[tp], ends) for tp in spans}
        taken_at = asyncio.get_running_loop().time()
        owned = await self._redis(
            lambda: self.ledger.write({tp: (entries[tp], begun[tp]) for tp in spans}, writer_ttl_s=self.writer_ttl_s),
            "ledger",
        )
        async with WriterLease(self.ledger, owned, self.writer_ttl_s, taken_at) as lease:
            # Step 5: produce, wait for every acknowledgement.
            sent = [
                (item, record, before)
                for item, record, before in zip(screened, records, befores, strict=True)
                if TopicPartition(record.topic, record.partition) in owned
            ]
            outputs = [output for item, record, before in sent for output in _outputs(item, record, before)]
            await self._produce(outputs, lease)
            # Step 6: finish, commit.
            finished = {tp: (begun[tp], self.ledger.finished(begun[tp])) for tp in owned}
            written = await self._redis(lambda: self.ledger.write(finished), "ledger")
        self._count(
            item
            for item, record, before in sent
            if TopicPartition(record.topic, record.partition) in written and not before & OUTCOME_TOPICS
        )
        unwritten = set(spans) - written
        # NOTE: a partition with nothing left to write (every record skipped) is committed as well.
        await self._commit({tp: batch.records[ixs[-1]].offset + 1 for tp, ixs in by_tp.items() if tp not in unwritten})
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        return unwritten

    async def _read_ledger(self, tps: list[TopicPartition]) -> dict[TopicPartition, LedgerEntry]:
        """The ledger entries of `tps`, once no other member is still writing an unfinished batch of them."""

        async def read() -> tuple[dict[TopicPartition, LedgerEntry], dict[TopicPartition, str]]:
            entries = await self.ledger.read(tps)
            return entries, await self.ledger.busy(entries)

        waited_since = time.monotonic()
        logged_at = 0.0
        while True:
            entries, busy = await self._redis(read, "ledger")
            if not busy:
                return entries
            now = time.monotonic()
            if now - logged_at >= self.writer_ttl_s:
                logged_at = now
                writers = ", ".join(f"{owner} ({tp.topic}[{tp.partition}])" for tp, owner in sorted(busy.items()))
                log.info("waiting %.0f s so far for %s to finish writing", now - waited_since, writers)
            await asyncio.sleep(BUSY_POLL_S)

    async def _written(self, tp: TopicPartition, entry: LedgerEntry) -> dict[int, set[str]]:
        """The offsets of an unfinished batch of `tp` with outputs on the broker -> the topics holding them (empty
        when there is no such batch)."""
        span = plan(entry).look_up
        if span is None:
            return {}
        starts = {}
        for text, offset in entry.scan_from.items():
            topic, _, partition = text.rpartition(":")
            starts[TopicPartition(topic, int(partition))] = offset
        found = await find_written(
            self.scanner, starts, tp.topic, tp.partition, span, stall_timeout_s=SCAN_STALL_TIMEOUT_S
        )
        log.info("%s: an unfinished batch (offsets %d-%d) had %d records written", tp, span[0], span[1], len(found))
        return found

    async def _dedupe(self, screened: list[Screened], records: list[RawRecord]) -> list[Screened]:
        """One Redis call sighting the normalized logs; the few that dedupe changes are adjusted here.
        NOTE: not on the screening pool, where they would wait behind the next batch's screening (measured: the
        batch took 120 ms longer)."""
        passed = [i for i, item in enumerate(screened) if item.kind == "normalized"]
        sightings = await self.seen.sight(
            [(*_keys(screened[i]), records[i].source_text) for i in passed],
            on_retry=lambda: self.metrics.redis_retries.labels("dedupe").inc(),
        )
        adjusted_all = list(screened)
        for i, sighting in zip(passed, sightings, strict=True):
            adjusted_all[i] = adjusted(screened[i], records[i], sighting, self.screener.rules)
        return adjusted_all

    async def _produce(self, outputs: list[Output], lease: WriterLease) -> None:
        """Write `outputs` in one batch per output partition and wait for every acknowledgement (while the writer
        lease holds: each send checks it). On a failure every send already made settles before it is raised:
        the lease is given back only then, so that no scan by this member or another misses a late write."""
        by_partition: dict[TopicPartition, list[Output]] = defaultdict(list)
        for output in outputs:
            tp = TopicPartition(output.topic, partition_of(output.key_hash, self._partitions[output.topic]))
            by_partition[tp].append(output)
        pending: list[tuple[TopicPartition, BatchBuilder, asyncio.Future[RecordMetadata]]] = []

        async def send(tp: TopicPartition, batch: BatchBuilder) -> None:
            lease.check()
            pending.append((tp, batch, await self.producer.send_batch(batch, tp.topic, partition=tp.partition)))

        try:
            for tp, items in by_partition.items():
                batch = self.producer.create_batch()
                for output in items:
                    headers = [(SOURCE_HEADER, output.source)]
                    if batch.append(key=output.key, value=output.value, timestamp=None, headers=headers) is None:
                        await send(tp, batch)
                        batch = self.producer.create_batch()
                        batch.append(key=output.key, value=output.value, timestamp=None, headers=headers)
                await send(tp, batch)
            for tp, batch, future in pending:
                metadata = await future
                self._ends[tp] = max(self._ends.get(tp, 0), metadata.offset + batch.record_count())
        except BaseException:
            await settled(future for _, _, future in pending)
            raise
        for tp, items in by_partition.items():
            self.metrics.records_out.labels(AGENT, tp.topic).inc(len(items))

    def _count(self, items: Iterable[Screened]) -> None:
        """Progress counts and metrics of written outcomes; each metric is moved once per batch (a labelled child's
        lookup costs more than counting)."""
        rejected: Counter[tuple[str, str]] = Counter()
        normalized = hard_cases = 0
        for item in items:
            if item.kind == "rejected":
                rejected[item.code or "", item.rule or ""] += 1
            else:
                normalized += 1
                hard_cases += item.case is not None
        self.counts.normalized += normalized
        self.counts.hard_cases += hard_cases
        self.metrics.hard_cases.inc(hard_cases)
        for (code, rule), number in rejected.items():
            self.counts.rejected[code] += number
            self.metrics.rejections.labels(code, rule).inc(number)

    async def _commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit; a partition that moved meanwhile is the new owner's (the ledger keeps its outputs unique)."""
        if not offsets:
            return
        try:
            await self.consumer.commit(dict(offsets))
        except (CommitFailedError, IllegalStateError) as exc:
            log.info("commit skipped, the group rebalanced: %s", exc)

    async def _redis(self, operation: Any, what: str) -> Any:
        return await retrying(
            operation, f"Redis ({what})", on_retry=lambda: self.metrics.redis_retries.labels(what).inc()
        )

    async def _update_lag(self) -> None:
        """Lag per held partition: the high watermark of the last fetch minus the next offset to handle."""
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self.consumer.position(tp)
            except IllegalStateError:
                continue
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))


class _Rebalance(ConsumerRebalanceListener):
    """Lets the batch in progress finish (and commit) before partitions move."""

    def __init__(self, stage: RawLogStage):
        self.stage = stage

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.stage.batch_lock:
            self.stage.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.stage.assigned(assigned)
        log.info("raw-log stage holds %s", ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)))


def never_fetched(
    assigned_at: Mapping[TopicPartition, float],
    highwater: Callable[[TopicPartition], int | None],
    now: float,
    limit_s: float,
) -> list[TopicPartition]:
    """The partitions held for `limit_s` or more whose fetches never answered (no high watermark known)."""
    return sorted(tp for tp, since in assigned_at.items() if now - since >= limit_s and highwater(tp) is None)


async def settled(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Wait until every future is done, whatever each ends with (what they raise is for their owner to read)."""
    waiting = [future for future in futures if not future.done()]
    if waiting:
        await asyncio.wait(waiting)


def awaits_of(task: asyncio.Task[Any]) -> str:
    """Where `task` waits: its chain of awaits, outermost first, as `function:line` (for a stall warning)."""
    steps: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        if isinstance(awaited, asyncio.Task):
            awaited = awaited.get_coro()
            continue
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            steps.append(type(awaited).__name__)
            break
        steps.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " -> ".join(steps)


def _raw_record(record: ConsumerRecord) -> RawRecord:
    return RawRecord(record.topic, record.partition, record.offset, record.value)


def _keys(item: Screened) -> tuple[str, str]:
    assert item.content_hash is not None and item.request_fingerprint is not None, "normalized logs carry them"
    return item.content_hash, item.request_fingerprint


def _outputs(item: Screened, record: RawRecord, written: set[str]) -> list[Output]:
    """The records one raw record becomes (keyed by log id on all three topics, as the registry says), less those
    an unfinished batch already wrote (`written`: their topics). Its outcome is written once whichever outcome
    topic holds it; its hard case goes apart, as a killed member may have written one and not the other."""
    source = record.source_text.encode()
    key = item.log_id.encode()
    outputs = []
    if written.isdisjoint(OUTCOME_TOPICS):
        topic = Topic.LOGS_NORMALIZED if item.kind == "normalized" else Topic.LOGS_REJECTED
        outputs.append(Output(topic, key, item.key_hash, item.value, source))
    if item.case is not None and Topic.CASES_HARD not in written:
        outputs.append(Output(Topic.CASES_HARD, key, item.key_hash, item.case, source))
    return outputs
