"""`streams.flywheel.app` and `vlmflow streams` without a broker: the agents, Kafka security, one-line errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest

from schemas.settings import KafkaSettings, load_settings
from streams.flywheel.app import _credentials, create_app
from vlmflow.cli import main


def test_the_app_has_the_golden_agent_and_its_own_group(tmp_path: Path) -> None:
    """The raw-log stage uses the app id as its consumer group; the golden agent's Faust app needs another."""
    app = create_app(load_settings(state_dir=tmp_path, streams={"app_id": "unit-flywheel"}))
    assert app.conf.id == "unit-flywheel-golden"
    assert set(app.agents) == {"vlmflow.golden"}
    assert (tmp_path / "streams" / "unit-flywheel").is_dir()


def test_kafka_security_in_faust_terms(tmp_path: Path) -> None:
    assert _credentials(KafkaSettings()) is None
    sasl = _credentials(
        KafkaSettings(
            security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p"
        )  # type: ignore[arg-type]  # fmt: skip
    )
    assert isinstance(sasl, faust.SASLCredentials)
    assert (sasl.username, sasl.password, sasl.mechanism.value, sasl.ssl_context) == ("u", "p", "SCRAM-SHA-512", None)
    tls = _credentials(KafkaSettings(security_protocol="SASL_SSL", sasl_username="u"))
    assert isinstance(tls, faust.SASLCredentials) and isinstance(tls.ssl_context, ssl.SSLContext)
    assert tls.mechanism.value == "PLAIN" and tls.protocol.value == "SASL_SSL"
    assert isinstance(_credentials(KafkaSettings(security_protocol="SSL")), faust.SSLCredentials)


def test_a_bad_rules_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: r, when: {field: tenant, regex: '('}}\n")
    monkeypatch.setenv("VLMFLOW_STREAMS__RULES_PATH", str(rules))
    assert main(["--state-dir", str(tmp_path), "streams"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlmflow: error: rules {rules}: rule 'r' when: regex '('") and "\n" not in err


def test_an_unreachable_broker_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("VLMFLOW_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("VLMFLOW_KAFKA__REQUEST_TIMEOUT_MS", "1000")
    assert main(["--state-dir", str(tmp_path), "streams"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmflow: error: cannot reach Kafka at 127.0.0.1:9") and "\n" not in err
