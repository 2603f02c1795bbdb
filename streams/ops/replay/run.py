"""Replay a window of a topic into a topic: exactly the window's records, once each, per partition in order.

Window. Each source partition is scanned over `[start, end)`: `start` is the log start, a `--from-offset`, or
where the broker's time index says `--from` begins (only ever a shortcut forward; on the local broker that
lookup answers 0); `end` is a `--to-offset` or the fetch high watermark when the replay began (never the
ListOffsets "latest" answer, wrong on the local broker). Every record read is then kept only if its timestamp
lies in `[from, to)` and the filter matches, so the window is exact whatever the broker's lookups say. Records
keep key, value, headers and timestamp, and gain `x-replay-id` and `x-replay-origin-{topic,partition,offset}`
(any `x-replay-*` headers from an earlier replay are replaced). A record goes to the destination partition with
its source partition's number when the destination has enough partitions, otherwise the producer places it by
key.

Delivery, in this order, so a replay can be killed at any point and resumed without sending a record twice:

1. Send records through an idempotent producer (no duplicates or reordering from the producer's own retries).
2. Every second: flush the producer and check that every send was acknowledged.
3. Only then write the checkpoint atomically: per source partition the next offset to look at, per destination
   partition the acknowledged end.
4. On resume, the checkpoint is trusted for everything before its offsets. Records sent after it (the crash
   came between a send and the next checkpoint) may or may not have reached the destination, so the resume
   first reads each destination partition from the checkpoint's mark to its high watermark and collects the
   origin partition and offset of every record carrying this replay's id; those are skipped, the rest are sent.

A replay killed with SIGKILL therefore delivers every record of the window exactly once after a resume. The
one gap: a request already on the wire when the process died that the broker appends after the resume's scan
(only if the resume starts within the broker's request handling time of the kill).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.producer.future import RecordMetadata

from schemas.settings import Settings
from streams.cluster import OffsetRange, RangeReader, high_watermarks, open_consumer, topic_partitions
from streams.ops import filter_expr
from streams.ops.rate_limit import RateLimiter
from streams.ops.replay.checkpoint import ReplayCheckpoint, ReplayCounts, save_checkpoint
from streams.ops.replay.plan import ReplayError, ReplayPlan, ReplayRequest, new_replay_id, plan_replay

REPLAY_ID = "x-replay-id"
ORIGIN_TOPIC = "x-replay-origin-topic"
ORIGIN_PARTITION = "x-replay-origin-partition"
ORIGIN_OFFSET = "x-replay-origin-offset"
REPLAY_HEADER_PREFIX = "x-replay-"

CHECKPOINT_EVERY_S = 1.0
DRY_RUN_SAMPLES = 5
SKIPPED_SAMPLES = 20
"""Unreadable records a run reports by position (all of them are counted)."""

log = logging.getLogger(__name__)

Progress = Callable[[ReplayCounts], None]


@dataclass(frozen=True)
class SkippedRecord:
    """A record in the window that the filter could not read: skipped, never sent, and reported."""

    partition: int
    offset: int
    reason: str


@dataclass
class ReplayOutcome:
    checkpoint: ReplayCheckpoint
    sent_now: int
    """Sent by this run (in a dry run: would be sent)."""
    elapsed_s: float
    dry_run: bool
    samples: list[ConsumerRecord] = field(default_factory=list)
    """A dry run's first few records that would be sent."""
    unreadable: list[SkippedRecord] = field(default_factory=list)
    """This run's first `SKIPPED_SAMPLES` records the filter could not read (the checkpoint counts them all)."""

    @property
    def rate(self) -> float:
        return self.sent_now / self.elapsed_s if self.elapsed_s > 0 else 0.0


def start_replay(
    settings: Settings, admin: KafkaAdminClient, request: ReplayRequest, *, now: datetime, dry_run: bool
) -> ReplayCheckpoint:
    """Plan a new replay against the cluster; write its first checkpoint unless this is a dry run."""
    window = request.window(int(now.timestamp() * 1000))
    source_partitions = topic_partitions(admin, request.source)
    destination_partitions = topic_partitions(admin, request.destination)
    selected = request.selected_partitions(source_partitions)
    timeout_s = settings.kafka.request_timeout_ms / 1000
    consumer = open_consumer(settings)
    try:
        tps = [TopicPartition(request.source, partition) for partition in selected]
        ends = high_watermarks(consumer, tps, timeout_s=timeout_s)
        beginnings = consumer.beginning_offsets(tps)
        floors = {}
        if window.from_ms is not None:
            found = consumer.offsets_for_times({tp: window.from_ms for tp in tps})
            floors = {tp.partition: answer.offset for tp, answer in found.items() if answer is not None}
        marks = {}
        if not dry_run:
            destination = [TopicPartition(request.destination, partition) for partition in destination_partitions]
            marks = {
                tp.partition: end for tp, end in high_watermarks(consumer, destination, timeout_s=timeout_s).items()
            }
    finally:
        consumer.close()
    plan = plan_replay(
        request,
        replay_id=new_replay_id(now),
        now=now,
        source_partitions=source_partitions,
        beginnings={tp.partition: offset for tp, offset in beginnings.items()},
        ends={tp.partition: offset for tp, offset in ends.items()},
        time_floors=floors,
        destination_partitions=len(destination_partitions),
    )
    checkpoint = ReplayCheckpoint(
        plan=plan,
        next_offsets={partition: offsets.start for partition, offsets in plan.ranges.items()},
        destination_marks=marks,
        updated_at=now,
    )
    if not dry_run:
        save_checkpoint(settings, checkpoint)
    return checkpoint


def run_replay(
    settings: Settings,
    checkpoint: ReplayCheckpoint,
    *,
    dry_run: bool = False,
    rate: float | None = None,
    progress: Progress | None = None,
) -> ReplayOutcome:
    """Copy what is left of the plan; see the module docstring for the order of steps that makes it resumable."""
    started = time.monotonic()
    run = _Run(settings, checkpoint, dry_run=dry_run, rate=rate, progress=progress)
    try:
        run.copy()
    except KeyboardInterrupt:
        if not dry_run:
            run.confirm_and_save(done=False)
        raise
    finally:
        run.close()
    return ReplayOutcome(run.checkpoint, run.sent_now, time.monotonic() - started, dry_run, run.samples, run.unreadable)


class _Run:
    """One run of a replay: the consumer, the producer and the books between checkpoints."""

    def __init__(
        self,
        settings: Settings,
        checkpoint: ReplayCheckpoint,
        *,
        dry_run: bool,
        rate: float | None,
        progress: Progress | None,
    ):
        self.settings = settings
        self.checkpoint = checkpoint
        self.plan: ReplayPlan = checkpoint.plan
        self.dry_run = dry_run
        self.progress = progress
        self.limiter = RateLimiter(rate) if rate is not None and not dry_run else None
        self.expression = filter_expr.parse(self.plan.request.filter) if self.plan.request.filter else None
        self.counts = ReplayCounts() if dry_run else checkpoint.counts.model_copy()
        """A real run adds to the checkpoint's books; a dry run counts what is left, from nothing."""
        self.next_offsets = dict(checkpoint.next_offsets)
        self.acked_ends: dict[int, int] = {}
        """destination partition -> one past the highest offset acknowledged since the last checkpoint."""
        self.failures: list[BaseException] = []
        self.sent_now = 0
        self.samples: list[ConsumerRecord] = []
        self.unreadable: list[SkippedRecord] = []
        self.stall_timeout_s = 2 * settings.kafka.request_timeout_ms / 1000
        self.consumer: KafkaConsumer = open_consumer(settings)
        self.producer: KafkaProducer | None = None
        if not dry_run:
            self.producer = KafkaProducer(
                **settings.kafka.client_options(),
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                request_timeout_ms=settings.kafka.request_timeout_ms,
            )

    def close(self) -> None:
        self.consumer.close()
        if self.producer is not None:
            self.producer.close(timeout=self.settings.kafka.request_timeout_ms / 1000)

    def copy(self) -> None:
        delivered = self.delivered_since_checkpoint() if self.checkpoint.destination_marks else set()
        source = self.plan.request.source
        ranges = {
            TopicPartition(source, partition): OffsetRange(self.next_offsets[partition], offsets.end)
            for partition, offsets in self.plan.ranges.items()
        }
        last_saved = time.monotonic()
        for record in RangeReader(self.consumer, ranges, stall_timeout_s=self.stall_timeout_s):
            self.next_offsets[record.partition] = record.offset + 1
            self.counts.scanned += 1
            if self.wanted(record):
                if (record.partition, record.offset) in delivered:
                    self.counts.already_delivered += 1
                else:
                    self.send(record)
            if self.progress is not None:
                self.progress(self.counts)
            if not self.dry_run and time.monotonic() - last_saved >= CHECKPOINT_EVERY_S:
                self.confirm_and_save(done=False)
                last_saved = time.monotonic()
        # NOTE: the reader finishes a partition only once its position reached the end, even past empty offsets.
        self.next_offsets = {partition: offsets.end for partition, offsets in self.plan.ranges.items()}
        if self.dry_run:
            self.checkpoint = self.checkpoint.model_copy(
                update={"counts": self.counts, "next_offsets": self.next_offsets}
            )
        else:
            self.confirm_and_save(done=True)

    def wanted(self, record: ConsumerRecord) -> bool:
        if not self.plan.window.contains(record.timestamp):
            self.counts.outside_window += 1
            return False
        if self.expression is None:
            return True
        try:
            document = filter_expr.document_of(record.value)
        except filter_expr.UnreadableRecord as exc:
            # NOTE: skipped, counted and reported, never retried: the checkpoint moves past it, so a resume does
            # not meet it again.
            self.counts.unreadable += 1
            self.counts.filtered_out += 1
            if len(self.unreadable) < SKIPPED_SAMPLES:
                self.unreadable.append(SkippedRecord(record.partition, record.offset, str(exc)))
                log.warning(
                    "%s[%d]@%d skipped, the filter cannot read it: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
            return False
        if filter_expr.matches(self.expression, document):
            return True
        self.counts.filtered_out += 1
        return False

    def send(self, record: ConsumerRecord) -> None:
        self.counts.sent += 1
        self.sent_now += 1
        if self.producer is None:
            if len(self.samples) < DRY_RUN_SAMPLES:
                self.samples.append(record)
            return
        if self.limiter is not None:
            time.sleep(self.limiter.reserve(time.monotonic()))
        headers = [(key, value) for key, value in record.headers if not key.startswith(REPLAY_HEADER_PREFIX)]
        headers += [
            (REPLAY_ID, self.plan.replay_id.encode()),
            (ORIGIN_TOPIC, record.topic.encode()),
            (ORIGIN_PARTITION, str(record.partition).encode()),
            (ORIGIN_OFFSET, str(record.offset).encode()),
        ]
        future = self.producer.send(
            self.plan.request.destination,
            key=record.key,
            value=record.value,
            headers=headers,
            partition=record.partition if self.plan.keep_partitions else None,
            timestamp_ms=record.timestamp,
        )
        future.add_callback(self.acknowledged)
        future.add_errback(self.failures.append)

    def acknowledged(self, metadata: RecordMetadata) -> None:
        self.acked_ends[metadata.partition] = max(self.acked_ends.get(metadata.partition, 0), metadata.offset + 1)

    def confirm_and_save(self, *, done: bool) -> None:
        """Steps 2 and 3 of the module docstring: flush, check every send, then write the checkpoint."""
        assert self.producer is not None
        self.producer.flush(timeout=self.settings.kafka.request_timeout_ms / 1000)
        if self.failures:
            raise ReplayError(
                f"sending to {self.plan.request.destination} failed ({self.failures[0]!r}); fix the cause and "
                f"resume with --resume {self.plan.replay_id}"
            )
        self.checkpoint = self.checkpoint.model_copy(
            update={
                "next_offsets": dict(self.next_offsets),
                "destination_marks": {**self.checkpoint.destination_marks, **self.acked_ends},
                "counts": self.counts.model_copy(),
                "done": done,
                "updated_at": datetime.now(UTC),
            }
        )
        save_checkpoint(self.settings, self.checkpoint)

    def delivered_since_checkpoint(self) -> set[tuple[int, int]]:
        """(origin partition, origin offset) of this replay's records at the destination after the checkpoint's
        marks: sent by a run that died before it could checkpoint them (step 4 of the module docstring)."""
        destination = self.plan.request.destination
        marks = {TopicPartition(destination, p): offset for p, offset in self.checkpoint.destination_marks.items()}
        ends = high_watermarks(self.consumer, list(marks), timeout_s=self.settings.kafka.request_timeout_ms / 1000)
        ranges = {tp: OffsetRange(marks[tp], ends[tp]) for tp in marks}
        replay_id, source = self.plan.replay_id.encode(), self.plan.request.source.encode()
        delivered = set()
        for record in RangeReader(self.consumer, ranges, stall_timeout_s=self.stall_timeout_s):
            headers = dict(record.headers)
            if headers.get(REPLAY_ID) == replay_id and headers.get(ORIGIN_TOPIC) == source:
                delivered.add((int(headers[ORIGIN_PARTITION]), int(headers[ORIGIN_OFFSET])))
        return delivered
