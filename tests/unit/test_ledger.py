"""The ledger's pure parts (`streams.flywheel.ledger`): entries, what step 1 decides from them, the writer lease's
own deadline, and the stage's sub-batch taken again (`Batch.only`)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aiokafka.structs import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from schemas.topics import Topic
from streams.flywheel.ledger import Ledger, LedgerEntry, WriterLease, WriterLost, plan
from streams.flywheel.screening import RawRecord, Screened
from streams.flywheel.stage import Batch

RAW = Topic.LOGS_RAW


def _ledger() -> Ledger:
    """A ledger whose Redis is never called (the methods under test are pure)."""

    class NoRedis:
        def register_script(self, script: str) -> object:
            return object()

    return Ledger(cast(Any, NoRedis()), app_id="unit", owner="member-a")


entries = st.builds(
    LedgerEntry,
    done=st.integers(-1, 10**12),
    pending=st.none() | st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)),
    scan_from=st.dictionaries(st.text(min_size=1, max_size=30), st.integers(0, 10**12), max_size=5),
    owner=st.text(max_size=40),
    version=st.integers(0, 10**9),
)


@given(entries)
def test_an_entry_reads_back_as_written(entry: LedgerEntry) -> None:
    assert LedgerEntry.from_json(entry.to_json()) == entry


def test_begin_then_finish_moves_done_to_the_batch_end_and_bumps_the_version_twice() -> None:
    ledger = _ledger()
    start = LedgerEntry(done=9, version=4)
    begun = ledger.begun(start, (10, 20), {"vlm.logs.normalized:0": 7})
    assert begun.pending == (10, 20) and begun.owner == "member-a" and begun.version == 5
    assert begun.unfinished() == (10, 20)
    assert plan(begun).look_up == (10, 20) and plan(begun).skip_through == 9
    finished = ledger.finished(begun)
    assert finished == LedgerEntry(done=20, pending=None, scan_from={}, owner="member-a", version=6)
    assert finished.unfinished() is None and plan(finished).look_up is None


def test_a_pending_batch_partly_below_done_is_unfinished_only_above_it() -> None:
    assert LedgerEntry(done=14, pending=(10, 20)).unfinished() == (15, 20)
    assert LedgerEntry(done=20, pending=(10, 20)).unfinished() is None
    assert LedgerEntry(done=-1).unfinished() is None


async def test_a_writer_lease_past_its_ttl_refuses_to_write() -> None:
    now = asyncio.get_running_loop().time()
    async with WriterLease(_ledger(), set(), ttl_s=5.0, taken_at=now) as fresh:
        fresh.check()
    async with WriterLease(_ledger(), set(), ttl_s=5.0, taken_at=now - 5.0) as lapsed:
        with pytest.raises(WriterLost, match="no renewal answered within 5.0 s"):
            lapsed.check()


async def test_a_batch_taken_again_keeps_only_the_given_partitions_with_their_screening() -> None:
    records = [RawRecord(RAW, partition, offset, b"{}") for partition, offset in [(0, 5), (1, 7), (0, 6), (2, 1)]]
    screened = [cast(Screened, f"screened {r.partition}:{r.offset}") for r in records]
    future: asyncio.Future[list[Screened]] = asyncio.get_running_loop().create_future()
    future.set_result(screened)
    again = Batch(records, future, generation=3).only({TopicPartition(RAW, 0), TopicPartition(RAW, 2)})
    assert [(r.partition, r.offset) for r in again.records] == [(0, 5), (0, 6), (2, 1)]
    assert await again.screening == ["screened 0:5", "screened 0:6", "screened 2:1"]
    assert again.generation == 3
