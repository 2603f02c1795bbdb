"""The shared vision-token budget of a GPU pool, held in Redis as leases.

A job holds a lease for its cost from admission until its result is published. Every operation is one Lua
script (workers/budget_scripts.py) on Redis server time, so the books stay right across any number of worker
processes and clocks: at every instant the sum of live leases is at most the capacity (a capacity lowered below
the tokens in use takes effect as leases end). A lease lapses unless renewed within its TTL (renew every third
of it), so a crashed worker's tokens come back by themselves. Waiting reservations are served first come, first
served from a queue in Redis: the script that frees tokens grants the queue's head and the waiters after it that
fit, in one go, and tells them on the pool's channel (workers/budget_notices.py), so grants follow releases, not
poll intervals. Waiters still ask now and then, to keep their place and in case a notice is lost. A waiter that
vanishes drops out of the queue after `WAITER_TTL_S`, and a grant it never confirmed lapses after as long.

Redis may lose the pool's state while holders still use their leases. When the state is new on a server that
started less than one lease TTL ago (a restart without persistence), or a caller saw an older incarnation of it
(a flush), grants wait until one TTL after that start, and a holder's renewal in that window registers its lease
again. So a fresh Redis makes the first grants wait up to one lease TTL. Redis may also lose only its latest
writes (a failover to a replica that lagged, a restart that lost the last second of its append-only file): a
renewal then finds its lease unknown before the expiry its holder heard of, registers it again if it fits and
makes grants wait one TTL, so the other holders of lost leases do the same. A lease that does not fit any more
(its tokens were lent between the loss and the renewal) is lost.

Holding a lease is `async with budget.hold(cost, holder, timeout_s=...) as held:` (`HeldLease`). It renews every
third of the TTL and rides out Redis not answering by retrying until the lease's TTL runs out. A lease that is
lost while held (it lapsed, or Redis answers that it is gone) cancels the block, which then raises `LeaseLost`:
whoever held it must not go on using tokens that may be lent to someone else. So at no instant does the sum of
the leases Redis knows exceed the capacity, and a holder uses tokens without a lease for at most one renewal
interval after Redis lost its lease.

This module is the adapter: it only passes arguments to the scripts and turns their answers into `Lease`s and
errors. The accounting itself lives in the scripts, where it is atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from dataclasses import dataclass, replace
from types import TracebackType
from typing import ClassVar, NamedTuple

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import BusyLoadingError, NoScriptError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.errors import ErrorCode, VlmflowError
from workers import budget_scripts
from workers.budget_notices import GrantNotices

log = logging.getLogger(__name__)

HEAD_POLL_S = 0.01
"""How often the waiter at the head of the queue asks again without a notice: it notices the tokens of expired
leases and the end of a recovery, which nobody announces."""
QUEUE_POLL_S = 0.05
"""How often the other waiters ask again without a notice, to keep their place (and how often anyone retries an
absent Redis)."""
WAITER_TTL_S = 2.0
"""A waiter that has not asked for this long (40 polls) is gone: its ticket leaves the queue, and a grant made for
it that it did not confirm lapses."""
POOL_NAME = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")
"""No braces: the pool name becomes the keys' hash tag."""

UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError)
"""Redis errors that mean "not reachable now" rather than a defect."""


class BudgetError(VlmflowError):
    """Root of the budget's errors."""


class CostExceedsCapacity(BudgetError):
    """The cost can never fit: it is larger than the whole budget. Waiting would not help."""

    code: ClassVar[ErrorCode] = "too_many_tokens"

    def __init__(self, pool: str, cost: int, capacity: int):
        self.pool, self.cost, self.capacity = pool, cost, capacity
        super().__init__(f"{cost:,} vision tokens can never fit budget pool {pool!r} (capacity {capacity:,})")


class BudgetTimeout(BudgetError):
    """No tokens within the allowed wait."""

    code: ClassVar[ErrorCode] = "budget_timeout"

    def __init__(self, pool: str, cost: int, waited_s: float):
        self.pool, self.cost, self.waited_s = pool, cost, waited_s
        super().__init__(f"no {cost:,} vision tokens free in budget pool {pool!r} within {waited_s:.1f} s")


class BudgetUnavailable(BudgetError):
    """Redis did not answer. Nothing was granted that the caller knows of; a grant whose answer was lost lapses
    by its TTL."""

    def __init__(self, pool: str, cause: BaseException):
        self.pool = pool
        super().__init__(f"budget pool {pool!r}: Redis unavailable ({type(cause).__name__}: {cause})")


class LeaseExpired(BudgetError):
    """The lease is gone: it was not renewed within its TTL and its tokens went back to the pool."""

    def __init__(self, lease: Lease):
        self.lease = lease
        super().__init__(f"lease {lease.lease_id} of {lease.holder!r} on budget pool {lease.pool!r} expired")


class LeaseLost(BudgetError):
    """A lease held by `HeldLease` was lost while its block ran: the block was cancelled and must not go on."""

    code: ClassVar[ErrorCode] = "lease_lost"

    def __init__(self, holder: str, pool: str, reason: str):
        self.holder, self.pool = holder, pool
        super().__init__(f"the lease of {holder!r} on budget pool {pool!r} was lost while held: {reason}")


@dataclass(frozen=True)
class Lease:
    """Tokens held from the budget. Renew it before `expires_at_ms`; release it when done."""

    lease_id: str
    """Unique per grant; with the cost and the holder it names the lease in Redis."""
    pool: str
    """The budget pool the tokens came from."""
    holder: str
    """Who holds the tokens (for example "<worker>/<job_id>"), kept in Redis for inspection."""
    cost: int
    """Vision tokens held."""
    expires_at_ms: int
    """Redis server time (ms since the Unix epoch) at which the lease lapses unless renewed."""
    epoch: str
    """The incarnation of the pool's state that granted (or last renewed) the lease; lets a renewal register
    the lease again after Redis lost its data."""


@dataclass(frozen=True)
class BudgetState:
    """A snapshot of a pool, after expired leases were reclaimed."""

    capacity: int
    """Tokens the pool may lend at once (the live override if one was set, else the configured capacity)."""
    in_use: int
    """Sum of the costs of live leases."""
    leases: int
    """Number of live leases."""
    waiting: int
    """Reservations in the queue."""
    recovering_until_ms: int
    """Server time until which grants wait after Redis lost the pool's state; in the past when not recovering."""
    server_time_ms: int
    """Redis server time of the snapshot."""


class _Answer(NamedTuple):
    """One script's answer."""

    status: str
    epoch: str
    numbers: list[int]
    """What they mean depends on the script and the status (see workers/budget_scripts.py)."""


def _answer(reply: bytes | str) -> _Answer:
    status, epoch, *numbers = (reply.decode() if isinstance(reply, bytes) else reply).split(" ")
    return _Answer(status, epoch, [int(number) for number in numbers])


def _new_id() -> str:
    return os.urandom(16).hex()


def _member(lease_id: str, cost: int, holder: str) -> str:
    """How the scripts name a lease and its reservation (workers/budget_scripts.py)."""
    return f"{lease_id}|{cost}|{holder}"


def _poll_interval(place: int) -> float:
    return HEAD_POLL_S if place == 0 else QUEUE_POLL_S


class TokenBudget:
    """The vision-token budget of one GPU pool, shared through Redis by every worker of the pool.

    `capacity` is the configured capacity; `set_capacity` stores a live override for the whole pool, which wins
    until Redis loses it. `lease_ttl_s` bounds how long a crashed holder's tokens stay taken.
    """

    def __init__(self, redis: Redis, pool: str, capacity: int, lease_ttl_s: float):
        if not POOL_NAME.match(pool):
            raise ValueError(f"budget pool name {pool!r} must be 1-100 of A-Z a-z 0-9 . _ : -")
        if capacity < 1:
            raise ValueError(f"budget capacity must be at least 1, got {capacity}")
        if lease_ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {lease_ttl_s}")
        self.redis = redis
        self.pool = pool
        self.capacity = capacity
        self.lease_ttl_s = lease_ttl_s
        self._keys = budget_scripts.keys(pool)
        self._epoch = ""
        constants = {
            "capacity": capacity,
            "ttl_ms": max(1, round(lease_ttl_s * 1000)),
            "waiter_ttl_ms": round(WAITER_TTL_S * 1000),
        }
        self._reserve, self._renew, self._release, self._state, self._set_capacity = (
            redis.register_script(budget_scripts.source(body, **constants))
            for body in (
                budget_scripts.RESERVE,
                budget_scripts.RENEW,
                budget_scripts.RELEASE,
                budget_scripts.STATE,
                budget_scripts.SET_CAPACITY,
            )
        )
        self._notices = GrantNotices(redis, budget_scripts.key_prefix(pool) + budget_scripts.GRANTED_CHANNEL)

    async def _run(self, script: AsyncScript, *args: str) -> _Answer:
        # NOTE: EVALSHA straight through the client, as the Script object's own call costs more than packing
        # this call's arguments; the Script loads it when Redis does not know it (new server, restart, flush).
        try:
            try:
                reply = await self.redis.evalsha(script.sha, len(self._keys), *self._keys, self._epoch, *args)
            except NoScriptError:
                reply = await script(keys=self._keys, args=(self._epoch, *args))
        except UNAVAILABLE as exc:
            raise BudgetUnavailable(self.pool, exc) from exc
        answer = _answer(reply)
        self._epoch = answer.epoch
        return answer

    def _lease(self, lease_id: str, holder: str, cost: int, answer: _Answer) -> Lease:
        return Lease(lease_id, self.pool, holder, cost, answer.numbers[0], answer.epoch)

    @staticmethod
    def _check_cost(cost: int) -> None:
        if cost < 1:
            raise ValueError(f"a reservation costs at least 1 token, got {cost}")

    async def try_reserve(self, cost: int, holder: str) -> Lease | None:
        """A lease now, or None when the tokens are not free, others are already waiting for theirs, or the pool
        is recovering from a loss of Redis' data."""
        self._check_cost(cost)
        lease_id = _new_id()
        answer = await self._run(self._reserve, _member(lease_id, cost, holder), "try")
        if answer.status == "too_large":
            raise CostExceedsCapacity(self.pool, cost, answer.numbers[0])
        return self._lease(lease_id, holder, cost, answer) if answer.status == "granted" else None

    def hold(self, cost: int, holder: str, *, timeout_s: float) -> HeldLease:
        """`async with budget.hold(cost, holder, timeout_s=...) as held:` reserves (as `reserve`), renews the
        lease every third of its TTL while the block runs, and releases it on the way out."""
        return HeldLease(self, cost, holder, timeout_s)

    async def reserve(self, cost: int, holder: str, timeout_s: float) -> Lease:
        """A lease, waiting in line (first come, first served) up to `timeout_s`.

        Raises `CostExceedsCapacity` at once when the cost can never fit, `BudgetTimeout` when the wait runs
        out, and `BudgetUnavailable` when it runs out while Redis does not answer. Retries while Redis is away.
        """
        self._check_cost(cost)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # NOTE: one member names the reservation in the queue and, once granted, its lease.
        lease_id = _new_id()
        member = _member(lease_id, cost, holder)
        mode = "new"
        granted = False
        self._notices.expect(lease_id)
        try:
            while True:
                unavailable: BudgetUnavailable | None = None
                place = 1
                try:
                    answer = await self._run(self._reserve, member, mode)
                except BudgetUnavailable as exc:
                    unavailable = exc
                else:
                    if answer.status == "granted":
                        granted = True
                        return self._lease(lease_id, holder, cost, answer)
                    if answer.status == "too_large":
                        raise CostExceedsCapacity(self.pool, cost, answer.numbers[0])
                    place = answer.numbers[0]
                # NOTE: from the first call on, Redis may know the member (even when the answer was lost).
                mode = "again"
                remaining = started + timeout_s - loop.time()
                if remaining <= 0:
                    if unavailable is not None:
                        raise unavailable
                    raise BudgetTimeout(self.pool, cost, loop.time() - started)
                await self._notices.wait(lease_id, min(_poll_interval(place), remaining))
        finally:
            self._notices.forget(lease_id)
            if not granted:
                await self._withdraw(member)

    async def _withdraw(self, member: str) -> None:
        """Leave the queue, and free a grant whose answer was lost or that came too late. Best effort: what Redis
        does not hear of lapses by itself (a place in the queue or an unconfirmed grant after WAITER_TTL_S, a
        grant whose answer was lost after the lease TTL)."""
        with contextlib.suppress(BudgetUnavailable):
            await self._run(self._release, member)

    async def renew(self, lease: Lease) -> Lease:
        """The lease with a new expiry one TTL from now (registered again when Redis lost it while it was live).
        Raises `LeaseExpired` when it lapsed already, or was lost and its tokens do not fit any more."""
        member = _member(lease.lease_id, lease.cost, lease.holder)
        answer = await self._run(self._renew, member, lease.epoch, str(lease.expires_at_ms))
        if answer.status == "lost":
            raise LeaseExpired(lease)
        return replace(lease, expires_at_ms=answer.numbers[0], epoch=answer.epoch)

    async def release(self, lease: Lease) -> bool:
        """Give the tokens back. True when this call freed them (False: released before, or expired and
        reclaimed); releasing twice is harmless."""
        answer = await self._run(self._release, _member(lease.lease_id, lease.cost, lease.holder))
        return answer.numbers[0] > 0

    async def state(self) -> BudgetState:
        answer = await self._run(self._state)
        in_use, capacity, leases, waiting, recovering_until_ms, server_time_ms = answer.numbers
        return BudgetState(capacity, in_use, leases, waiting, recovering_until_ms, server_time_ms)

    async def in_use(self) -> int:
        """Tokens held by live leases now."""
        return (await self.state()).in_use

    async def set_capacity(self, n: int) -> None:
        """Set the pool's capacity for every worker. Leases already granted stay; new grants fit under `n`."""
        if n < 1:
            raise ValueError(f"budget capacity must be at least 1, got {n}")
        await self._run(self._set_capacity, str(n))


class HeldLease:
    """A lease held for the length of an `async with` block (redis-py's `asyncio.Lock` is the model): entering
    reserves (as `TokenBudget.reserve`), a background task renews every third of the TTL, leaving releases.

    Renewals retry while Redis does not answer, until the TTL since the last renewal has passed. When the lease is
    lost (that deadline passed, or Redis answers that it is gone) the task running the block is cancelled, and the
    block raises `LeaseLost` instead of `CancelledError` (as `asyncio.timeout` raises `TimeoutError`).
    """

    def __init__(self, budget: TokenBudget, cost: int, holder: str, timeout_s: float):
        self.budget = budget
        self.cost = cost
        self.holder = holder
        self.timeout_s = timeout_s
        self.lease: Lease | None = None
        """The lease as last renewed; None before it is granted and once it is released or lost."""
        self.lost: LeaseLost | None = None
        """Why the lease was lost while held; None while it is held."""
        self._task: asyncio.Task[object] | None = None  # the task running the block, cancelled on a loss
        self._renewer: asyncio.Task[None] | None = None
        self._leaving = False  # the block ended: a loss found now cancels nothing
        self._cancelled = False  # a loss cancelled the block

    async def __aenter__(self) -> HeldLease:
        self.lease = await self.budget.reserve(self.cost, self.holder, self.timeout_s)
        self._task = asyncio.current_task()
        self._renewer = asyncio.create_task(self._renew_while_held(), name=f"lease renewal {self.holder}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._leaving = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self.lease is not None:
            lease, self.lease = self.lease, None
            try:
                await self.budget.release(lease)
            except BudgetUnavailable as unavailable:
                log.warning("%s; the lease lapses by its TTL instead", unavailable)
        if self.lost is None:
            return
        assert self._task is not None
        others_cancelled = self._cancelled and self._task.uncancel() > 0
        # NOTE: a block also cancelled by someone else (a shutdown) goes on being cancelled.
        if not (others_cancelled and exc_type is asyncio.CancelledError):
            raise self.lost from exc

    async def _renew_while_held(self) -> None:
        assert self.lease is not None
        loop = asyncio.get_running_loop()
        ttl_s = self.budget.lease_ttl_s
        held_until = loop.time() + ttl_s  # NOTE: a lower bound of the lease's expiry in Redis, on this clock
        # NOTE: `_leaving`, not only the cancellation, ends the loop: redis-py lets a command in flight finish and
        # may drop the cancellation that came meanwhile (redis/redis-py#2666).
        while not self._leaving:
            await asyncio.sleep(ttl_s / 3)
            while not self._leaving:
                sent_at = loop.time()
                if sent_at >= held_until:
                    self._lose("Redis did not answer its renewals within the lease's TTL")
                    return
                try:
                    async with asyncio.timeout(held_until - sent_at):
                        self.lease = await self.budget.renew(self.lease)
                except LeaseExpired:
                    self._lose("Redis answered that it is gone (expired, or lost and lent since)")
                    return
                except (BudgetUnavailable, TimeoutError) as exc:
                    log.warning("%s: renewal failed (%s); retrying until the lease's TTL runs out", self.holder, exc)
                    await asyncio.sleep(min(QUEUE_POLL_S * 4, max(0.0, held_until - loop.time())))
                    continue
                held_until = sent_at + ttl_s
                break

    def _lose(self, reason: str) -> None:
        """Stop the block: its tokens may be lent to someone else now (a block that already ended is left be)."""
        self.lease = None
        if self._leaving or self._task is None:
            return
        self.lost = LeaseLost(self.holder, self.budget.pool, reason)
        log.warning("%s", self.lost)
        self._cancelled = True
        self._task.cancel()
