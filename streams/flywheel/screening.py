"""Screening raw records on the CPUs of the machine: the raw-log stage's CPU-bound work, run in worker processes.

Screening (normalize, rules, PII redaction), encoding the outcome, hashing it for dedupe and mining it are pure and
take most of the stage's time, so the stage hands batches of raw records to a pool of `screen_processes` worker
processes (`Screener`) and keeps the I/O (Kafka, Redis) in its own process. What crosses the process boundary is
plain data: raw bytes in, `Screened` records (encoded bytes, hashes, ids) out, never pydantic models. By default
the pool has one process per CPU the member may use (`screen_process_count`): the stage's own process mostly waits
on Redis and the broker, so on 2 CPUs two screening processes and the stage share them without idling.

A worker decides with `attempt` as the log carries it; when dedupe then finds earlier tries of the same request
(or a duplicate), the stage adjusts that one record itself (`adjusted`, rare). Failure policy: a defect met while
screening one record becomes that record's `internal_error` rejection; a pool that broke (a worker killed) is
replaced and the batch screened again; with `screen_processes` 0 the stage screens in its own process. A worker
process exits when the member does, even one killed with SIGKILL (it watches its parent).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Literal, NamedTuple

from schemas.codec import encode
from schemas.logs import Lineage, NormalizedLog, RejectedLog
from schemas.settings import StreamsSettings
from streams.flywheel.dedupe import Sighting, content_hash, request_fingerprint
from streams.flywheel.mining import hard_case
from streams.flywheel.outputs import murmur2
from streams.flywheel.screen import ScreenConfig, encode_outcome, rejection, screen

log = logging.getLogger(__name__)

CHUNKS_PER_PROCESS = 2
"""A batch is cut into this many chunks per worker process, so that a slow chunk does not idle the others."""
CGROUP_CPU_MAX = (
    "/sys/fs/cgroup/cpu.max",
    "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
    "/sys/fs/cgroup/cpu/cpu.cfs_period_us",
)
"""Where a container's CPU limit is read: cgroup v2 (`quota period`), or v1 (quota and period apart)."""


MAX_DEFAULT_PROCESSES = 4
"""At most this many screening processes by default: the member's one stage process (Kafka, Redis) paces it well
before more would help (it kept two busy at half its own CPU); a bigger host takes more members."""


def screen_process_count(setting: int | None) -> int:
    """The screening processes to start: `setting` when given, else one per usable CPU up to
    `MAX_DEFAULT_PROCESSES`, or 0 with a single one (a pool on one CPU only adds the hand-over)."""
    if setting is not None:
        return setting
    cpus = usable_cpus()
    return min(cpus, MAX_DEFAULT_PROCESSES) if cpus > 1 else 0


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), capped by its cgroup's CPU limit when it has one."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(*(_read(path) for path in CGROUP_CPU_MAX))
    return max(1, min(cpus, limit)) if limit is not None else cpus


def cgroup_cpu_limit(v2_max: str | None, v1_quota: str | None, v1_period: str | None) -> int | None:
    """Whole CPUs of a cgroup CPU limit (at least 1), from the text of cgroup v2's `cpu.max` ("max 100000" when
    unlimited, "150000 100000" for 1.5 CPUs) or v1's quota ("-1" when unlimited) and period; None without one."""
    if v2_max is not None:
        quota, _, period = v2_max.strip().partition(" ")
    elif v1_quota is not None and v1_period is not None:
        quota, period = v1_quota.strip(), v1_period.strip()
    else:
        return None
    if quota in ("max", "-1") or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return max(1, math.floor(int(quota) / int(period)))


def compiled() -> bool:
    """Whether this process screens with the compiled build (setup.py, `VLMFLOW_COMPILE=1`): mypyc makes each
    compiled module an extension, whose file is not the `.py` source."""
    return not str(sys.modules[screen.__module__].__file__).endswith(".py")


def build_name() -> str:
    """The screening build, as logs and the benchmark name it."""
    return "compiled (mypyc)" if compiled() else "pure Python (VLMFLOW_COMPILE=1 builds it compiled)"


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


class RawRecord(NamedTuple):
    """One raw record as a worker process gets it. Named tuples, as `Screened`: they cross the process boundary
    pickled, and a tuple unpickles at a tenth of a dataclass's cost (which sets each field through a function)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None

    @property
    def lineage(self) -> Lineage:
        return Lineage(topic=self.topic, partition=self.partition, offset=self.offset)

    @property
    def source_text(self) -> str:
        """`topic:partition:offset`, as dedupe remembers a log (`streams.flywheel.dedupe.lineage_text`) and the
        source header of its outputs names it (`streams.flywheel.outputs.Source.header`)."""
        return f"{self.topic}:{self.partition}:{self.offset}"


class Screened(NamedTuple):
    """What screening made of one raw record: the encoded outcome and what the stage needs beside it."""

    kind: Literal["normalized", "rejected"]
    log_id: str
    value: bytes
    """The encoded `NormalizedLog` or `RejectedLog`."""
    key_hash: int
    """`murmur2` of the log id, every output's key: hashed in a screening process, not in the stage's."""
    code: str | None = None
    """The reject code (rejections)."""
    rule: str | None = None
    content_hash: str | None = None
    """Dedupe keys and the log's own `attempt` (normalized logs)."""
    request_fingerprint: str | None = None
    attempt: int = 0
    case: bytes | None = None
    """The encoded `HardCase` when the log is one (queued as it is: never parsed back)."""
    case_id: str | None = None
    case_priority: int = 0


@dataclass(frozen=True)
class Rules:
    """Everything a worker needs to screen and mine."""

    config: ScreenConfig
    streams: StreamsSettings

    @classmethod
    def from_settings(cls, streams: StreamsSettings) -> Rules:
        return cls(ScreenConfig.from_settings(streams), streams)


def screen_record(record: RawRecord, rules: Rules) -> Screened:
    """Screen, encode and mine one raw record; a defect in vlmflow becomes its `internal_error` rejection."""
    lineage = record.lineage
    try:
        return _screened(screen(record.value, lineage=lineage, config=rules.config), record.value, rules)
    except Exception as exc:
        # NOTE: encoding and mining are covered too: a record they cannot handle would otherwise fail its whole
        # batch on every try. A rejection is only encoded (its original bounded), never mined.
        log.exception("defect while screening %s[%d]@%d", record.topic, record.partition, record.offset)
        outcome = rejection(
            record.value or b"", lineage, code="internal_error", detail=type(exc).__name__, config=rules.config
        )
    return _screened(outcome, record.value, rules)


def adjusted(item: Screened, record: RawRecord, sighting: Sighting, rules: Rules) -> Screened:
    """A normalized log after dedupe: a duplicate becomes a rejection naming the first copy; earlier tries of the
    same request raise its `attempt` (and may make it a hard case). Unchanged otherwise."""
    if sighting.first_lineage != record.source_text:
        lineage = record.lineage
        detail = f"same images, prompt and answer as {sighting.first_lineage}"
        duplicate = rejection(
            record.value or b"", lineage, code="duplicate", rule="dedupe", detail=detail, config=rules.config
        )
        return _screened(duplicate, record.value, rules)
    if sighting.earlier_tries <= item.attempt:
        return item
    normalized = NormalizedLog.model_validate_json(item.value).model_copy(update={"attempt": sighting.earlier_tries})
    return _screened(normalized, record.value, rules)


def _screened(outcome: NormalizedLog | RejectedLog, raw: bytes | None, rules: Rules) -> Screened:
    final, value = encode_outcome(outcome, raw, rules.config)
    key_hash = murmur2(final.log_id.encode())
    if isinstance(final, RejectedLog):
        return Screened("rejected", final.log_id, value, key_hash, code=final.code, rule=final.rule)
    case = hard_case(final, rules.streams.mining, threshold=rules.streams.hard_case_threshold)
    return Screened(
        "normalized",
        final.log_id,
        value,
        key_hash,
        content_hash=content_hash(final),
        request_fingerprint=request_fingerprint(final),
        attempt=final.attempt,
        case=encode(case) if case is not None else None,
        case_id=case.case_id if case is not None else None,
        case_priority=case.priority if case is not None else 0,
    )


_worker_rules: Rules | None = None
"""A worker process's rules, set once by `_start_worker`."""


def _start_worker(streams_json: str) -> None:
    global _worker_rules
    _worker_rules = Rules.from_settings(StreamsSettings.model_validate_json(streams_json))
    # NOTE: Ctrl-C in a terminal, or a stop signal sent to the member's process group, reaches the screening
    # processes too; the member stops them itself once its batch is done (and they exit with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), name="exit-with-parent", daemon=True).start()


def _exit_with(parent_sentinel: int) -> None:
    """End this worker process when its parent ends. A pool's worker waits for work on a queue whose writing end
    it holds itself, so a member killed with SIGKILL would otherwise leave its screening processes behind."""
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


def _screen_chunk(records: list[RawRecord]) -> list[Screened]:
    assert _worker_rules is not None, "the pool's initializer sets the rules"
    return [screen_record(record, _worker_rules) for record in records]


class Screener:
    """Screens batches on a pool of worker processes (or in this process with `processes` 0)."""

    def __init__(self, streams: StreamsSettings, processes: int | None):
        self.streams = streams
        self.rules = Rules.from_settings(streams)
        self.processes = screen_process_count(processes)
        self._pool: ProcessPoolExecutor | None = None

    def _started_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self.streams.model_dump_json(),),
            )
        return self._pool

    async def screen(self, records: list[RawRecord]) -> list[Screened]:
        """Every record screened, in order."""
        if self.processes == 0 or not records:
            return [screen_record(record, self.rules) for record in records]
        size = -(-len(records) // (self.processes * CHUNKS_PER_PROCESS))
        chunks = [records[start : start + size] for start in range(0, len(records), size)]
        loop = asyncio.get_running_loop()
        while True:
            pool = self._started_pool()
            try:
                results = await asyncio.gather(*(loop.run_in_executor(pool, _screen_chunk, c) for c in chunks))
                return [item for chunk in results for item in chunk]
            except BrokenProcessPool:
                log.warning("a screening process died; starting the pool again and screening the batch again")
                self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
