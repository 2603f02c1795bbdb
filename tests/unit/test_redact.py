"""`schemas.settings.redact`: what may be printed of a line that names servers and credentials."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas.settings import load_settings, redact
from vlmflow.cli import one_line_error


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:secret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:p%40ss@redis:6380/1 failed", "rediss://default:***@redis:6380/1 failed"),
        ("redis://redis:6379/0?password=secret&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("https://u:tok@host/x?X-Token=abc&token=def", "https://u:***@host/x?X-Token=abc&token=***"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("http://host/path/a@b.png", "http://host/path/a@b.png"),
    ],
)
def test_url_passwords_are_masked_without_settings(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_every_configured_secret_is_masked_wherever_it_appears() -> None:
    settings = load_settings(
        redis={"url": "redis://:p%40ssw0rd@redis:6379/0"},
        s3={"secret_key": "s3-secret-key-1"},
        kafka={"sasl_password": "sasl-pw-2"},
    )
    text = "p@ssw0rd p%40ssw0rd s3-secret-key-1 sasl-pw-2 and the rest"
    assert redact(text, settings) == "*** *** *** *** and the rest"


def test_a_redis_error_line_does_not_carry_the_password() -> None:
    settings = load_settings(redis={"url": "redis://:secret-pw@redis:6379/0"})
    line = one_line_error(RedisConnectionError("Error 111 connecting to redis:6379"), settings)
    assert line is not None and "secret-pw" not in line
    assert line.startswith("Redis at redis://:***@redis:6379/0: ConnectionError")
