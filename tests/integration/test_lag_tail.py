"""`vlmflow lag`, `vlmflow topics describe` and `vlmflow topics tail` against the real local broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from schemas.codec import encode
from schemas.jobs import JobResult
from schemas.settings import Settings
from schemas.topics import Topic
from tests.support.ops_data import BASE_MS, cli_environment, create_topics, produce_known
from vlmflow.cli import main

VLMFLOW = str(Path(sys.executable).parent / "vlmflow")


@pytest.fixture(autouse=True)
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in cli_environment(settings).items():
        monkeypatch.setenv(name, value)


def test_lag_per_group_and_partition(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    create_topics(settings, {"ops.src": 4})
    produce_known(settings, "ops.src", count=400)  # 100 per partition
    admin = KafkaAdminClient(**settings.kafka.client_options())
    try:
        admin.alter_group_offsets(
            "ops-a", {TopicPartition("ops.src", p): OffsetAndMetadata(10 * p, "", None) for p in range(4)}
        )
        admin.alter_group_offsets("ops-b", {TopicPartition("ops.src", 0): OffsetAndMetadata(100, "", None)})
    finally:
        admin.close()

    assert main(["lag", "--group", "ops-a"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("ops-a ")]
    assert [row[1:] for row in rows[:4]] == [
        ["ops.src", str(p), str(10 * p), "100", str(100 - 10 * p)] for p in range(4)
    ]
    assert "total lag 340 over 4 partitions; state Empty, 0 members" in " ".join(rows[4])

    assert main(["lag"]) == 0
    out = capsys.readouterr().out
    assert "ops-a" in out and "ops-b                        total lag 0 over 1 partitions" in out

    assert main(["lag", "--group", "ops-nobody"]) == 2
    assert "group 'ops-nobody' has no members and no committed offsets" in capsys.readouterr().err


def test_describe_shows_partitions_and_offsets(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    create_topics(settings, {"ops.src": 4})
    produce_known(settings, "ops.src", count=402)
    assert main(["topics", "describe", "ops.src"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "topic ops.src: 4 partitions; not in the vlmflow registry"
    ends = {int(fields[0]): int(fields[-2]) for fields in (line.split() for line in lines[2:6])}
    assert ends == {0: 101, 1: 101, 2: 100, 3: 100}
    assert lines[6].split() == ["total", "402"]

    assert main(["topics", "describe", Topic.JOBS_RESULT]) == 0
    assert "registry: key=job_id value=JobResult partitions=6" in capsys.readouterr().out
    assert main(["topics", "describe", "ops.nope"]) == 2
    assert "topic 'ops.nope' does not exist" in capsys.readouterr().err


def _results(settings: Settings) -> None:
    """Five results a second apart, spread over partitions, and one record that is not a JobResult."""
    producer = KafkaProducer(**settings.kafka.client_options())
    for number in range(5):
        result = JobResult(job_id=f"job-{number}", status="ok", output={"caption": "a cat"}, vision_tokens=999)
        producer.send(
            Topic.JOBS_RESULT,
            key=f"job-{number}".encode(),
            value=encode(result),
            partition=number % 3,
            timestamp_ms=BASE_MS + 1_000 * number,
        )
    producer.send(
        Topic.JOBS_RESULT, key=b"broken", value=b'{"job_id": "job-x"}', partition=5, timestamp_ms=BASE_MS + 3_500
    )
    producer.flush()
    producer.close()


def test_tail_shows_the_newest_records_decoded_with_their_schema(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    _results(settings)
    assert main(["topics", "tail", Topic.JOBS_RESULT, "--n", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"2023-11-14T22:13:23.000Z {Topic.JOBS_RESULT}[0]@1 key=job-3 JobResult {{")
    assert '"job_id":"job-3","status":"ok"' in lines[0] and '"vision_tokens":999' in lines[0]
    assert "key=broken" in lines[1] and "INVALID (Field required at status)" in lines[1]
    assert "key=job-4" in lines[2]


def test_tail_follow_prints_records_as_they_arrive(settings: Settings, tmp_path: Path) -> None:
    _results(settings)
    env = {**os.environ, **cli_environment(settings)}
    # NOTE: a shell starts background commands with SIGINT ignored, and an ignored signal stays ignored across
    # exec (Python then installs no KeyboardInterrupt handler): the follower gets SIGINT as a terminal gives it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        follower = subprocess.Popen(
            [VLMFLOW, "topics", "tail", Topic.JOBS_RESULT, "--n", "1", "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert "key=job-4" in follower.stdout.readline()  # type: ignore[union-attr]
        time.sleep(0.5)
        producer = KafkaProducer(**settings.kafka.client_options())
        late = JobResult(job_id="job-late", status="ok", output={"caption": "a dog"})
        producer.send(Topic.JOBS_RESULT, key=b"job-late", value=encode(late))
        producer.flush()
        producer.close()
        assert "key=job-late" in follower.stdout.readline()  # type: ignore[union-attr]
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(timeout=10)
        finally:
            follower.kill()
    assert follower.returncode == 130
