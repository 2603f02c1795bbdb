"""The token budget against a real Redis (Valkey): lease life cycle, fairness across processes, a multi-process
stress test with SIGKILLed holders, vanished waiters, a Redis restart, leases held with `hold` through Redis blips
(a TCP proxy cut in front of the real server), and leases Redis loses while their holders use them."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas.settings import Settings, load_settings
from tests.conftest import free_port_block
from tests.support.tcp_proxy import TcpProxy
from vlmflow.stack import LocalStack
from workers import budget as budget_module
from workers.budget import (
    WAITER_TTL_S,
    BudgetTimeout,
    BudgetUnavailable,
    CostExceedsCapacity,
    Lease,
    LeaseExpired,
    LeaseLost,
    TokenBudget,
)
from workers.budget_scripts import GRANTED_CHANNEL, key_prefix

SPAWN = multiprocessing.get_context("spawn")
MAX_TTL_S = 5.0
"""The longest lease TTL these tests use."""


def unique_pool() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def client(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2)


async def settled(redis: Redis, ttl_s: float) -> None:
    """Wait until the server is older than a lease TTL: a new pool on a younger server waits that long, in case
    the server restarted and lost leases that holders still use."""
    uptime_s = (await redis.info("server"))["uptime_in_seconds"]
    await asyncio.sleep(max(0.0, ttl_s + 1 - uptime_s))


@pytest.fixture
async def redis(stack_settings: Settings) -> AsyncIterator[Redis]:
    connection = client(stack_settings.redis.url)
    await settled(connection, MAX_TTL_S)
    yield connection
    await connection.aclose()


async def live_leases(redis: Redis, pool: str) -> list[tuple[int, str]]:
    """(cost, holder) of every unexpired lease, read in one transaction straight from the lease set (not from the
    `used` counter the scripts keep), so the check does not trust the code under test."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.zrange(f"{key_prefix(pool)}leases", 0, -1, withscores=True)
        (seconds, micros), leases = await pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    members = (member.decode().split("|", 2) for member, expiry in leases if expiry > now_ms)
    return [(int(cost), holder) for _lease_id, cost, holder in members]


async def live_sum(redis: Redis, pool: str) -> int:
    return sum(cost for cost, _holder in await live_leases(redis, pool))


class Sampler:
    """Reads the pool's use as fast as it can until stopped; remembers the peak and every violation."""

    def __init__(self, redis: Redis, budget: TokenBudget):
        self.redis, self.budget = redis, budget
        self.samples = 0
        self.peak = 0
        self.over: list[tuple[int, int]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = await live_sum(self.redis, self.budget.pool)
                state = await self.budget.state()
            except (BudgetUnavailable, RedisConnectionError):
                await asyncio.sleep(0.02)
                continue
            self.samples += 1
            self.peak = max(self.peak, raw, state.in_use)
            if raw > state.capacity or state.in_use > state.capacity:
                self.over.append((raw, state.in_use))
            await asyncio.sleep(0.002)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


# -- child processes ----------------------------------------------------------------------------------------------


def hammer(url: str, pool: str, capacity: int, ttl_s: float, name: str, seed: int, max_cost: int,
           max_hold_s: float, stop: Event) -> None:  # fmt: skip
    """A worker process: reserve a random cost, hold it a random time (renewing), release; until stopped."""

    async def run() -> None:
        rng = random.Random(seed)
        connection = client(url)
        budget = TokenBudget(connection, pool, capacity, ttl_s)
        while not stop.is_set():
            lease = await budget.reserve(rng.randint(1, max_cost), name, timeout_s=30)
            if stop.is_set():
                await budget.release(lease)
                break
            hold_until = time.monotonic() + rng.uniform(0.02, max_hold_s)
            while (left := hold_until - time.monotonic()) > 0:
                await asyncio.sleep(min(left, ttl_s / 3))
                if hold_until > time.monotonic():
                    lease = await budget.renew(lease)
            await budget.release(lease)
        await connection.aclose()

    asyncio.run(run())


def wait_forever(url: str, pool: str, capacity: int, ttl_s: float, cost: int) -> None:
    """A process that queues for `cost` tokens and is killed while it waits."""

    async def run() -> None:
        budget = TokenBudget(client(url), pool, capacity, ttl_s)
        await budget.reserve(cost, "waiter", timeout_s=120)
        await asyncio.sleep(120)

    asyncio.run(run())


async def wait_until(condition: Callable[[], Awaitable[bool]], poll: float = 0.02, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(poll)


async def holders(redis: Redis, pool: str) -> set[str]:
    return {holder for _cost, holder in await live_leases(redis, pool)}


# -- the life cycle ----------------------------------------------------------------------------------------------


async def test_reserve_renew_release_and_the_books(redis: Redis) -> None:
    pool = unique_pool()
    budget = TokenBudget(redis, pool, capacity=100, lease_ttl_s=5)
    lease = await budget.try_reserve(60, "job-1")
    assert lease is not None and lease.cost == 60 and lease.pool == pool
    assert await budget.try_reserve(41, "job-2") is None
    assert await budget.in_use() == 60
    renewed = await budget.renew(lease)
    assert renewed.lease_id == lease.lease_id and renewed.expires_at_ms >= lease.expires_at_ms
    assert await budget.release(renewed) is True
    assert await budget.release(renewed) is False
    assert await budget.in_use() == 0
    with pytest.raises(CostExceedsCapacity, match="can never fit"):
        await budget.try_reserve(101, "job-3")
    with pytest.raises(CostExceedsCapacity):
        await budget.reserve(101, "job-3", timeout_s=10)
    keys = {key.decode() for key in await redis.keys(f"*{pool}*")}
    assert keys and all(key.startswith(f"vlmflow:{{{pool}}}:") for key in keys)


async def test_capacity_override_is_shared_by_the_pool(redis: Redis) -> None:
    pool = unique_pool()
    first = TokenBudget(redis, pool, capacity=100, lease_ttl_s=5)
    second = TokenBudget(redis, pool, capacity=100, lease_ttl_s=5)
    held = await first.try_reserve(50, "job-1")
    await first.set_capacity(40)
    assert (await second.state()).capacity == 40
    with pytest.raises(CostExceedsCapacity):
        await second.try_reserve(41, "job-2")
    assert await second.try_reserve(10, "job-2") is None, "held tokens count against the lowered capacity"
    assert held is not None and await first.release(held)
    assert await second.try_reserve(40, "job-2") is not None


async def test_expired_lease_comes_back_and_cannot_be_renewed(redis: Redis) -> None:
    budget = TokenBudget(redis, unique_pool(), capacity=100, lease_ttl_s=0.3)
    lease = await budget.try_reserve(70, "crashed")
    assert lease is not None
    await asyncio.sleep(0.4)
    assert await budget.in_use() == 0
    with pytest.raises(LeaseExpired):
        await budget.renew(lease)
    assert await budget.try_reserve(100, "next") is not None


async def test_lost_pool_state_is_rebuilt_by_renewals(redis: Redis) -> None:
    """The pool's keys vanish on a server that keeps running (a flush). The first caller that knew the old
    state starts the recovery: its renewal registers its lease again, and nobody is granted meanwhile."""
    pool = unique_pool()
    holder = TokenBudget(redis, pool, capacity=100, lease_ttl_s=5)
    lease = await holder.try_reserve(60, "holder")
    assert lease is not None
    await redis.delete(*await redis.keys(f"vlmflow:{{{pool}}}:*"))
    renewed = await holder.renew(lease)
    assert renewed.epoch != lease.epoch
    newcomer = TokenBudget(redis, pool, capacity=100, lease_ttl_s=5)
    assert await newcomer.try_reserve(10, "newcomer") is None
    state = await newcomer.state()
    assert state.in_use == 60 and state.recovering_until_ms > state.server_time_ms


async def test_timeout_and_cancel_leave_the_queue(redis: Redis) -> None:
    """The hog holds the whole pool and renews its lease, as every holder does, so however slow the machine its
    5 s lease cannot lapse and hand the waiters tokens while the test waits on them."""
    budget = TokenBudget(redis, unique_pool(), capacity=100, lease_ttl_s=5)
    async with budget.hold(100, "hog", timeout_s=5):
        started = time.monotonic()
        with pytest.raises(BudgetTimeout, match="within 0.3 s"):
            await budget.reserve(10, "late", timeout_s=0.3)
        assert 0.3 <= time.monotonic() - started < 1.0
        assert (await budget.state()).waiting == 0
        waiting = asyncio.create_task(budget.reserve(10, "cancelled", timeout_s=30))

        async def queued() -> bool:
            return (await budget.state()).waiting == 1

        await wait_until(queued)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (await budget.state()).waiting == 0


async def test_try_reserve_does_not_overtake_a_waiter(redis: Redis) -> None:
    budget = TokenBudget(redis, unique_pool(), capacity=100, lease_ttl_s=5)
    first = await budget.try_reserve(60, "first")
    assert first is not None
    big = asyncio.create_task(budget.reserve(50, "big", timeout_s=10))

    async def queued() -> bool:
        return (await budget.state()).waiting == 1

    await wait_until(queued)
    assert await budget.try_reserve(10, "small") is None, "10 tokens are free but the big reservation is first"
    await budget.release(first)
    lease = await big
    assert lease.cost == 50 and await budget.in_use() == 50


async def test_a_vanished_waiter_stops_blocking_the_queue(redis: Redis, stack_settings: Settings) -> None:
    pool = unique_pool()
    budget = TokenBudget(redis, pool, capacity=100, lease_ttl_s=5)
    assert await budget.try_reserve(50, "holder") is not None
    waiter = SPAWN.Process(target=wait_forever, args=(stack_settings.redis.url, pool, 100, 5.0, 80))
    waiter.start()
    try:

        async def queued() -> bool:
            return (await budget.state()).waiting == 1

        await wait_until(queued, timeout=30)
        assert await budget.try_reserve(10, "behind") is None
    finally:
        waiter.kill()
        waiter.join()
    killed = time.monotonic()
    lease = await budget.reserve(10, "behind", timeout_s=10)
    assert lease.cost == 10
    assert time.monotonic() - killed <= WAITER_TTL_S + 0.5


async def test_a_grant_to_a_vanished_waiter_lapses(redis: Redis, stack_settings: Settings) -> None:
    """A release grants the head of the queue even when its waiter died a moment ago (nobody knows yet). The
    waiter never confirms the grant, so its tokens come back within the waiter TTL, not the lease TTL (5 s)."""
    pool = unique_pool()
    budget = TokenBudget(redis, pool, capacity=100, lease_ttl_s=MAX_TTL_S)
    holder = await budget.try_reserve(50, "holder")
    assert holder is not None
    waiter = SPAWN.Process(target=wait_forever, args=(stack_settings.redis.url, pool, 100, MAX_TTL_S, 80))
    waiter.start()
    try:

        async def queued() -> bool:
            return (await budget.state()).waiting == 1

        await wait_until(queued, timeout=30)
    finally:
        waiter.kill()
        waiter.join()
    killed = time.monotonic()
    assert await budget.release(holder)
    assert await holders(redis, pool) == {"waiter"}, "the dead waiter was granted its 80 tokens"
    lease = await budget.reserve(30, "behind", timeout_s=10)
    assert lease.cost == 30
    assert time.monotonic() - killed <= WAITER_TTL_S + 0.5
    assert await holders(redis, pool) == {"behind"}


async def test_a_release_grants_the_waiting_run_at_once_and_tells_the_waiters(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release that frees the tokens grants every waiter that now fits, in arrival order, in one script, and
    publishes their tickets; the waiters take their leases on that notice, not on their next poll."""
    monkeypatch.setattr(budget_module, "HEAD_POLL_S", 30.0)
    monkeypatch.setattr(budget_module, "QUEUE_POLL_S", 30.0)
    pool = unique_pool()
    budget = TokenBudget(redis, pool, capacity=100, lease_ttl_s=5)
    hog = await budget.try_reserve(100, "hog")
    assert hog is not None
    waiters = []
    for index in range(4):
        waiters.append(asyncio.create_task(budget.reserve(30, f"waiter-{index}", timeout_s=20)))

        async def queued(count: int = index + 1) -> bool:
            return (await budget.state()).waiting == count

        await wait_until(queued)
    listener = redis.pubsub()
    await listener.subscribe(key_prefix(pool) + GRANTED_CHANNEL)
    assert (await listener.get_message(timeout=5))["type"] == "subscribe"
    released = time.monotonic()
    await budget.release(hog)
    notice = await listener.get_message(timeout=5)
    await listener.aclose()
    leases = await asyncio.wait_for(asyncio.gather(*waiters[:3]), timeout=5)
    assert time.monotonic() - released < 5, "the waiters took their leases on the notice, not on a 30 s poll"
    assert notice is not None and notice["data"].decode().split(" ") == [lease.lease_id for lease in leases]
    assert [lease.holder for lease in leases] == ["waiter-0", "waiter-1", "waiter-2"]
    state = await budget.state()
    assert all(lease.expires_at_ms - state.server_time_ms > 4_000 for lease in leases), "confirmed: a full TTL"
    assert (state.in_use, state.waiting) == (90, 1)
    waiters[3].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiters[3]


# -- many processes --------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_stress_processes_killed_while_holding(redis: Redis, stack_settings: Settings) -> None:
    """Ten processes with random costs and hold times; three are SIGKILLed while they hold leases. The pool is
    never over capacity, and the killed leases are free again within the lease TTL + 1 s."""
    pool, capacity, ttl_s = unique_pool(), 1_000, 2.0
    budget = TokenBudget(redis, pool, capacity, ttl_s)
    stop = SPAWN.Event()
    processes = {
        f"proc-{index}": SPAWN.Process(
            target=hammer,
            args=(stack_settings.redis.url, pool, capacity, ttl_s, f"proc-{index}", index, 450, 1.5, stop),
        )
        for index in range(10)
    }
    sampler = Sampler(redis, budget)
    sampler.start()
    for process in processes.values():
        process.start()
    try:

        async def three_hold() -> bool:
            return len(await holders(redis, pool)) >= 3

        await wait_until(three_hold, timeout=60)
        await asyncio.sleep(2.0)
        await wait_until(three_hold, poll=0.001)
        victims = sorted(await holders(redis, pool))[:3]
        for name in victims:
            processes[name].kill()
        killed = time.monotonic()
        stop.set()
        held_after_kill = set(victims) & await holders(redis, pool)
        assert len(held_after_kill) >= 2, f"the victims {victims} should hold leases when killed"

        async def all_free() -> bool:
            return await budget.in_use() == 0 and await live_sum(redis, pool) == 0

        await wait_until(all_free, poll=0.01, timeout=ttl_s + 5)
        recovered_s = time.monotonic() - killed
        for name, process in processes.items():
            process.join(timeout=30)
            if name not in victims:
                assert process.exitcode == 0, f"{name} failed"
    finally:
        for process in processes.values():
            if process.is_alive():
                process.kill()
                process.join()
        await sampler.stop()
    assert sampler.samples > 100
    assert sampler.over == []
    assert sampler.peak > capacity // 2, "the test should load the pool"
    assert recovered_s <= ttl_s + 1.0


@pytest.mark.slow
async def test_a_large_reservation_is_served_among_many_small_ones(redis: Redis, stack_settings: Settings) -> None:
    """Six processes keep taking small costs; without the queue, 80 of 100 tokens would rarely be free at once.
    Each large reservation waits at most for the small leases ahead of it to end (held up to 0.3 s)."""
    pool, capacity, ttl_s = unique_pool(), 100, 2.0
    budget = TokenBudget(redis, pool, capacity, ttl_s)
    stop = SPAWN.Event()
    processes = [
        SPAWN.Process(
            target=hammer,
            args=(stack_settings.redis.url, pool, capacity, ttl_s, f"small-{index}", index, 15, 0.3, stop),
        )
        for index in range(6)
    ]
    for process in processes:
        process.start()
    try:

        async def loaded() -> bool:
            return await budget.in_use() > capacity - 80

        await wait_until(loaded, poll=0.005, timeout=60)
        in_use = []
        for _ in range(100):
            in_use.append(await budget.in_use())
            await asyncio.sleep(0.005)
        assert sorted(in_use)[50] > capacity - 80, "80 tokens should seldom be free at once"
        waits = []
        for _ in range(5):
            asked = time.monotonic()
            lease = await budget.reserve(80, "large", timeout_s=20)
            waits.append(time.monotonic() - asked)
            await asyncio.sleep(0.1)
            await budget.release(lease)
            await asyncio.sleep(0.3)
        assert len(await holders(redis, pool)) >= 1, "the small ones keep going"
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    assert all(process.exitcode == 0 for process in processes)
    assert max(waits) < 0.3 + 1.5, waits


# -- Redis goes away -----------------------------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalStack]:
    settings = load_settings(state_dir=tmp_path / "valkey", redis={"url": f"redis://127.0.0.1:{free_port_block()}/0"})
    stack = LocalStack(settings, only=("redis",))
    stack.up()
    yield stack
    stack.down()


@pytest.mark.slow
async def test_redis_restart_grants_nothing_twice(own_redis: LocalStack) -> None:
    """Holder A renews through an outage; holder D died before it. Redis restarts empty. A's lease comes back
    when A renews, D's does not, and a waiter B (a client that never saw the pool before the restart) that
    needs A's tokens is served only after A releases."""
    url, capacity, ttl_s = own_redis.settings.redis.url, 100, 2.0
    pool = unique_pool()
    connections = [client(url) for _ in range(4)]
    await settled(connections[0], ttl_s)
    budget_a, budget_b, budget_d, observer = (TokenBudget(c, pool, capacity, ttl_s) for c in connections)
    lease_a = await budget_a.try_reserve(60, "A")
    assert lease_a is not None and await budget_d.try_reserve(30, "D") is not None
    done_a = asyncio.Event()
    a_released_at = 0.0

    async def holder_a() -> None:
        """Renews every 0.2 s, through the outage, until told to release."""
        nonlocal lease_a, a_released_at
        assert lease_a is not None
        while not done_a.is_set():
            with contextlib.suppress(BudgetUnavailable):
                lease_a = await budget_a.renew(lease_a)
            await asyncio.sleep(0.2)
        a_released_at = time.monotonic()
        await budget_a.release(lease_a)

    renewing = asyncio.create_task(holder_a())
    own_redis.down()
    with pytest.raises(BudgetUnavailable, match="Redis unavailable"):
        await budget_b.try_reserve(10, "B")
    with pytest.raises(BudgetUnavailable, match="Redis unavailable"):
        await budget_b.reserve(10, "B", timeout_s=0.5)
    waiting_b = asyncio.create_task(budget_b.reserve(50, "B", timeout_s=30))
    await asyncio.sleep(1.0)
    own_redis.up()
    restarted = time.monotonic()
    sampler = Sampler(connections[3], observer)
    sampler.start()
    try:
        await asyncio.sleep(ttl_s + 0.5)
        state = await observer.state()
        assert state.in_use == 60, "A's lease is back after its renewal; D's is not"
        assert not waiting_b.done(), "B needs A's tokens"
        done_a.set()
        await renewing
        lease_b = await waiting_b
        b_granted_at = time.monotonic()
        assert lease_b.cost == 50 and await observer.in_use() == 50
    finally:
        await sampler.stop()
        for connection in connections:
            await connection.aclose()
    assert b_granted_at >= a_released_at > restarted
    assert sampler.over == [] and sampler.samples > 10


# -- leases held with `hold`, through Redis blips and losses ---------------------------------------------------


async def lose_grant(redis: Redis, pool: str, lease: Lease) -> None:
    """What Redis leaves when it loses its latest writes (a failover to a replica that lagged, a restart that lost
    the last second): the grant's effects undone as a unit (a script's writes replicate together), the rest of the
    pool's state, its epoch included, kept."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(f"{key_prefix(pool)}leases", f"{lease.lease_id}|{lease.cost}|{lease.holder}")
        pipe.hincrby(f"{key_prefix(pool)}meta", "used", -lease.cost)
        await pipe.execute()


def through_proxy(proxy: TcpProxy) -> Redis:
    return client(proxy.url())


def redis_address(settings: Settings) -> tuple[str, int]:
    host_port = settings.redis.url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, port = host_port.rsplit(":", 1)
    return host, int(port)


async def test_hold_renews_while_held_and_releases_on_exit(redis: Redis) -> None:
    pool = unique_pool()
    budget = TokenBudget(redis, pool, capacity=100, lease_ttl_s=2)
    async with budget.hold(60, "holder", timeout_s=5) as held:
        assert held.lease is not None
        granted = held.lease
        await asyncio.sleep(4.5)
        assert held.lease is not None and held.lease.expires_at_ms > granted.expires_at_ms
        assert await live_leases(redis, pool) == [(60, "holder")], "only renewals keep a lease past its TTL"
    assert held.lease is None and held.lost is None
    assert await live_leases(redis, pool) == []


async def test_a_lease_lost_with_redis_latest_writes_is_registered_again(redis: Redis) -> None:
    """Issue 12 item 6: the holder's next renewal finds its lease unknown before its expiry, registers it again
    and makes grants wait a TTL, so others whose leases were lost too come back before anyone is lent more."""
    pool = unique_pool()
    budget = TokenBudget(redis, pool, capacity=100, lease_ttl_s=2)
    newcomer = TokenBudget(redis, pool, capacity=100, lease_ttl_s=2)
    async with budget.hold(60, "A", timeout_s=5) as held:
        assert held.lease is not None
        await lose_grant(redis, pool, held.lease)
        assert await live_leases(redis, pool) == []

        async def registered_again() -> bool:
            return await live_leases(redis, pool) == [(60, "A")]

        await wait_until(registered_again)
        assert await newcomer.try_reserve(30, "B") is None, "30 tokens fit, but grants wait after a loss"
        state = await newcomer.state()
        assert state.in_use == 60 and state.recovering_until_ms > state.server_time_ms
        assert held.lost is None
    assert await live_leases(redis, pool) == []


async def test_a_lost_lease_whose_tokens_were_lent_stops_its_holder(redis: Redis) -> None:
    """Issue 12 item 6: between the loss and the holder's renewal Redis lends the tokens again; the renewal cannot
    register the lease without passing the capacity, so the holder's block is cancelled with `LeaseLost`."""
    pool = unique_pool()
    ttl_s = 6.0  # NOTE: the first renewal comes 2 s after the grant, well after the loss and B's reservation
    budget = TokenBudget(redis, pool, capacity=100, lease_ttl_s=ttl_s)
    other = TokenBudget(redis, pool, capacity=100, lease_ttl_s=ttl_s)
    sampler = Sampler(redis, TokenBudget(redis, pool, capacity=100, lease_ttl_s=ttl_s))
    sampler.start()
    started = time.monotonic()
    try:
        with pytest.raises(LeaseLost, match="lost while held"):
            async with budget.hold(60, "A", timeout_s=5) as held:
                assert held.lease is not None
                await lose_grant(redis, pool, held.lease)
                assert await other.try_reserve(60, "B") is not None
                async with asyncio.timeout(10 * ttl_s):
                    await asyncio.sleep(3600)  # the holder's work, which the loss must stop
    finally:
        await sampler.stop()
    assert time.monotonic() - started < 2 * ttl_s
    assert await live_leases(redis, pool) == [(60, "B")]
    assert sampler.over == [] and sampler.samples > 0


async def test_a_deleted_lease_set_is_recounted_and_registered_again(redis: Redis) -> None:
    """A partial loss that leaves the `used` counter behind (the lease set alone gone): the renewal recounts
    before registering the lease again, so the stale count neither blocks it nor doubles it."""
    pool = unique_pool()
    budget = TokenBudget(redis, pool, capacity=100, lease_ttl_s=2)
    async with budget.hold(60, "A", timeout_s=5):
        await redis.delete(f"{key_prefix(pool)}leases")

        async def registered_again() -> bool:
            return await live_leases(redis, pool) == [(60, "A")]

        await wait_until(registered_again)
        assert (await budget.state()).in_use == 60
    assert (await budget.state()).in_use == 0


async def test_renewals_ride_out_a_redis_blip_shorter_than_the_ttl(redis: Redis, stack_settings: Settings) -> None:
    """Issue 12 item 7: Redis unreachable for less than the TTL costs retries, not the lease, and the lease is
    released on the way out."""
    pool = unique_pool()
    async with TcpProxy(*redis_address(stack_settings)) as proxy:
        connection = through_proxy(proxy)
        budget = TokenBudget(connection, pool, capacity=100, lease_ttl_s=4)
        try:
            async with budget.hold(60, "A", timeout_s=5) as held:
                proxy.cut()
                await asyncio.sleep(2.0)  # past a renewal (every 1.3 s)
                proxy.restore()
                cut_ended_ms = (await redis.time())[0] * 1000

                async def renewed_since() -> bool:
                    return held.lease is not None and held.lease.expires_at_ms > cut_ended_ms + 2_000

                await wait_until(renewed_since)
                assert await live_leases(redis, pool) == [(60, "A")]
            assert held.lost is None
            assert await live_leases(redis, pool) == []
        finally:
            await connection.aclose()


async def test_a_lease_that_lapses_while_redis_is_away_stops_its_holder(redis: Redis, stack_settings: Settings) -> None:
    """Issue 12 item 7: Redis unreachable past the TTL: the lease may be lent to others now, so the holder's block
    is cancelled with `LeaseLost` (no later than the TTL after its last renewal), and leaving does not raise for
    the release Redis cannot take."""
    pool = unique_pool()
    ttl_s = 2.0
    async with TcpProxy(*redis_address(stack_settings)) as proxy:
        connection = through_proxy(proxy)
        budget = TokenBudget(connection, pool, capacity=100, lease_ttl_s=ttl_s)
        try:
            with pytest.raises(LeaseLost, match="did not answer"):
                async with budget.hold(60, "A", timeout_s=5):
                    proxy.cut()
                    cut_at = time.monotonic()
                    async with asyncio.timeout(10 * ttl_s):
                        await asyncio.sleep(3600)
            assert time.monotonic() - cut_at <= ttl_s + 2.0
        finally:
            proxy.restore()
            await connection.aclose()

    async def lapsed() -> bool:
        return await live_leases(redis, pool) == []

    await wait_until(lapsed)


async def test_leaving_a_hold_during_a_renewal_never_hangs(redis: Redis) -> None:
    """redis-py lets a command in flight finish and may drop a cancellation that came meanwhile; a renewal loop
    that relied on being cancelled then went on forever, and the job leaving its lease waited for it. A 3 ms lease
    is renewed every millisecond, so leaving it hundreds of times meets renewals in flight (and sometimes finds it
    lapsed on a loaded machine: that is `LeaseLost`, not a hang)."""
    budget = TokenBudget(redis, unique_pool(), capacity=100, lease_ttl_s=0.003)
    rng = random.Random(5)
    for _ in range(1_000):
        async with asyncio.timeout(5):
            with contextlib.suppress(LeaseLost):
                async with budget.hold(1, "short", timeout_s=5):
                    await asyncio.sleep(rng.random() * 0.004)

    async def all_released() -> bool:
        return await live_leases(redis, budget.pool) == []

    await wait_until(all_released)
