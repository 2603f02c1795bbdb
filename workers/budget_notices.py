"""Grant notices: how a waiting reservation hears that another caller's script granted it its tokens.

The scripts publish the lease ids they grant to waiters on the pool's channel (workers/budget_scripts.py,
`GRANTED_CHANNEL`); a reservation's ticket is the id its lease will have. One subscription per `TokenBudget` serves
all of its reservations: it is opened when one of them first has to wait and closed when none is in flight. A
notice only wakes a waiter early; the waiter still asks Redis (which confirms the grant), so a lost notice (a
dropped connection, a notice sent before the subscription started) costs one poll interval, not a grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
LISTEN_POLL_S = 1.0
"""How often the listener looks up from its subscription to see whether it was stopped."""


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class GrantNotices:
    """Wakes the reservations of one budget when a notice names their ticket."""

    def __init__(self, redis: Redis, channel: str):
        self.redis = redis
        self.channel = channel
        self._tickets: set[str] = set()
        """Tickets of this budget's reservations in flight; notices for other tickets are ignored."""
        self._waiting: dict[str, asyncio.Future[None]] = {}
        """ticket -> the future its reservation awaits now."""
        self._woken: set[str] = set()
        """Tickets whose notice came while their reservation was not awaiting one: its next wait returns at once."""
        self._listener: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        """Stopped listeners still closing their connection (held so that they are not garbage-collected)."""

    def expect(self, ticket: str) -> None:
        """A reservation with this ticket is in flight."""
        self._tickets.add(ticket)

    def forget(self, ticket: str) -> None:
        """The reservation ended; the subscription closes with the last one."""
        self._tickets.discard(ticket)
        self._woken.discard(ticket)
        if not self._tickets and self._listener is not None:
            listener, self._listener = self._listener, None
            listener.cancel()
            self._closing.add(listener)
            listener.add_done_callback(self._closing.discard)

    async def wait(self, ticket: str, timeout_s: float) -> None:
        """Until a notice names `ticket`, the subscription (re)starts (notices may have been missed before), or
        `timeout_s` passes, whichever comes first."""
        if ticket in self._woken:
            self._woken.discard(ticket)
            return
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting[ticket] = future
        timer = loop.call_later(timeout_s, _settle, future)
        try:
            await future
        finally:
            timer.cancel()
            del self._waiting[ticket]

    def _wake(self, ticket: str) -> None:
        if ticket not in self._tickets:
            return
        future = self._waiting.get(ticket)
        if future is not None and not future.done():
            future.set_result(None)
        else:
            self._woken.add(ticket)

    async def _listen(self) -> None:
        """Reads notices until cancelled. A Redis error ends it: the waiters keep polling, and the next wait starts
        another listener."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            # NOTE: checked, not only cancelled: redis-py may drop a cancellation while a read is in flight
            # (redis/redis-py#2666), and this listener must not read for ever after its last reservation.
            while self._listener is asyncio.current_task():
                message = await pubsub.get_message(timeout=LISTEN_POLL_S)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    # NOTE: notices published before this (re)subscription are lost (redis-py also resubscribes
                    # by itself after a reconnect), so every reservation in flight asks again.
                    for ticket in list(self._tickets):
                        self._wake(ticket)
                elif message["type"] == "message":
                    data = message["data"]
                    for ticket in (data.decode() if isinstance(data, bytes) else data).split(" "):
                        self._wake(ticket)
        except RedisError as exc:
            log.debug("grant notices on %s stopped (%s: %s); waiters poll", self.channel, type(exc).__name__, exc)
        finally:
            if self._listener is asyncio.current_task():
                self._listener = None
            with contextlib.suppress(RedisError):
                await pubsub.aclose()
