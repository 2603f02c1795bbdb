"""Fixtures shared by every test.

Integration tests run against the real local stack. When `VLMFLOW_KAFKA__BOOTSTRAP_SERVERS` is not set, the
session starts its own stack (broker, S3 store, Valkey) on free ports under a temporary state directory, so a
plain `pytest` works on a fresh machine and never touches a developer's `vlmflow dev up` stack. Tests that need
topics of their own get a fresh broker (Tansu starts in milliseconds and keeps everything in memory).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.settings import Settings, load_settings
from vlmflow.kafka_admin import create_topics
from vlmflow.stack import S3_PORT_BLOCK, LocalStack


def free_port_block(size: int = 1) -> int:
    """The first of `size` consecutive free TCP ports on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + size >= 65_000:
            continue
        sockets = []
        try:
            for port in range(first, first + size):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                sockets.append(sock)
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {size} free ports")


def _endpoints_given() -> bool:
    return bool(os.environ.get("VLMFLOW_KAFKA__BOOTSTRAP_SERVERS"))


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of the session's local stack (started here unless endpoints are given in the environment)."""
    if _endpoints_given():
        yield load_settings()
        return
    state_dir = tmp_path_factory.mktemp("stack")
    settings = load_settings(
        state_dir=state_dir,
        kafka={"bootstrap_servers": f"127.0.0.1:{free_port_block()}", "session_timeout_ms": 6000},
        s3={"endpoint": f"127.0.0.1:{free_port_block(S3_PORT_BLOCK)}"},
        redis={"url": f"redis://127.0.0.1:{free_port_block()}/0"},
    )
    stack = LocalStack(settings)
    try:
        stack.up()
        yield settings
    finally:
        stack.down()


def start_broker(state_dir: Path, base: Settings) -> tuple[LocalStack, Settings]:
    """A broker of its own on a free port, with the registry's topics; the caller stops it with `.down()`."""
    settings = base.model_copy(
        update={
            "state_dir": state_dir,
            "kafka": base.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port_block()}"}),
        }
    )
    broker = LocalStack(settings, only=("kafka",))
    broker.up()
    create_topics(settings)
    return broker, settings


@pytest.fixture
def settings(stack_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Per-test settings: the session's Redis and S3, a fresh broker with every registry topic, a budget pool
    and consumer-group names of its own, so tests never see each other's records or tokens."""
    unique = uuid.uuid4().hex[:8]
    isolated = stack_settings.model_copy(
        update={
            "budget": stack_settings.budget.model_copy(update={"pool": f"test-{unique}"}),
            "worker": stack_settings.worker.model_copy(update={"group_id": f"workers-{unique}"}),
        }
    )
    if _endpoints_given():
        yield isolated
        return
    broker, with_broker = start_broker(tmp_path / "broker", isolated)
    try:
        yield with_broker
    finally:
        broker.down()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration talks to real servers; mark it so `-m "not integration"` runs fast."""
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
