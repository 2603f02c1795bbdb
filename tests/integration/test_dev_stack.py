"""`vlmflow dev up | down | status` and one-line errors for bad configuration, through the real command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import Settings
from tests.conftest import free_port_block
from vlmflow.stack import S3_PORT_BLOCK, _pid_alive


def vlmflow(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmflow.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vlmflow: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        **os.environ,
        "VLMFLOW_STATE_DIR": str(tmp_path / "state"),
        "VLMFLOW_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port_block()}",
        "VLMFLOW_KAFKA__REQUEST_TIMEOUT_MS": "3000",
        "VLMFLOW_S3__ENDPOINT": f"127.0.0.1:{free_port_block(S3_PORT_BLOCK)}",
        "VLMFLOW_REDIS__URL": f"redis://127.0.0.1:{free_port_block()}/0",
    }
    yield env
    vlmflow(env, "dev", "down")


def pids(state_dir: Path) -> dict[str, int]:
    return {path.stem: int(path.read_text()) for path in (state_dir / "run").glob("*.pid")}


def test_up_is_idempotent_status_reports_a_dead_child_and_down_leaves_nothing(stack_env: dict[str, str]) -> None:
    state_dir = Path(stack_env["VLMFLOW_STATE_DIR"])
    first = vlmflow(stack_env, "dev", "up")
    assert first.returncode == 0, first.stderr
    assert "topics: 10 created" in first.stdout
    started = pids(state_dir)
    assert set(started) == {"kafka", "s3", "redis"}

    second = vlmflow(stack_env, "dev", "up")
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already running") == 3
    assert pids(state_dir) == started

    os.kill(started["kafka"], signal.SIGKILL)
    status = vlmflow(stack_env, "dev", "status")
    assert status.returncode == 1
    kafka_line = next(line for line in status.stdout.splitlines() if line.startswith("kafka"))
    assert "dead" in kafka_line and f"pid {started['kafka']} exited" in kafka_line

    revived = vlmflow(stack_env, "dev", "up")
    assert revived.returncode == 0, revived.stderr
    assert "kafka: restarting" in revived.stdout
    assert vlmflow(stack_env, "dev", "status").returncode == 0
    after = pids(state_dir)

    down = vlmflow(stack_env, "dev", "down")
    assert down.returncode == 0
    assert not any(_pid_alive(pid) for pid in after.values())
    assert pids(state_dir) == {}
    assert vlmflow(stack_env, "dev", "status").stdout.count("stopped") == 3


def test_port_in_use_is_one_clear_line(stack_env: dict[str, str]) -> None:
    port = int(stack_env["VLMFLOW_KAFKA__BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = vlmflow(stack_env, "dev", "up")
    assert_one_line_error(result, f"port {port}", "in use")


def test_unreachable_broker_is_one_clear_line(stack_env: dict[str, str]) -> None:
    result = vlmflow(stack_env, "topics", "create")
    assert_one_line_error(result, "cannot reach Kafka at", stack_env["VLMFLOW_KAFKA__BOOTSTRAP_SERVERS"])


def test_wrong_s3_credentials_are_one_clear_line(settings: Settings) -> None:
    env = {
        **os.environ,
        "VLMFLOW_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "VLMFLOW_REDIS__URL": settings.redis.url,
        "VLMFLOW_S3__ENDPOINT": settings.s3.endpoint,
        "VLMFLOW_S3__SECRET_KEY": "not-the-secret",
    }
    result = vlmflow(env, "check")
    assert "kafka  ok" in result.stdout and "redis  ok" in result.stdout
    assert_one_line_error(result, "rejected the credentials")


def test_invalid_setting_is_one_clear_line(stack_env: dict[str, str]) -> None:
    result = vlmflow({**stack_env, "VLMFLOW_KAFKA__SECURITY_PROTOCOL": "CARRIER_PIGEON"}, "check")
    assert_one_line_error(result, "invalid setting kafka.security_protocol")
