"""The raw-log stage's self-watch: which held partitions never had a fetch answer, waiting for in-flight sends to
settle, and naming where a stalled task waits."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.structs import TopicPartition

from schemas.topics import Topic
from streams.flywheel.stage import awaits_of, never_fetched, settled

P0, P1, P2 = (TopicPartition(Topic.LOGS_RAW, n) for n in range(3))


def test_only_partitions_held_past_the_limit_without_a_high_watermark_are_stuck() -> None:
    assigned_at = {P0: 0.0, P1: 0.0, P2: 50.0}
    highwaters = {P0: None, P1: 120, P2: None}
    assert never_fetched(assigned_at, highwaters.__getitem__, now=60.0, limit_s=60.0) == [P0]
    assert never_fetched(assigned_at, highwaters.__getitem__, now=59.9, limit_s=60.0) == []
    assert never_fetched(assigned_at, highwaters.__getitem__, now=110.0, limit_s=60.0) == [P0, P2]
    assert never_fetched({}, highwaters.__getitem__, now=1e9, limit_s=60.0) == []


def test_a_partition_with_an_empty_fetch_answer_is_not_stuck() -> None:
    assert never_fetched({P0: 0.0}, lambda tp: 0, now=1e6, limit_s=60.0) == []


async def test_settled_waits_for_every_future_and_raises_none_of_their_errors() -> None:
    loop = asyncio.get_running_loop()
    ok, failed, late = loop.create_future(), loop.create_future(), loop.create_future()
    ok.set_result(1)
    failed.set_exception(RuntimeError("refused"))
    loop.call_later(0.05, late.set_result, 3)
    await asyncio.wait_for(settled([ok, failed, late]), timeout=5)
    assert late.done() and late.result() == 3
    assert isinstance(failed.exception(), RuntimeError)


async def test_settled_does_not_return_while_a_send_is_in_flight() -> None:
    in_flight = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(settled([in_flight])), timeout=0.05)
    in_flight.set_result(None)


async def test_awaits_of_names_each_coroutine_down_to_what_it_waits_for() -> None:
    gate = asyncio.Event()

    async def inner() -> None:
        await gate.wait()

    async def outer() -> None:
        await inner()

    task = asyncio.create_task(outer())
    await asyncio.sleep(0)
    chain = awaits_of(task)
    assert chain.startswith("test_awaits_of_names_each_coroutine_down_to_what_it_waits_for.<locals>.outer:")
    assert ".<locals>.inner:" in chain and "Event.wait:" in chain
    assert chain.rsplit(" -> ", 1)[1] in {"Future", "FutureIter"}, chain  # asyncio's C or Python future
    gate.set()
    await task
