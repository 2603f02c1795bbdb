"""Clients of Kafka (aiokafka), Redis and the S3 store, built from the settings the same way everywhere."""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context
from minio import Minio
from redis.asyncio import Redis

from schemas.settings import KafkaSettings, Settings


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


def redis_client(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis.url, socket_timeout=10, socket_connect_timeout=5)


def object_store(settings: Settings) -> Minio:
    return Minio(**settings.s3.client_kwargs())  # type: ignore[arg-type]
