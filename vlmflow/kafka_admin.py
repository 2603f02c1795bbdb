"""Topic administration against the configured cluster: create the registry's topics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError

from schemas.errors import VlmflowError
from schemas.settings import Settings
from schemas.topics import TOPICS, TopicSpec


class KafkaUnreachable(VlmflowError):
    """No broker of the configured bootstrap list answered in time."""


@contextmanager
def admin_client(settings: Settings) -> Iterator[KafkaAdminClient]:
    timeout_ms = settings.kafka.request_timeout_ms
    try:
        admin = KafkaAdminClient(
            **settings.kafka.client_options(), request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms
        )
    except KafkaTimeoutError:
        raise KafkaUnreachable(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: no broker answered within "
            f"{timeout_ms / 1000:.0f} s (is the stack up? `vlmflow dev up`)"
        ) from None
    try:
        yield admin
    finally:
        admin.close()


def create_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Create the registry topics that do not exist yet, with their partitions and cleanup policy.

    Returns the names created; existing topics are left as they are (their layout is not changed).
    """
    wanted = specs if specs is not None else list(TOPICS.values())
    with admin_client(settings) as admin:
        existing = set(admin.list_topics())
        missing = [spec for spec in wanted if spec.name not in existing]
        created = []
        for spec in missing:
            new_topic = NewTopic(
                spec.name, spec.partitions, settings.kafka.replication_factor, topic_configs=spec.topic_configs()
            )
            try:
                admin.create_topics([new_topic])
            except TopicAlreadyExistsError:
                continue
            created.append(spec.name)
    return created
