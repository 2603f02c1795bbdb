"""Benchmark: the flywheel's Faust agents (`vlmflow streams`) against a bare aiokafka consume → normalize →
produce loop over the same raw messages, in the same run, on a broker and Redis of its own.

    python -m bench.bench_streams [--count 10000] [--seed 3]     # from the repository root

Both arms read the same `--count` mixed raw logs (every source format, broken logs, rule violations, duplicates,
PII) from offset 0 of vlm.logs.raw and write one record per message: the bare loop normalizes and produces the
record or its rejection, commits after each flushed batch and nothing else; the agents also apply the rules,
redact PII, dedupe in Redis, and (concurrently, in the same process) mine hard cases and queue them. Throughput
of an arm is messages / the time between its first and its last output record (producer timestamps), so process
start and group joins are not counted. The pure stages are also timed in-process, one thread, to show where
the time goes. Prints the figures and the ratio agents / bare loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.codec import encode
from schemas.errors import InvalidLog
from schemas.logs import Lineage, NormalizedLog, RejectedLog
from schemas.settings import Settings, load_settings
from schemas.topics import TOPICS, Topic, TopicSpec
from streams.flywheel.mining import hard_case
from streams.flywheel.normalize import normalize, raw_log_id
from streams.flywheel.pii import redact_log
from streams.flywheel.rules import load_rules
from tests.support.flywheel_data import mixed_raw_logs
from tests.support.flywheel_worker import Records, produce, read_topics, streams_worker
from vlmflow.kafka_admin import create_topics
from vlmflow.stack import LocalStack

BARE_OUT = ("bench.bare.normalized", "bench.bare.rejected")
AGENT_OUT = (Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED)
WAIT_S = 600.0
_COUNTS = re.compile(r"flywheel: normalized (\d+), rejected (\d+)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _span_s(found: Records, topics: tuple[str, ...]) -> float:
    stamps = [record.timestamp for name in topics for record in found[name]]
    return max(1, max(stamps) - min(stamps)) / 1000


async def bare_loop(settings: Settings, count: int) -> None:
    """consume → normalize → produce the record or its rejection; commit after each flushed batch."""
    options = settings.kafka.client_options()
    consumer = AIOKafkaConsumer(
        Topic.LOGS_RAW, **options, group_id=f"bench-bare-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=settings.kafka.session_timeout_ms,
    )  # fmt: skip
    producer = AIOKafkaProducer(**options, acks="all", linger_ms=5)
    await consumer.start()
    await producer.start()
    try:
        done = 0
        while done < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            for tp, records in batches.items():
                for record in records:
                    lineage = Lineage(topic=tp.topic, partition=tp.partition, offset=record.offset)
                    out: NormalizedLog | RejectedLog
                    try:
                        out = normalize(record.value, lineage=lineage)
                    except InvalidLog as exc:
                        code: Any = exc.code
                        out = RejectedLog(log_id=raw_log_id(record.value), code=code, detail=str(exc), lineage=lineage)
                    name = BARE_OUT[0] if isinstance(out, NormalizedLog) else BARE_OUT[1]
                    await producer.send(name, encode(out), key=out.log_id.encode())
                    done += 1
            if batches:
                await producer.flush()
                await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()


def agents(settings: Settings, count: int, log_path: Path) -> None:
    """Run `vlmflow streams` until its progress line counts `count` screened messages (read from its log, so the
    wait costs the worker no CPU), and the correction queue has had a moment to take the last hard cases."""
    with streams_worker(settings, log_path) as worker:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and worker.poll() is None:
            found = _COUNTS.findall(log_path.read_text())
            if found and sum(map(int, found[-1])) >= count:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the streams worker did not finish; see {log_path}")
        time.sleep(3)


def stage_costs_us(values: list[bytes], settings: Settings) -> dict[str, float]:
    """Microseconds per message of each pure stage, in this process, over the same messages."""
    rules = load_rules(None)
    lineage = Lineage(topic=Topic.LOGS_RAW, partition=0, offset=0)
    logs: list[NormalizedLog] = []

    def timed(work: Callable[[], None]) -> float:
        start = time.perf_counter()
        work()
        return (time.perf_counter() - start) / len(values) * 1e6

    def normalize_all() -> None:
        for value in values:
            try:
                logs.append(normalize(value, lineage=lineage))
            except InvalidLog:
                pass

    costs = {"normalize": timed(normalize_all)}
    costs["rules"] = timed(lambda: [rules.first_match(log) for log in logs])
    costs["redact"] = timed(lambda: [redact_log(log) for log in logs])
    costs["mining"] = timed(lambda: [hard_case(log, settings.streams.mining, threshold=1.0) for log in logs])
    costs["encode"] = timed(lambda: [encode(log) for log in logs])
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-streams-") as state:
        unique = uuid.uuid4().hex[:8]
        settings = load_settings(
            state_dir=state,
            kafka={"bootstrap_servers": f"127.0.0.1:{_free_port()}", "session_timeout_ms": 6000},
            redis={"url": f"redis://127.0.0.1:{_free_port()}/0"},
            streams={"app_id": f"bench-{unique}", "review_queue": f"bench-{unique}", "progress_interval_s": 1},
        )
        stack = LocalStack(settings, only=("kafka", "redis"))
        stack.up()
        try:
            create_topics(settings)
            create_topics(settings, [TopicSpec(name, "log_id", None, TOPICS[AGENT_OUT[i]].partitions)
                                     for i, name in enumerate(BARE_OUT)])  # fmt: skip
            logs = mixed_raw_logs(args.count, seed=args.seed)
            produce(settings, logs)
            print(f"messages: {args.count} mixed raw logs (seed {args.seed}), {os.cpu_count()} CPUs", flush=True)

            asyncio.run(bare_loop(settings, args.count))
            bare = read_topics(settings, list(BARE_OUT), lambda f: sum(map(len, f.values())) >= args.count, 60)
            bare_rate = args.count / _span_s(bare, BARE_OUT)
            print(f"bare aiokafka loop (consume → normalize → produce):  {bare_rate:8.0f} msg/s", flush=True)

            agents(settings, args.count, Path(state) / "streams.log")
            found = read_topics(settings, [*AGENT_OUT, Topic.CASES_HARD], lambda _: False, 5)
            screened = sum(len(found[name]) for name in AGENT_OUT)
            agent_rate = args.count / _span_s(found, AGENT_OUT)
            all_rate = args.count / _span_s(found, (*AGENT_OUT, Topic.CASES_HARD))
            print(f"faust agents (screen + dedupe → normalized|rejected): {agent_rate:8.0f} msg/s "
                  f"({screened} outputs, {len(found[Topic.CASES_HARD])} hard cases)")  # fmt: skip
            print(f"faust agents, until the last hard case:               {all_rate:8.0f} msg/s")
            print(f"ratio agents / bare loop: {agent_rate / bare_rate:.2f}")
            costs = stage_costs_us([log.value for log in logs], settings)
            print("pure stages, µs per message (one thread): " + ", ".join(f"{k} {v:.0f}" for k, v in costs.items()))
        finally:
            stack.down()


if __name__ == "__main__":
    main()
