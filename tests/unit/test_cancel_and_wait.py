"""`cancel_and_wait` ends a loop that swallowed its cancellation, as redis-py may make a loop do
(redis/redis-py#2666)."""

from __future__ import annotations

import asyncio

import pytest

from schemas.connections import cancel_and_wait


async def test_a_loop_that_drops_its_first_cancellation_still_ends() -> None:
    dropped = 0

    async def stubborn() -> None:
        nonlocal dropped
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if dropped == 2:
                    raise
                dropped += 1  # a command in flight finished and the cancellation was lost: the loop goes on

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(cancel_and_wait(task), timeout=5)
    assert task.cancelled()
    assert dropped == 2


async def test_a_task_that_failed_is_awaited_without_raising() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert isinstance(task.exception(), RuntimeError)


@pytest.mark.parametrize("delay_s", [0.0, 0.05])
async def test_a_task_that_ends_by_itself_is_left_to_end(delay_s: float) -> None:
    async def short() -> int:
        await asyncio.sleep(delay_s)
        return 7

    task = asyncio.create_task(short())
    await asyncio.sleep(0.1)
    await cancel_and_wait(task)
    assert task.result() == 7
