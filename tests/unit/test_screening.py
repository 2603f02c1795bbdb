"""`streams.flywheel.screening`: one raw record screened, encoded and mined, what a defect in any of those steps
becomes, and the pool of screening processes (the same results, a killed process replaced, none outliving its
member)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas.codec import decode
from schemas.settings import StreamsSettings
from schemas.topics import Topic
from streams.flywheel import screening
from streams.flywheel.dedupe import Sighting
from streams.flywheel.screening import (
    MAX_DEFAULT_PROCESSES,
    RawRecord,
    Rules,
    Screened,
    Screener,
    adjusted,
    cgroup_cpu_limit,
    screen_process_count,
    screen_record,
    usable_cpus,
)
from tests.support.flywheel_data import mixed_raw_logs

REPO = Path(__file__).resolve().parents[2]

RAW = {
    "req_id": "r-1", "ts": 1772366400, "app": "shop", "img": "vlm-images/a.png", "img_w": 640, "img_h": 480,
    "q": "find the cat", "ans": '{"objects": [{"label": "cat", "bbox": [1, 2, 3, 4], "confidence": 0.2}]}',
    "lat": 0.42, "ok": True,
}  # fmt: skip


def record(raw: dict[str, object]) -> RawRecord:
    return RawRecord(Topic.LOGS_RAW, 0, 7, json.dumps(raw).encode())


def test_a_defect_while_mining_becomes_the_records_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a defect")

    monkeypatch.setattr(screening, "hard_case", broken)
    item = screen_record(record(RAW), Rules.from_settings(StreamsSettings()))
    assert (item.kind, item.code, item.case) == ("rejected", "internal_error", None)
    assert decode(Topic.LOGS_REJECTED, item.value).detail == "RuntimeError"


def test_numbers_beyond_a_floats_range_in_an_answer_are_screened_without_redaction() -> None:
    """A 400-digit number survives when redaction is off; boxes, rules and mining must all take it."""
    huge = "9" * 400
    answer = '{"objects": [{"label": "cat", "bbox": [1, 2, 3, ' + huge + '], "confidence": ' + huge + "}]}"
    rules = Rules.from_settings(StreamsSettings(redact_pii=False))
    item = screen_record(record({**RAW, "ans": answer}), rules)
    assert item.kind == "normalized", item
    assert decode(Topic.LOGS_NORMALIZED, item.value).output_error is not None  # the box is unreadable, told as such


# -- the pool of screening processes -----------------------------------------------------------------------------


def mixed_records(count: int) -> list[RawRecord]:
    return [RawRecord(Topic.LOGS_RAW, 0, offset, log.value) for offset, log in enumerate(mixed_raw_logs(count, seed=5))]


def timeless(items: list[Screened]) -> list[Screened]:
    """`items` with the times of day they were made (`rejected_at`, ...) left out of their records."""

    def without_times(value: bytes | None) -> bytes | None:
        if value is None:
            return None
        return json.dumps({k: v for k, v in json.loads(value).items() if not k.endswith("_at")}).encode()

    return [item._replace(value=without_times(item.value), case=without_times(item.case)) for item in items]


def test_a_pool_screens_every_record_as_the_stage_process_does() -> None:
    records = mixed_records(300)
    pool = Screener(StreamsSettings(), 2)
    try:
        in_pool = asyncio.run(pool.screen(records))
        assert timeless(in_pool) == timeless(asyncio.run(Screener(StreamsSettings(), 0).screen(records)))
    finally:
        pool.close()


def test_dedupe_adjusts_only_duplicates_and_later_tries() -> None:
    records = mixed_records(120)
    rules = Rules.from_settings(StreamsSettings())
    screened = [screen_record(record, rules) for record in records]
    normalized = [(item, record) for item, record in zip(screened, records, strict=True) if item.kind == "normalized"]
    sightings = [
        Sighting("vlm.logs.raw:3:1", 0),  # a duplicate of another record
        Sighting(normalized[1][1].source_text, 2),  # its third try
        Sighting(normalized[2][1].source_text, 0),  # neither
    ]
    changes = [(item, record, sighting) for (item, record), sighting in zip(normalized, sightings, strict=False)]
    duplicate, retried, unchanged = (adjusted(*change, rules) for change in changes)
    assert (duplicate.kind, duplicate.code) == ("rejected", "duplicate")
    assert json.loads(retried.value)["attempt"] == 2
    assert unchanged == changes[2][0]


def test_a_killed_screening_process_is_replaced_and_the_batch_screened_again() -> None:
    records = mixed_records(60)
    expected = timeless(asyncio.run(Screener(StreamsSettings(), 0).screen(records)))
    pool = Screener(StreamsSettings(), 1)
    try:
        asyncio.run(pool.screen(records[:1]))
        started = pool._started_pool()
        for process in list(started._processes.values()):  # the pool's own processes (it has no public view)
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        assert timeless(asyncio.run(pool.screen(records))) == expected
        assert pool._pool is not started  # replaced
    finally:
        pool.close()


_MEMBER = """
import asyncio, sys, time
from schemas.settings import StreamsSettings
from streams.flywheel.screening import RawRecord, Screener
pool = Screener(StreamsSettings(), 2)
asyncio.run(pool.screen([RawRecord("vlm.logs.raw", 0, offset, b"{}") for offset in range(8)]))
print(*pool._started_pool()._processes, flush=True)
time.sleep(120)
"""


def test_screening_processes_stop_with_their_member_only() -> None:
    member = subprocess.Popen([sys.executable, "-c", _MEMBER], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert member.stdout is not None
        workers = [int(pid) for pid in member.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
        deadline = time.monotonic() + 30
        while not all(_ignores_stop_signals(pid) for pid in workers):  # a process still starting has no handlers
            assert time.monotonic() < deadline, "screening processes did not start"
            time.sleep(0.1)
        for pid in workers:  # a stop signal to the process group: the member decides when they stop
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(_running(pid) for pid in workers), "a screening process stopped before its member"
    finally:
        member.kill()
        member.wait()
    deadline = time.monotonic() + 15
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in workers), "screening processes outlived their member"


def _ignores_stop_signals(pid: int) -> bool:
    """Whether the process ignores SIGINT and SIGTERM (its `SigIgn` mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return all(ignored >> (number - 1) & 1 for number in (signal.SIGINT, signal.SIGTERM))


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan waits for whoever adopts it to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    ("v2_max", "v1_quota", "v1_period", "cpus"),
    [
        ("max 100000\n", None, None, None),
        ("200000 100000\n", None, None, 2),
        ("150000 100000\n", None, None, 1),
        ("50000 100000\n", None, None, 1),
        (None, "-1\n", "100000\n", None),
        (None, "400000\n", "100000\n", 4),
        (None, None, None, None),
        ("garbage", None, None, None),
    ],
)
def test_a_cgroup_cpu_limit_is_read_in_whole_cpus(
    v2_max: str | None, v1_quota: str | None, v1_period: str | None, cpus: int | None
) -> None:
    assert cgroup_cpu_limit(v2_max, v1_quota, v1_period) == cpus


def test_the_screening_processes_default_to_the_usable_cpus() -> None:
    assert screen_process_count(3) == 3 and screen_process_count(0) == 0
    usable = usable_cpus()
    assert 1 <= usable <= len(os.sched_getaffinity(0))
    assert screen_process_count(None) == (min(usable, MAX_DEFAULT_PROCESSES) if usable > 1 else 0)
