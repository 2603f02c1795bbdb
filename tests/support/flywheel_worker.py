"""Running the flywheel worker (`vlmflow streams`) as a child process against a given broker, and reading topics
back: shared by the flywheel's integration test and its benchmark."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from schemas.settings import Settings
from schemas.topics import Topic
from tests.support.flywheel_data import PlannedLog
from tests.support.processes import child_process


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that points `vlmflow streams` at these settings' servers, state directory, group and queue."""
    return {
        **os.environ,
        "VLMFLOW_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "VLMFLOW_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "VLMFLOW_REDIS__URL": settings.redis.url,
        "VLMFLOW_S3__ENDPOINT": settings.s3.endpoint,
        "VLMFLOW_STATE_DIR": str(settings.state_dir),
        "VLMFLOW_STREAMS__APP_ID": settings.streams.app_id,
        "VLMFLOW_STREAMS__REVIEW_QUEUE": settings.streams.review_queue,
        "VLMFLOW_STREAMS__PROGRESS_INTERVAL_S": "2",
        "VLMFLOW_STREAMS__METRICS_PORT": "0",
    }


_METRICS_PORT = re.compile(rb"flywheel metrics on port (\d+)")


def metrics_port(log_path: Path, timeout_s: float = 120.0) -> int:
    """The port a `vlmflow streams` child serves its metrics on, read from its log (it picks a free one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _METRICS_PORT.search(log_path.read_bytes()) if log_path.exists() else None
        if found:
            return int(found.group(1))
        time.sleep(0.2)
    raise AssertionError(f"no metrics port in {log_path}:\n{log_path.read_text()[-3000:]}")


@contextmanager
def streams_worker(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`vlmflow streams` as a child process; stopped with SIGTERM (as an orchestrator would) on exit."""
    with child_process([sys.executable, "-m", "vlmflow.cli", "streams"], worker_env(settings), log_path) as process:
        yield process


def produce(settings: Settings, logs: list[PlannedLog]) -> dict[tuple[int, int], PlannedLog]:
    """Write the logs to vlm.logs.raw; returns each one by its (partition, offset)."""
    producer = KafkaProducer(**settings.kafka.client_options(), acks="all", linger_ms=5)
    try:
        futures = [producer.send(Topic.LOGS_RAW, key=log.key, value=log.value) for log in logs]
        producer.flush()
        placed = {}
        for log, future in zip(logs, futures, strict=True):
            metadata = future.get(timeout=30)
            placed[(metadata.partition, metadata.offset)] = log
        return placed
    finally:
        producer.close()


Records = dict[str, list[ConsumerRecord]]


def read_topics(settings: Settings, topics: list[str], done: Callable[[Records], bool], timeout_s: float) -> Records:
    """Every record on `topics` from offset 0, read until `done(records)` holds or the time is up."""
    consumer = KafkaConsumer(**settings.kafka.client_options(), enable_auto_commit=False, group_id=None)
    try:
        partitions = [
            TopicPartition(name, partition) for name in topics for partition in consumer.partitions_for_topic(name)
        ]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, 0)
        found: Records = {name: [] for name in topics}
        deadline = time.monotonic() + timeout_s
        while not done(found) and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                found[tp.topic].extend(records)
        return found
    finally:
        consumer.close()
