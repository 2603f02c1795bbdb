"""Clients of Kafka (aiokafka), Redis and the S3 store, built from the settings the same way everywhere.

NOTE: this sits in `schemas/` beside the settings because it is the one package that workers, streams and the
command line may all import; every Redis client of vlmflow gets the same timeouts from here, so a dead server is
noticed at the same point by a worker, an agent and an ops command.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from aiokafka.helpers import create_ssl_context
from minio import Minio
from redis.asyncio import Redis

from schemas.settings import KafkaSettings, Settings

REDIS_SOCKET_TIMEOUT_S = 10.0
"""A command that has not answered within this is a dead connection (the slowest script is well below it)."""
REDIS_CONNECT_TIMEOUT_S = 5.0
CANCEL_AGAIN_S = 0.1


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` until it has ended, and wait for it; what it raised is not raised here.

    NOTE: one `cancel()` is not enough for a task that talks to Redis: redis-py lets a command in flight finish
    and may drop a cancellation that came meanwhile (redis/redis-py#2666), so a loop ended only by cancelling it
    could go on for ever, and whoever awaited it with it.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_S)
    if not task.cancelled():
        task.exception()  # retrieved: the owner logged or raised it already


def aiokafka_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection options for aiokafka clients; TLS files become the `ssl_context` aiokafka takes instead."""
    options = kafka.client_options()
    files = {name: options.pop(name, None) for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")}
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=files["ssl_cafile"], certfile=files["ssl_certfile"], keyfile=files["ssl_keyfile"]
        )
    options["request_timeout_ms"] = kafka.request_timeout_ms
    return options


def redis_options() -> dict[str, float]:
    """The timeouts every Redis client of vlmflow uses."""
    return {"socket_timeout": REDIS_SOCKET_TIMEOUT_S, "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S}


def redis_client(settings: Settings, **overrides: Any) -> Redis:
    """The asyncio client of the configured Redis (`overrides` for pool sizes, not for timeouts)."""
    return Redis.from_url(settings.redis.url, **{**redis_options(), **overrides})


def redis_client_sync(settings: Settings) -> redis.Redis:
    """The blocking client, for command-line probes and tools that do not run an event loop."""
    return redis.Redis.from_url(settings.redis.url, **redis_options())


def object_store(settings: Settings) -> Minio:
    return Minio(**settings.s3.client_kwargs())  # type: ignore[arg-type]
