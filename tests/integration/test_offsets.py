"""`vlmflow offsets reset` against the real local broker: the plan, the dry run, --execute, and a consumer of the
group starting where the plan said."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from schemas.settings import Settings
from tests.support.ops_data import BASE_MS, cli_environment, create_topics, produce_known
from vlmflow.cli import main

TOPIC, GROUP = "ops.src", "ops-readers"
AT_MS = BASE_MS + 10_000


@pytest.fixture
def admin(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[KafkaAdminClient]:
    for name, value in cli_environment(settings).items():
        monkeypatch.setenv(name, value)
    client = KafkaAdminClient(**settings.kafka.client_options())
    try:
        yield client
    finally:
        client.close()


def committed(admin: KafkaAdminClient) -> dict[int, int]:
    offsets = admin.list_group_offsets(GROUP).get(GROUP, {})
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == TOPIC and meta.offset >= 0}


def plan_rows(out: str) -> dict[int, tuple[str, int]]:
    """partition -> (current, new) from the printed plan."""
    rows = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].isdigit():
            rows[int(fields[0])] = (fields[1], int(fields[2]))
    return rows


class Member:
    """A consumer in the group, polling in a thread until closed."""

    def __init__(self, settings: Settings):
        self.consumer = KafkaConsumer(
            TOPIC,
            **settings.kafka.client_options(),
            group_id=GROUP,
            enable_auto_commit=False,
            session_timeout_ms=settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=1_000,
            auto_offset_reset="latest",
        )
        self.first_offsets: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for tp, records in self.consumer.poll(timeout_ms=200).items():
                self.first_offsets.setdefault(tp.partition, records[0].offset)

    def wait_for(self, condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "the group member did not get there in time"
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.consumer.close()


def test_reset_plans_by_default_applies_with_execute_and_the_group_starts_there(
    settings: Settings, admin: KafkaAdminClient, capsys: pytest.CaptureFixture[str]
) -> None:
    create_topics(settings, {TOPIC: 4})
    sent = produce_known(settings, TOPIC, count=2_000)
    admin.alter_group_offsets(GROUP, {TopicPartition(TOPIC, p): OffsetAndMetadata(100, "", None) for p in range(4)})
    # the first record of each partition at or after AT_MS, by offset, from what was produced
    expected = {p: min(s.offset for s in sent if s.partition == p and s.timestamp >= AT_MS) for p in range(4)}
    assert any(s.timestamp < AT_MS for s in sent if s.partition == 0 and s.offset > expected[0]), (
        "jittered timestamps should make the first offset at the time differ from a sorted search"
    )

    reset = ["offsets", "reset", "--group", GROUP, "--topic", TOPIC, "--to-datetime", str(AT_MS)]
    assert main(reset) == 0
    out = capsys.readouterr().out
    assert plan_rows(out) == {p: ("100", expected[p]) for p in range(4)}
    assert "dry run: nothing changed" in out
    assert committed(admin) == {p: 100 for p in range(4)}

    assert main([*reset, "--execute"]) == 0
    assert "applied" in capsys.readouterr().out
    assert committed(admin) == expected

    member = Member(settings)
    try:
        member.wait_for(lambda: len(member.first_offsets) == 4)
        assert member.first_offsets == expected
    finally:
        member.close()


def test_reset_is_refused_while_the_group_has_active_members(
    settings: Settings, admin: KafkaAdminClient, capsys: pytest.CaptureFixture[str]
) -> None:
    create_topics(settings, {TOPIC: 4})
    produce_known(settings, TOPIC, count=400)
    member = Member(settings)
    try:
        member.wait_for(lambda: bool(member.consumer.assignment()))
        assert main(["offsets", "reset", "--group", GROUP, "--topic", TOPIC, "--to-earliest"]) == 0
        captured = capsys.readouterr()
        assert "active member" in captured.err and "dry run" in captured.out
        assert main(["offsets", "reset", "--group", GROUP, "--topic", TOPIC, "--to-earliest", "--execute"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "has 1 active member(s)" in error[0] and "stop its consumers" in error[0]
    finally:
        member.close()
    assert committed(admin) == {}


def test_latest_earliest_and_shift(
    settings: Settings, admin: KafkaAdminClient, capsys: pytest.CaptureFixture[str]
) -> None:
    create_topics(settings, {TOPIC: 4})
    produce_known(settings, TOPIC, count=400)
    base = ["offsets", "reset", "--group", GROUP, "--topic", TOPIC]
    assert main([*base, "--to-latest", "--execute"]) == 0
    assert committed(admin) == {p: 100 for p in range(4)}
    assert main([*base, "--shift-by", "-30", "--execute"]) == 0
    assert committed(admin) == {p: 70 for p in range(4)}
    assert main([*base, "--shift-by", "-1000"]) == 0
    assert plan_rows(capsys.readouterr().out) == {p: ("70", 0) for p in range(4)}
    assert main([*base, "--to-earliest", "--execute"]) == 0
    assert committed(admin) == {p: 0 for p in range(4)}
    assert main([*base[:-2], "--topic", "ops.nope", "--to-latest"]) == 2
    assert "topic 'ops.nope' does not exist" in capsys.readouterr().err
