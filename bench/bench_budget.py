"""Benchmark: reserve+release pairs per second on the token budget, next to pairs of bare Redis round trips on
the same server in the same run. Each reserve and each release is one EVALSHA, so a pair should cost about
two bare round trips (ratio near 1). A third column, two EVALSHA of a script that does nothing but with the
budget's keys and arguments, separates the price of a script call from the price of the budget's own work.

    python bench/bench_budget.py [--rounds 9] [--seconds 1] [--concurrency 1,16] [--background-leases 0,1000]

Uses VLMFLOW_REDIS__URL or REDIS_URL when a server answers there, else starts its own Valkey on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import redis as sync_redis
from redis.asyncio import Redis

from schemas.settings import load_settings
from vlmflow.stack import LocalStack
from workers.budget import TokenBudget
from workers.budget_scripts import KEY_NAMES

LEASE_TTL_S = 5.0
"""The measured leases live for microseconds; the background ones are renewed by a longer TTL of their own."""


def _answers(url: str) -> bool:
    try:
        sync_redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except sync_redis.RedisError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def redis_server() -> Iterator[str]:
    """The URL of a server to measure against: the configured one, or a Valkey of our own."""
    for url in (os.environ.get("VLMFLOW_REDIS__URL"), os.environ.get("REDIS_URL")):
        if url and _answers(url):
            yield url
            return
    with tempfile.TemporaryDirectory() as state_dir:
        settings = load_settings(state_dir=state_dir, redis={"url": f"redis://127.0.0.1:{_free_port()}/0"})
        stack = LocalStack(settings, only=("redis",))
        stack.up()
        try:
            yield settings.redis.url
        finally:
            stack.down()


async def pairs_per_second(pair: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> float:
    """How many `pair()` calls complete per second with `concurrency` callers."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await pair()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def measure(
    url: str, concurrency: int, background_leases: int, rounds: int, seconds: float
) -> tuple[float, float, float, float]:
    """Median pairs/s of reserve+release, of two GETs and of two no-op scripts, and the median of the rounds'
    ratios (budget to GET); the kinds alternate round by round so that all see the same load on the machine."""
    redis = Redis.from_url(url, max_connections=max(concurrency, 1) + 4)
    pool = f"bench-{uuid.uuid4().hex[:8]}"
    budget = TokenBudget(redis, pool, capacity=10_000_000, lease_ttl_s=LEASE_TTL_S)
    await budget.state()  # the pool's state begins with the measured budget's TTL
    background = TokenBudget(redis, pool, capacity=10_000_000, lease_ttl_s=600)
    for index in range(background_leases):
        await background.try_reserve(1, f"background-{index}")
    await redis.set("bench:key", "x")

    async def budget_pair() -> None:
        lease = await budget.reserve(1_000, "bench", timeout_s=10)
        await budget.release(lease)

    async def bare_pair() -> None:
        await redis.get("bench:key")
        await redis.get("bench:key")

    noop = redis.register_script("return ARGV[1]")
    keys = [f"vlmflow:{{{pool}}}:{name}" for name in KEY_NAMES]
    args = [10_000_000, 5_000, "1795700000000000", 1_000, "bench", "0" * 32, "0" * 32, 2_000]

    async def noop_pair() -> None:
        await noop(keys=keys, args=args)
        await noop(keys=keys, args=args)

    await budget_pair()  # loads the scripts
    await noop_pair()
    budget_rates, bare_rates, noop_rates = [], [], []
    for _ in range(rounds):
        budget_rates.append(await pairs_per_second(budget_pair, concurrency, seconds))
        bare_rates.append(await pairs_per_second(bare_pair, concurrency, seconds))
        noop_rates.append(await pairs_per_second(noop_pair, concurrency, seconds))
    await redis.delete(*await redis.keys(f"vlmflow:{{{pool}}}:*"), "bench:key")
    await redis.aclose()
    ratios = [bare / budget for budget, bare in zip(budget_rates, bare_rates, strict=True)]
    medians = (statistics.median(rates) for rates in (budget_rates, bare_rates, noop_rates))
    return (*medians, statistics.median(ratios))  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds of each kind, alternating")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each timed round")
    parser.add_argument("--concurrency", default="1,16", help="callers at once, comma-separated")
    parser.add_argument("--background-leases", default="0,1000", help="live leases of other holders, comma-separated")
    args = parser.parse_args()
    with redis_server() as url:
        uptime_s = sync_redis.Redis.from_url(url).info("server")["uptime_in_seconds"]
        if uptime_s <= LEASE_TTL_S:
            # NOTE: on a server younger than a lease TTL a new pool waits that long (it may have lost leases).
            time.sleep(LEASE_TTL_S + 1 - uptime_s)
        version = sync_redis.Redis.from_url(url).info("server").get("redis_version")
        print(f"server {url} (redis_version {version}), {args.rounds} alternating rounds of {args.seconds:.1f} s each")
        header = ("callers", "leases", "reserve+release/s", "2 x GET/s", "ratio", "2 x no-op script/s")
        print("{:>7} {:>7} {:>18} {:>10} {:>6} {:>19}".format(*header))
        for concurrency in (int(value) for value in args.concurrency.split(",")):
            for background in (int(value) for value in args.background_leases.split(",")):
                budget_rate, bare_rate, noop_rate, ratio = asyncio.run(
                    measure(url, concurrency, background, args.rounds, args.seconds)
                )
                print(
                    f"{concurrency:>7} {background:>7} {budget_rate:>18,.0f} {bare_rate:>10,.0f} {ratio:>6.2f}"
                    f" {noop_rate:>19,.0f}"
                )
        print("ratio = time of one reserve+release / time of two bare GET round trips (1.00 = equal);")
        print(f"rates are medians of {args.rounds} rounds, the ratio the median of the rounds' ratios")


if __name__ == "__main__":
    main()
