"""Settings come from the environment with one prefix and `__` between levels."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.settings import load_settings


def test_defaults_point_at_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert settings.redis.url == "redis://127.0.0.1:16379/0"
    assert settings.kafka.client_options()["security_protocol"] == "PLAINTEXT"


def test_environment_overrides_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFLOW_KAFKA__BOOTSTRAP_SERVERS", "a:9093,b:9093")
    monkeypatch.setenv("VLMFLOW_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("VLMFLOW_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("VLMFLOW_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("VLMFLOW_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("VLMFLOW_S3__IMAGE_BUCKETS", '["a", "b"]')
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    settings = load_settings()
    options = settings.kafka.client_options()
    assert options["bootstrap_servers"] == ["a:9093", "b:9093"]
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.s3.image_buckets == ["a", "b"]
    assert settings.redis.url == "redis://cache:6379/2"


def test_bad_values_fail_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFLOW_KAFKA__SECURITY_PROTOCOL", "CARRIER_PIGEON")
    with pytest.raises(ValidationError, match="security_protocol"):
        load_settings()
