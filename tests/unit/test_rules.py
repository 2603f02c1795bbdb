"""`streams.flywheel.rules`: declarative filter rules from YAML, each test and combination, and clear errors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.logs import ImageInfo, NormalizedLog
from streams.flywheel.rules import RulesError, load_rules, lookup, parse_rules

LOG = NormalizedLog(
    log_id="log-1",
    source_format="legacy-flat",
    request_id="r-1",
    timestamp=datetime(2026, 3, 1, tzinfo=UTC),
    tenant="acme",
    prompt="what is on the shelf?",
    images=[ImageInfo(uri="s3://b/a.png", width=640, height=480)],
    output_text='{"caption": "cans"}',
    output={"caption": "cans"},
    latency_ms=420.0,
)


def fires(when: str, log: NormalizedLog = LOG) -> bool:
    rules = parse_rules(f"rules:\n  - name: r\n    when: {when}\n", "test")
    match = rules.first_match(log)
    return match is not None and match.name == "r"


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("{field: tenant, equals: acme}", True),
        ("{field: tenant, equals: globex}", False),
        ("{field: model, equals: null}", True),
        ("{field: tenant, in: [globex, acme]}", True),
        ("{field: tenant, regex: '^ac'}", True),
        ("{field: latency_ms, regex: '4'}", False),
        ("{field: latency_ms, greater_than: 400}", True),
        ("{field: latency_ms, less_than: 400}", False),
        ("{field: tenant, less_than: 400}", False),
        ("{field: prompt, longer_than: 10}", True),
        ("{field: images, longer_than: 1}", False),
        ("{field: model, missing: true}", True),
        ("{field: images, missing: true}", False),
        ("{field: correction, missing: false}", False),
        ("{field: images.0.width, equals: 640}", True),
        ("{field: images.1.width, missing: true}", True),
        ("{field: output.caption, equals: cans}", True),
        ("{field: tenant.nothing, missing: true}", True),
        ("{all: [{field: tenant, equals: acme}, {field: status, equals: ok}]}", True),
        ("{all: [{field: tenant, equals: acme}, {field: status, equals: error}]}", False),
        ("{any: [{field: tenant, equals: globex}, {field: status, equals: ok}]}", True),
        ("{not: {field: tenant, equals: acme}}", False),
    ],
)
def test_conditions(when: str, expected: bool) -> None:
    assert fires(when) is expected


def test_blank_text_and_empty_lists_are_missing() -> None:
    blank = LOG.model_copy(update={"prompt": "  \n", "images": []})
    assert fires("{field: prompt, missing: true}", blank)
    assert fires("{field: images, missing: true}", blank)


def test_first_matching_rule_wins() -> None:
    rules = parse_rules(
        """
rules:
  - {name: first, when: {field: tenant, equals: globex}}
  - {name: second, when: {field: tenant, equals: acme}}
  - {name: third, when: {field: tenant, regex: a}}
""",
        "test",
    )
    match = rules.first_match(LOG)
    assert match is not None and match.name == "second"


def test_lookup_paths() -> None:
    record: dict[str, Any] = {"a": {"b": [10, {"c": 3}]}}
    assert lookup(record, "a.b.1.c") == 3
    assert lookup(record, "a.b.0") == 10
    assert lookup(record, "a.b.2") is None
    assert lookup(record, "a.b.x") is None


def test_built_in_rules(tmp_path: Path) -> None:
    rules = load_rules(None)
    names = [rule.name for rule in rules.rules]
    assert {"failed-request", "no-image", "test-traffic", "implausible-latency"} <= set(names)
    assert rules.first_match(LOG) is None
    cases = {
        "failed-request": {"status": "error", "error_code": "http_503"},
        "no-image": {"images": []},
        "no-question": {"prompt": "", "task": None},
        "no-answer": {"output_text": None, "output": None},
        "test-traffic": {"tenant": "loadtest-eu"},
        "implausible-latency": {"latency_ms": -1.0},
        "oversized-prompt": {"prompt": "x" * 16_001},
    }
    for name, update in cases.items():
        match = rules.first_match(LOG.model_copy(update=update))
        assert match is not None and match.name == name, name
    invalid_answer = LOG.model_copy(update={"status": "error", "error_code": "output_invalid", "output_text": None})
    assert rules.first_match(invalid_answer) is None


def test_rules_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: acme-only\n    when: {field: tenant, equals: acme}\n")
    match = load_rules(path).first_match(LOG)
    assert match is not None and match.name == "acme-only"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: [", "not YAML"),
        ("[]", "the file: Input should be"),
        ("rules:\n  - {name: a, when: {field: tenant}}", "rule 'a' when: a condition needs exactly one"),
        ("rules:\n  - {name: a, when: {field: t, equals: 1, regex: x}}", "got: equals, regex"),
        ("rules:\n  - {name: a, when: {all: [{equals: 1}]}}", "rule 'a' when.all.0: a test needs `field`"),
        ("rules:\n  - {name: a, when: {field: t, regex: '('}}", "regex '('"),
        ("rules:\n  - {name: a, when: {field: t, equals: 1, extra: 2}}", "when.extra: Extra inputs"),
        ("rules:\n  - {name: Bad Name, when: {field: t, equals: 1}}", "rule 'Bad Name' name: String should match"),
        ("rules:\n  - {when: {field: t, equals: 1}}", "rule '#1' name: Field required"),
        ("rules:\n  - {name: a, when: {field: t, equals: 1}}\n  - {name: a, when: {field: t, equals: 2}}",
         "rule names must be unique: a"),
    ],
)  # fmt: skip
def test_rule_errors_name_the_file_and_rule(text: str, message: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "my.yaml")
    assert str(caught.value).startswith("rules my.yaml: ")
    assert message in str(caught.value)


def test_a_missing_rules_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="rules .*nope.yaml: No such file"):
        load_rules(tmp_path / "nope.yaml")
