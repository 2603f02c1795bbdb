"""`vlmflow replay` against the real local broker: 10,000 records over 4 partitions with known timestamps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer

from schemas.settings import Settings
from streams.ops.rate_limit import DEFAULT_SLACK_S
from streams.ops.replay.checkpoint import ReplayCounts, load_checkpoint, save_checkpoint
from streams.ops.replay.plan import ReplayRequest
from streams.ops.replay.run import run_replay, start_replay
from tests.support.ops_data import (
    BASE_MS,
    Sent,
    cli_environment,
    create_topics,
    headers_of,
    origin_of,
    produce_known,
    read_topic,
)
from vlmflow.cli import main
from vlmflow.kafka_admin import admin_client

SOURCE, DESTINATION = "ops.src", "ops.dst"
T1, T2 = BASE_MS + 20_000, BASE_MS + 60_000
VLMFLOW = str(Path(sys.executable).parent / "vlmflow")


@pytest.fixture
def sent(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    for name, value in cli_environment(settings).items():
        monkeypatch.setenv(name, value)
    create_topics(settings, {SOURCE: 4, DESTINATION: 4})
    return produce_known(settings, SOURCE)


def in_window(sent: list[Sent], start: int = T1, end: int = T2) -> list[Sent]:
    return [record for record in sent if start <= record.timestamp < end]


def assert_delivered_exactly(settings: Settings, expected: list[Sent]) -> list:  # type: ignore[type-arg]
    """The destination holds each expected record once, in its source partition, in source order, marked."""
    copies = read_topic(settings, DESTINATION)
    origins = [origin_of(record) for record in copies]
    duplicates = [origin for origin, seen in Counter(origins).items() if seen > 1]
    assert not duplicates, f"{len(duplicates)} records delivered more than once, e.g. {duplicates[:3]}"
    assert set(origins) == {(record.partition, record.offset) for record in expected}
    by_origin = {(record.partition, record.offset): record for record in expected}
    replay_ids = set()
    for copy in copies:
        origin = by_origin[origin_of(copy)]
        headers = headers_of(copy)
        assert (copy.key, copy.value, copy.timestamp) == (origin.key, origin.value, origin.timestamp)
        assert headers["origin-h"] == f"v{origin.index}".encode()
        assert headers["x-replay-origin-topic"] == SOURCE.encode()
        assert copy.partition == origin.partition
        replay_ids.add(headers["x-replay-id"])
    assert len(replay_ids) == 1
    for partition in range(4):
        offsets = [origin_of(copy)[1] for copy in copies if copy.partition == partition]
        assert offsets == sorted(offsets), f"partition {partition} out of order"
    return copies


def test_a_time_window_is_copied_exactly_once_in_order_and_marked(
    settings: Settings, sent: list[Sent], capsys: pytest.CaptureFixture[str]
) -> None:
    expected = in_window(sent)
    offsets_in_window = {record.offset for record in expected if record.partition == 0}
    assert len(offsets_in_window) < max(offsets_in_window) - min(offsets_in_window) + 1, (
        "the jittered timestamps should interleave records inside and outside the window"
    )
    assert main(["replay", "--topic", SOURCE, "--from", str(T1), "--to", str(T2), "--to-topic", DESTINATION]) == 0
    assert (
        f"sent {len(expected):,} of 10,000 records read ({10_000 - len(expected):,} outside the window"
        in capsys.readouterr().out
    )
    assert_delivered_exactly(settings, expected)


def test_a_filter_selects_on_value_fields_and_a_dry_run_writes_nothing(
    settings: Settings, sent: list[Sent], capsys: pytest.CaptureFixture[str]
) -> None:
    expected = [
        r for r in in_window(sent) if r.document["status"] == "error" and r.document["tenant"] in ("acme", "globex")
    ]
    window = ["replay", "--topic", SOURCE, "--from", str(T1), "--to", str(T2), "--to-topic", DESTINATION]
    where = ["--filter", "status=error and tenant in (acme, globex)"]
    assert main([*window, *where, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would send {len(expected):,} of 10,000 records read" in out
    assert "nothing was written" in out
    samples = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(samples) == 5 and all('"status":"error"' in line for line in samples)
    assert read_topic(settings, DESTINATION) == []
    assert not (settings.state_dir / "replays").exists()

    assert main([*window, *where]) == 0
    assert_delivered_exactly(settings, expected)


def test_a_replay_killed_half_way_resumes_without_sending_anything_twice(
    settings: Settings, sent: list[Sent], tmp_path: Path
) -> None:
    expected = in_window(sent, BASE_MS - 5_000, BASE_MS + 60_000)
    env = {**os.environ, **cli_environment(settings)}
    window = [
        "--topic",
        SOURCE,
        "--from",
        str(BASE_MS - 5_000),
        "--to",
        str(BASE_MS + 60_000),
        "--to-topic",
        DESTINATION,
    ]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([VLMFLOW, "replay", *window, "--rate", "1500"], stdout=log, stderr=log, env=env)
    replays = settings.state_dir / "replays"
    deadline = time.monotonic() + 60
    while True:
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "the replay made no checkpoint past 2,000 records"
        checkpoints = list(replays.glob("*.json")) if replays.exists() else []
        if checkpoints and json.loads(checkpoints[0].read_text())["counts"]["sent"] >= 2_000:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    replay_id = checkpoints[0].stem
    assert not load_checkpoint(settings, replay_id).done
    assert 2_000 <= len(read_topic(settings, DESTINATION)) < len(expected)

    resumed = subprocess.run(
        [VLMFLOW, "replay", "--resume", replay_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"replay {replay_id} complete" in resumed.stdout
    assert load_checkpoint(settings, replay_id).done
    assert_delivered_exactly(settings, expected)


def test_records_sent_after_the_last_checkpoint_are_found_and_not_sent_again(
    settings: Settings, sent: list[Sent], capsys: pytest.CaptureFixture[str]
) -> None:
    """The crash window between a flush and the checkpoint, made as wide as it gets: everything was sent, and the
    checkpoint on disk is still the one written before the first record."""
    expected = in_window(sent)
    request = ReplayRequest(source=SOURCE, destination=DESTINATION, from_time=str(T1), to_time=str(T2))
    with admin_client(settings) as admin:
        first = start_replay(settings, admin, request, now=datetime.now(UTC), dry_run=False)
    assert run_replay(settings, first).checkpoint.counts.sent == len(expected)
    save_checkpoint(settings, first)

    assert main(["replay", "--resume", first.plan.replay_id]) == 0
    out = capsys.readouterr().out
    assert f"{len(expected):,} already delivered before an interruption" in out
    assert "this run: 0 records" in out
    assert_delivered_exactly(settings, expected)


def test_the_rate_limit_holds_within_ten_percent_over_ten_seconds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_topics(settings, {SOURCE: 4, DESTINATION: 4})
    produce_known(settings, SOURCE, count=5_000)
    request = ReplayRequest(
        source=SOURCE, destination=DESTINATION, from_offsets="0:0,1:0,2:0,3:0", to_offsets="0:1250,1:1250,2:1250,3:1250"
    )
    with admin_client(settings) as admin:
        checkpoint = start_replay(settings, admin, request, now=datetime.now(UTC), dry_run=False)
    sends: list[float] = []

    def progress(counts: ReplayCounts) -> None:
        if counts.sent > len(sends):
            sends.append(time.monotonic())

    outcome = run_replay(settings, checkpoint, rate=500, progress=progress)
    assert outcome.sent_now == len(sends) == 5_000
    overall = (len(sends) - 1) / (sends[-1] - sends[0])
    assert 450 <= overall <= 550, f"{overall:.0f} records/s over {sends[-1] - sends[0]:.1f} s"
    busiest = max(sum(1 for t in sends[i : i + 600] if t < start + 1.0) for i, start in enumerate(sends))
    assert busiest <= 550, f"{busiest} records in one second (the limiter allows {500 * (1 + DEFAULT_SLACK_S):.0f} + 1)"
    assert len(read_topic(settings, DESTINATION)) == 5_000


BAD_INPUT = [
    (["--topic", "ops.nope", "--from", "now-1h", "--to-topic", DESTINATION], "topic 'ops.nope' does not exist"),
    (["--topic", SOURCE, "--from", "now-1h", "--to-topic", "ops.nope"], "topic 'ops.nope' does not exist"),
    (["--topic", SOURCE, "--from=now", "--to=now-1h", "--to-topic", DESTINATION], "is not after --from"),
    (["--topic", SOURCE, "--from", "0", "--filter", "status=", "--to-topic", DESTINATION], "cannot parse filter"),
    (["--topic", SOURCE, "--from", "2024-05-01", "--to-topic", DESTINATION], "has no zone"),
    (["--topic", SOURCE, "--from", "0"], "a replay needs --to-topic"),
    (["--topic", SOURCE, "--from-offset", "7:0", "--to-topic", DESTINATION], "--from-offset names [7]"),
    (["--resume", "20240101T000000-abcdef"], "no replay '20240101T000000-abcdef'"),
    (["--topic", SOURCE, "--from", "0", "--to-topic", DESTINATION, "--rate", "fast"], "cannot read rate"),
]


def test_bad_input_is_one_clear_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in cli_environment(settings).items():
        monkeypatch.setenv(name, value)
    create_topics(settings, {SOURCE: 4, DESTINATION: 4})
    for argv, message in BAD_INPUT:
        assert main(["replay", *argv]) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vlmflow: error: ") and message in lines[0], (argv, captured.err)
        assert captured.out == ""
    assert not (settings.state_dir / "replays").exists()


def test_records_the_filter_cannot_read_are_skipped_and_reported_and_a_resume_goes_past_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record nested 100,000 deep, one with a 5,000-digit number and one that is no UTF-8 are counted and listed,
    never sent and never a crash: a resume from before them goes past them too (it used to stop on them forever)."""
    for name, value in cli_environment(settings).items():
        monkeypatch.setenv(name, value)
    create_topics(settings, {SOURCE: 1, DESTINATION: 1})
    values = [
        b'{"status": "error", "i": 0}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"status": "error", "n": ' + b"1" * 5_000 + b"}",
        b"\xff\xfe not text",
        b'{"status": "ok", "n": 12}',
        b'{"status": "ok", "i": 5}',
    ]
    producer = KafkaProducer(**settings.kafka.client_options(), max_request_size=2**21)
    for value in values:
        producer.send(SOURCE, value=value, partition=0).get(timeout=10)
    producer.close()
    request = ReplayRequest(
        source=SOURCE, destination=DESTINATION, from_offsets="0:0", filter="status=error or n<" + "9" * 5_000
    )
    with admin_client(settings) as admin:
        first = start_replay(settings, admin, request, now=datetime.now(UTC), dry_run=False)

    outcome = run_replay(settings, first)
    counts = outcome.checkpoint.counts
    assert (counts.sent, counts.unreadable, counts.filtered_out) == (2, 3, 4)
    assert [(r.partition, r.offset) for r in outcome.unreadable] == [(0, 1), (0, 2), (0, 3)]
    assert "nested too deeply" in outcome.unreadable[0].reason
    assert "not UTF-8" in outcome.unreadable[2].reason

    save_checkpoint(settings, first)  # as if that run had died before its first checkpoint
    assert main(["replay", "--resume", first.plan.replay_id]) == 0
    out = capsys.readouterr().out
    assert "(3 the filter could not read, skipped)" in out
    assert "skipped 0@1: nested too deeply for the JSON decoder" in out
    assert load_checkpoint(settings, first.plan.replay_id).done
    assert [origin_of(record) for record in read_topic(settings, DESTINATION)] == [(0, 0), (0, 4)]
