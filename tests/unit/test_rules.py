"""`streams.flywheel.rules`: declarative filter rules from YAML, each test and combination, and clear errors."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import re2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.logs import ImageInfo, Lineage, NormalizedLog
from streams.flywheel.rules import RulesError, RuleSet, load_rules, lookup, parse_rules

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


# -- the compiled rules against a plain reading of the rule language ------------------------------------------------


def walk(value: Any, path: str) -> Any:
    """The value at a dotted path into a dumped log: keys of objects, indexes of lists; None where it leads nowhere."""
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def reference_holds(when: dict[str, Any], log: NormalizedLog) -> bool:
    """What the rule language says `when` means for `log`, read from the log dumped with `model_dump()`. `equals` and
    `in` compare the JSON form (`model_dump(mode="json")`), but a float is itself (pydantic writes NaN as null)."""
    if "all" in when:
        return all(reference_holds(condition, log) for condition in when["all"])
    if "any" in when:
        return any(reference_holds(condition, log) for condition in when["any"])
    if "not" in when:
        return not reference_holds(when["not"], log)
    value = walk(log.model_dump(), when["field"])
    if "equals" in when or "in" in when:
        json_value = value if isinstance(value, float) else walk(log.model_dump(mode="json"), when["field"])
        return json_value == when["equals"] if "equals" in when else json_value in when["in"]
    if "missing" in when:
        empty = value is None or (isinstance(value, str) and not value.strip()) or value in ([], {})
        return empty == when["missing"]
    if "regex" in when:
        return isinstance(value, str) and re2.search(when["regex"], value) is not None
    if "longer_than" in when:
        return isinstance(value, str | list) and len(value) > when["longer_than"]
    number = not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    )  # every int is a finite number, whatever its size
    if "less_than" in when:
        return number and value < when["less_than"]
    return number and value > when["greater_than"]


TEXTS = st.text(alphabet="ab -_.\t\n\u3000\x1cé0", max_size=6)
NUMBERS = st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXTS
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "0"]), inner, max_size=3),
    max_leaves=8,
)
OBJECTS = st.none() | st.dictionaries(st.sampled_from(["a", "b", "0"]), JSON, max_size=3) | st.lists(JSON, max_size=3)
IMAGES = st.lists(
    st.builds(ImageInfo, uri=st.sampled_from(["s3://b/a.png", ""]), width=st.none() | st.integers(1, 2000)),
    max_size=2,
)
LOGS = st.builds(
    NormalizedLog,
    log_id=st.just("log-1"),
    source_format=st.just("legacy-flat"),
    request_id=st.just("r-1"),
    timestamp=st.sampled_from([datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 1, 0, 0, 1, tzinfo=UTC)]),
    tenant=TEXTS | st.sampled_from(["acme", "test-eu", "loadtest_1", "synthetic"]),
    model=st.none() | TEXTS,
    task=st.none() | TEXTS,
    prompt=TEXTS,
    images=IMAGES,
    output_text=st.none() | TEXTS,
    output=OBJECTS,
    correction=OBJECTS,
    latency_ms=st.none() | st.sampled_from([math.inf, -math.inf, math.nan, -1.0, 420.0]) | st.floats(),
    status=st.sampled_from(["ok", "error"]),
    error_code=st.none() | st.sampled_from(["output_invalid", "http_503"]),
    prompt_tokens=st.none() | st.integers(0, 10),
    lineage=st.none() | st.builds(Lineage, topic=st.just("t"), partition=st.just(0), offset=st.integers(0, 9)),
)
COMMON_FIELDS = st.sampled_from(["latency_ms", "tenant", "prompt", "images", "images.0", "timestamp", "lineage"])
FIELDS = COMMON_FIELDS | st.sampled_from(
    [*NormalizedLog.model_fields, "nothing", "tenant.x", "images.0", "images.0.width", "images.1.uri",
     "images.x", "output.a", "output.0", "output.a.0", "output.0.b", "correction.b", "lineage.offset",
     "timestamp.year"]
)  # fmt: skip
TESTS = st.one_of(
    st.fixed_dictionaries({"equals": JSON}),
    st.fixed_dictionaries({"equals": st.sampled_from(["ok", "acme", "2026-03-01T00:00:00Z", "legacy-flat"])}),
    st.just({"equals": {"uri": "", "width": None, "height": None}}),
    st.just({"equals": {"topic": "t", "partition": 0, "offset": 0}}),
    st.fixed_dictionaries({"in": st.lists(JSON, max_size=3)}),
    st.fixed_dictionaries({"regex": st.sampled_from(["^a", "a|b", "\\d", "^$", "é", "^(test|loadtest)([-_.].*)?$"])}),
    st.fixed_dictionaries({"missing": st.booleans()}),
    st.fixed_dictionaries({"less_than": st.floats(-10, 10) | st.just(0.0)}),
    st.fixed_dictionaries({"greater_than": st.floats(-10, 10) | st.just(1000.0)}),
    st.fixed_dictionaries({"longer_than": st.integers(0, 4)}),
)
CONDITIONS = st.recursive(
    st.builds(lambda field, test: {"field": field, **test}, FIELDS, TESTS),
    lambda inner: (
        st.fixed_dictionaries({"all": st.lists(inner, min_size=1, max_size=3)})
        | st.fixed_dictionaries({"any": st.lists(inner, min_size=1, max_size=3)})
        | st.fixed_dictionaries({"not": inner})
    ),
    max_leaves=4,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(CONDITIONS, min_size=1, max_size=4), st.lists(LOGS, min_size=1, max_size=3))
@example(
    [{"field": "latency_ms", "greater_than": 5.0}, {"field": "latency_ms", "less_than": 5.0}],
    [LOG.model_copy(update={"latency_ms": value}) for value in (math.inf, -math.inf, math.nan, 2**70)],
)
def test_rules_do_what_the_rule_language_says(conditions: list[dict[str, Any]], logs: list[NormalizedLog]) -> None:
    """Each compiled condition holds, for a log and for its dump, exactly when the plain reading says it holds, and
    `first_match` names the first such rule."""
    rules = RuleSet.model_validate({"rules": [{"name": f"r{i}", "when": when} for i, when in enumerate(conditions)]})
    for log in logs:
        expected = [reference_holds(when, log) for when in conditions]
        assert [rule.when.holds(log) for rule in rules.rules] == expected
        assert [rule.when.holds(log.model_dump()) for rule in rules.rules] == expected
        match = rules.first_match(log)
        assert (match.name if match else None) == next((f"r{i}" for i, held in enumerate(expected) if held), None)


def test_an_integer_beyond_a_floats_range_is_compared_not_raised() -> None:
    """JSON numbers have no size limit: a number test on one too large for a float compares it (it raised
    `OverflowError`, which made the whole log an internal error)."""
    huge = LOG.model_copy(update={"output": {"x": 10**400}})
    rules = RuleSet.model_validate(
        {"rules": [{"name": "small", "when": {"field": "output.x", "less_than": 5}},
                   {"name": "big", "when": {"field": "output.x", "greater_than": 5}}]}
    )  # fmt: skip
    match = rules.first_match(huge)
    assert match is not None and match.name == "big"
