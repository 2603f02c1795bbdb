"""Benchmark: reserve+release pairs per second on the token budget, next to pairs of bare Redis round trips on
the same server in the same run. Each reserve and each release is one EVALSHA, so a pair should cost about
two bare round trips (ratio near 1). Two more columns place that: two EVALSHA of a script that does nothing but
gets the budget's keys and arguments (the price of a script call), and two EVALSHA of scripts that make only the
Redis commands a reservation and a release cannot do without (the floor for any script-based budget).

Then contention: callers that each hold a lease for a few milliseconds, with capacity for only a few leases at a
time, so a queue forms and stays. Grants per second are set against the ideal (leases at once / hold time, which
leaves out the two round trips and the sleep's overshoot of every cycle): a queue served on release comes close;
one served on the waiters' poll intervals does not.

    python bench/bench_budget.py [--rounds 9] [--seconds 1] [--concurrency 1,16] [--background-leases 0,1000]
                                 [--contention-callers 16] [--contention-budgets 1,16] [--hold-ms 5] [--fit 4]

Uses VLMFLOW_REDIS__URL or REDIS_URL when a server answers there, else starts its own Valkey on a free port.

Figures on the shared 2-core machine, Valkey 8 on loopback, `python bench/bench_budget.py` (defaults), run after
run with the previous layout (5 keys, 8-13 arguments, polled queue) and the present one (4 keys, 2-3 arguments,
constants in the script source, 4 Redis commands per reserve or release on the common path, queue served on
release):

    callers leases | ratio before | ratio now | no-op pair ratio | floor pair ratio
          1      0 |         1.79 |      1.53 |             1.07 |             1.19
          1   1000 |         1.69 |      1.54 |             1.16 |             1.34
         16      0 |         1.48 |      1.31 |             1.16 |             1.18
         16   1000 |         1.37 |      1.29 |             1.13 |             1.14

    contention, 16 callers, 5 ms holds, room for 4 (ideal 800 grants/s):
    budgets | before: grants/s, median wait | now: grants/s, median wait
          1 |          42/s,  360 ms       |      550/s,  22 ms
         16 |          44/s,  312 ms       |      472/s,  25 ms

The floor pair, four plain commands per script, already costs 1.14-1.34 times two GETs: each redis.call costs about
a microsecond in the server and a script call a few more, and here each microsecond of server time cost the client
about three (a GET's reply is often in the socket before the client's event loop polls; a script's is not, and the
client pays a sleep and a wake-up). The budget stays 0.15-0.35 above that floor for its own checks (epoch, recovery,
queue), its answer and its Python side. Over a network, where every round trip waits, the ratios shrink.
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
from workers.budget_scripts import keys

LEASE_TTL_S = 5.0
"""The measured leases live for microseconds; the background ones are renewed by a longer TTL of their own."""
COST = 1_000
"""Tokens per measured lease."""


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


FLOOR_RESERVE = """
local clock = redis.call('TIME')
redis.call('HMGET', KEYS[1], 'epoch', 'recovering', 'used', 'capacity', 'waiting')
redis.call('HINCRBY', KEYS[1], 'used', 1000)
redis.call('ZADD', KEYS[2], tonumber(clock[1]) * 1000 + 5000, ARGV[2])
return ARGV[1]
"""
FLOOR_RELEASE = """
redis.call('TIME')
redis.call('HMGET', KEYS[1], 'epoch', 'recovering', 'used', 'capacity', 'waiting')
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'used', -1000)
return ARGV[1]
"""
"""The Redis commands a reservation that fits and its release cannot do without (server time, the pool's counters,
the lease), and nothing else: the floor for any script-based budget."""


async def measure(
    url: str, concurrency: int, background_leases: int, rounds: int, seconds: float
) -> tuple[float, float, float, float, float]:
    """Median pairs/s of reserve+release, of two GETs, of two no-op scripts and of the two floor scripts, and the
    median of the rounds' ratios (GET to budget); the kinds alternate round by round so that all see the same load
    on the machine."""
    redis = Redis.from_url(url, max_connections=max(concurrency, 1) + 4)
    pool = f"bench-{uuid.uuid4().hex[:8]}"
    budget = TokenBudget(redis, pool, capacity=10_000_000, lease_ttl_s=LEASE_TTL_S)
    await budget.state()  # the pool's state begins with the measured budget's TTL
    background = TokenBudget(redis, pool, capacity=10_000_000, lease_ttl_s=600)
    for index in range(background_leases):
        await background.try_reserve(1, f"background-{index}")
    await redis.set("bench:key", "x")

    async def budget_pair() -> None:
        lease = await budget.reserve(COST, "bench", timeout_s=10)
        await budget.release(lease)

    async def bare_pair() -> None:
        await redis.get("bench:key")
        await redis.get("bench:key")

    # NOTE: the scripts below get what the budget sends: its keys, the epoch, a member and (reserve) the mode.
    floor_keys = keys(f"{pool}-floor")
    member, epoch = f"{'0' * 32}|{COST}|bench", "1795700000000000"
    noop, floor_reserve, floor_release = (
        redis.register_script(source) for source in ("return ARGV[1]", FLOOR_RESERVE, FLOOR_RELEASE)
    )

    async def noop_pair() -> None:
        await redis.evalsha(noop.sha, len(floor_keys), *floor_keys, epoch, member, "new")
        await redis.evalsha(noop.sha, len(floor_keys), *floor_keys, epoch, member)

    async def floor_pair() -> None:
        await redis.evalsha(floor_reserve.sha, len(floor_keys), *floor_keys, epoch, member, "new")
        await redis.evalsha(floor_release.sha, len(floor_keys), *floor_keys, epoch, member)

    await budget_pair()  # loads the budget's scripts
    for script in (noop, floor_reserve, floor_release):
        await script(keys=floor_keys, args=(epoch, member))
    rates: dict[str, list[float]] = {"budget": [], "bare": [], "noop": [], "floor": []}
    for _ in range(rounds):
        for kind, pair in (("budget", budget_pair), ("bare", bare_pair), ("noop", noop_pair), ("floor", floor_pair)):
            rates[kind].append(await pairs_per_second(pair, concurrency, seconds))
    await redis.delete(*keys(pool), *floor_keys, "bench:key")
    await redis.aclose()
    ratios = [bare / budget for budget, bare in zip(rates["budget"], rates["bare"], strict=True)]
    budget_rate, bare_rate, noop_rate, floor_rate = (statistics.median(kind) for kind in rates.values())
    return budget_rate, bare_rate, noop_rate, floor_rate, statistics.median(ratios)


async def contention(
    url: str, callers: int, budgets: int, fit: int, hold_s: float, seconds: float
) -> tuple[float, float, float]:
    """Grants per second, and the median and longest wait for a grant in seconds, of `callers` that each reserve
    `COST`, hold the lease `hold_s` and release it, on a pool with room for `fit` leases; the callers share
    `budgets` TokenBudgets, each with its own connection pool (1: one worker process with many jobs in flight;
    as many as callers: one process per caller)."""
    pool = f"bench-{uuid.uuid4().hex[:8]}"
    connections = [Redis.from_url(url, max_connections=callers + 8) for _ in range(budgets)]
    shares = [TokenBudget(connection, pool, capacity=fit * COST, lease_ttl_s=LEASE_TTL_S) for connection in connections]
    await shares[0].state()
    waits: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def caller(budget: TokenBudget) -> None:
        while time.perf_counter() < stop_at:
            asked = time.perf_counter()
            lease = await budget.reserve(COST, "bench", timeout_s=30)
            waits.append(time.perf_counter() - asked)
            await asyncio.sleep(hold_s)
            await budget.release(lease)

    started = time.perf_counter()
    await asyncio.gather(*(caller(shares[index % budgets]) for index in range(callers)))
    elapsed = time.perf_counter() - started
    await connections[0].delete(*keys(pool))
    for connection in connections:
        await connection.aclose()
    return len(waits) / elapsed, statistics.median(waits), max(waits)


def print_pairs(url: str, args: argparse.Namespace) -> None:
    header = ("callers", "leases", "reserve+release/s", "2 x GET/s", "ratio", "no-op pair/s", "ratio",
              "floor pair/s", "ratio")  # fmt: skip
    print("{:>7} {:>7} {:>18} {:>10} {:>6} {:>13} {:>6} {:>13} {:>6}".format(*header))
    for concurrency in (int(value) for value in args.concurrency.split(",")):
        for background in (int(value) for value in args.background_leases.split(",")):
            budget_rate, bare_rate, noop_rate, floor_rate, ratio = asyncio.run(
                measure(url, concurrency, background, args.rounds, args.seconds)
            )
            print(
                f"{concurrency:>7} {background:>7} {budget_rate:>18,.0f} {bare_rate:>10,.0f} {ratio:>6.2f}"
                f" {noop_rate:>13,.0f} {bare_rate / noop_rate:>6.2f}"
                f" {floor_rate:>13,.0f} {bare_rate / floor_rate:>6.2f}"
            )
    print("ratio = time of the pair / time of two bare GET round trips (1.00 = equal). no-op pair: two EVALSHA")
    print("of `return ARGV[1]` with the budget's keys and arguments; floor pair: two EVALSHA that make only the")
    print("Redis commands a reservation and a release need (FLOOR_RESERVE, FLOOR_RELEASE). Rates are medians of")
    print(f"{args.rounds} rounds; the first ratio is the median of the rounds' ratios.")


def print_contention(url: str, args: argparse.Namespace) -> None:
    hold_s, ideal = args.hold_ms / 1000, args.fit / (args.hold_ms / 1000)
    print(
        f"\ncontention: {args.contention_callers} callers each hold a lease {args.hold_ms:g} ms, room for {args.fit}"
        f" at a time; ideal {ideal:,.0f} grants/s; {args.rounds} rounds of {args.seconds:.1f} s"
    )
    header = ("budgets", "grants/s", "ideal", "ratio", "median wait ms", "longest wait ms")
    print("{:>7} {:>9} {:>7} {:>6} {:>15} {:>16}".format(*header))
    for budgets in (int(value) for value in args.contention_budgets.split(",")):
        runs = [
            asyncio.run(contention(url, args.contention_callers, budgets, args.fit, hold_s, args.seconds))
            for _ in range(args.rounds)
        ]
        rate, median_wait, longest_wait = (statistics.median(column) for column in zip(*runs, strict=True))
        print(
            f"{budgets:>7} {rate:>9,.0f} {ideal:>7,.0f} {rate / ideal:>6.2f} {median_wait * 1000:>15.1f}"
            f" {longest_wait * 1000:>16.1f}"
        )
    print("budgets = TokenBudgets (each with its own connections) the callers share; figures are medians of rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds of each kind, alternating")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each timed round")
    parser.add_argument("--concurrency", default="1,16", help="callers at once, comma-separated")
    parser.add_argument("--background-leases", default="0,1000", help="live leases of other holders, comma-separated")
    parser.add_argument("--contention-callers", type=int, default=16, help="callers in the contention runs (0: skip)")
    parser.add_argument("--contention-budgets", default="1,16", help="TokenBudgets they share, comma-separated")
    parser.add_argument("--hold-ms", type=float, default=5.0, help="how long each contending caller holds its lease")
    parser.add_argument("--fit", type=int, default=4, help="leases the pool has room for at once")
    args = parser.parse_args()
    with redis_server() as url:
        uptime_s = sync_redis.Redis.from_url(url).info("server")["uptime_in_seconds"]
        if uptime_s <= LEASE_TTL_S:
            # NOTE: on a server younger than a lease TTL a new pool waits that long (it may have lost leases).
            time.sleep(LEASE_TTL_S + 1 - uptime_s)
        version = sync_redis.Redis.from_url(url).info("server").get("redis_version")
        print(f"server {url} (redis_version {version}), {args.rounds} alternating rounds of {args.seconds:.1f} s each")
        print_pairs(url, args)
        if args.contention_callers > 0:
            print_contention(url, args)


if __name__ == "__main__":
    main()
