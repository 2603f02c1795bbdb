"""No secret reaches a terminal: `vlmflow check` and one-line errors against a Redis that wants a password (the
documented `redis://:password@host:port/0` form), with the password percent-encoded as a URL needs it."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from schemas.settings import Settings
from tests.conftest import free_port_block
from vlmflow.cli import main
from vlmflow.stack import _binary

PASSWORD = "s3cr@t-redis-pw"
WRONG_PASSWORD = "wr0ng-redis-pw"


@pytest.fixture
def protected_redis(tmp_path: Path) -> Iterator[int]:
    """A Valkey of this test's own that wants PASSWORD; its port."""
    port = free_port_block()
    argv = [
        _binary("valkey-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--requirepass", PASSWORD, "--dir", str(tmp_path),
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "valkey did not start"
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def use(monkeypatch: pytest.MonkeyPatch, settings: Settings, redis_url: str) -> None:
    monkeypatch.setenv("VLMFLOW_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    monkeypatch.setenv("VLMFLOW_S3__ENDPOINT", settings.s3.endpoint)
    monkeypatch.setenv("VLMFLOW_S3__ACCESS_KEY", settings.s3.access_key)
    monkeypatch.setenv("VLMFLOW_S3__SECRET_KEY", settings.s3.secret_key.get_secret_value())
    monkeypatch.setenv("VLMFLOW_REDIS__URL", redis_url)


def assert_no_secret(text: str, settings: Settings, *secrets: str) -> None:
    for secret in (
        *secrets,
        *(quote(secret, safe="") for secret in secrets),
        settings.s3.secret_key.get_secret_value(),
    ):
        assert secret not in text, f"{secret!r} printed: {text}"


def test_check_shows_the_redis_url_without_its_password(
    settings: Settings, protected_redis: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, settings, f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{protected_redis}/0")
    assert main(["check"]) == 0
    captured = capsys.readouterr()
    assert f"redis  ok  redis://:***@127.0.0.1:{protected_redis}/0" in captured.out
    assert_no_secret(captured.out + captured.err, settings, PASSWORD)


def test_a_rejected_password_is_one_line_without_it(
    settings: Settings, protected_redis: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, settings, f"redis://:{WRONG_PASSWORD}@127.0.0.1:{protected_redis}/0")
    assert main(["check"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vlmflow: error: Redis at redis://:***@127.0.0.1:{protected_redis}")
    assert_no_secret(captured.out + captured.err, settings, WRONG_PASSWORD, PASSWORD)
