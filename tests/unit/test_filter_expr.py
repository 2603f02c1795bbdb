"""The replay filter: parsing, rendering and evaluation, with property tests over generated expressions."""

from __future__ import annotations

import string
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.ops.filter_expr import (
    COMPARE_OPS,
    And,
    Compare,
    Expr,
    FilterError,
    InSet,
    Not,
    Or,
    UnreadableRecord,
    document_of,
    matches,
    parse,
    render,
)

FIELDS = ("status", "tenant", "error.code", "latency_ms", "tags", "ok", "note", "tags.0")
fields = st.sampled_from(FIELDS)
values = st.one_of(
    st.sampled_from(["error", "ok", "acme", "globex", "42", "-1", "2.5", "true", "false", "null", "and", "in", ""]),
    st.text(alphabet=string.ascii_letters + string.digits + " _-.:'\"\\()=,!<>~", max_size=8),
)
plain_ops = st.sampled_from([op for op in COMPARE_OPS if op != "~"])
comparisons = st.builds(Compare, fields, plain_ops, values)
in_sets = st.builds(InSet, fields, st.lists(values, min_size=1, max_size=4).map(tuple), st.booleans())
expressions: st.SearchStrategy[Expr] = st.recursive(
    comparisons | in_sets,
    lambda children: st.one_of(
        st.builds(Not, children), st.builds(And, children, children), st.builds(Or, children, children)
    ),
    max_leaves=8,
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-100, 100),
    st.floats(-100, 100, allow_nan=False),
    st.sampled_from(["error", "ok", "acme", "globex", "42", "true", "null", "", "and"]),
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "status": json_scalars,
        "tenant": json_scalars,
        "error": st.one_of(json_scalars, st.fixed_dictionaries({}, optional={"code": json_scalars})),
        "latency_ms": json_scalars,
        "tags": st.lists(json_scalars, max_size=3),
        "ok": json_scalars,
        "note": json_scalars,
    },
)


@given(expressions)
def test_rendered_expressions_parse_back_to_themselves(expression: Expr) -> None:
    assert parse(render(expression)) == expression


@given(expressions, documents)
def test_not_is_the_exact_negation(expression: Expr, document: dict[str, Any]) -> None:
    assert matches(Not(expression), document) == (not matches(expression, document))


@given(fields, values, documents)
def test_not_equal_negates_equal(field: str, value: str, document: dict[str, Any]) -> None:
    assert matches(Compare(field, "!=", value), document) == (not matches(Compare(field, "=", value), document))


@given(fields, st.lists(values, min_size=1, max_size=4), documents)
def test_in_is_a_chain_of_equalities(field: str, options: list[str], document: dict[str, Any]) -> None:
    chain: Expr = Compare(field, "=", options[0])
    for option in options[1:]:
        chain = Or(chain, Compare(field, "=", option))
    assert matches(InSet(field, tuple(options)), document) == matches(chain, document)
    assert matches(InSet(field, tuple(options), negated=True), document) == (not matches(chain, document))


@given(expressions, expressions, documents)
def test_de_morgan(left: Expr, right: Expr, document: dict[str, Any]) -> None:
    assert matches(Not(And(left, right)), document) == matches(Or(Not(left), Not(right)), document)


@given(st.text(max_size=40))
def test_any_text_parses_or_fails_with_a_filter_error(text: str) -> None:
    try:
        expression = parse(text)
    except FilterError as exc:
        assert str(exc).startswith("cannot parse filter")
    else:
        assert parse(render(expression)) == expression


@pytest.mark.parametrize(
    ("text", "document", "expected"),
    [
        ("status=error", {"status": "error"}, True),
        ("status==error", {"status": "ok"}, False),
        ("status=error", {}, False),
        ("status!=error", {}, True),
        ("tenant in (acme, globex)", {"tenant": "globex"}, True),
        ("tenant not in (acme,globex)", {"tenant": "initech"}, True),
        ("error.code=engine_error", {"error": {"code": "engine_error"}}, True),
        ("error.code=engine_error", {"error": None}, False),
        ("latency_ms>=500", {"latency_ms": 500}, True),
        ("latency_ms>=500", {"latency_ms": "1000"}, False),  # a string field compares as text
        ("latency_ms<1e3", {"latency_ms": 999.5}, True),
        ("attempt=1", {"attempt": 1.0}, True),
        ("ok=true", {"ok": True}, True),
        ("ok=1", {"ok": True}, False),
        ("output=null", {"output": None}, True),
        ("tags=red", {"tags": ["blue", "red"]}, True),
        ("images.1~^s3://", {"images": ["data:", "s3://b/k"]}, True),
        ('model~"^qwen2(\\.5)?-vl"', {"model": "qwen2.5-vl-7b"}, True),
        ("finished_at>=2024-05-01", {"finished_at": "2024-05-01T10:00:00Z"}, True),
        ("not (status=ok or status=error)", {"status": "pending"}, True),
        ("status=error and tenant=acme or tenant=globex", {"status": "ok", "tenant": "globex"}, True),
        ('note="two words"', {"note": "two words"}, True),
        ("note='it\\'s'", {"note": "it's"}, True),
    ],
)
def test_examples(text: str, document: dict[str, Any], expected: bool) -> None:
    assert matches(parse(text), document) is expected


@pytest.mark.parametrize(
    ("text", "column", "what"),
    [
        ("", 1, "empty filter"),
        ("status=", 8, "expected a value"),
        ("tenant in acme", 11, "expected '(' after 'in'"),
        ("status=error tenant=acme", 14, "expected 'and', 'or' or the end"),
        ("(status=error", 14, "expected ')'"),
        ("status ! error", 8, "unexpected '!'"),
        ('note="open', 6, "unterminated quoted string"),
        ("model~'('", 7, "bad regular expression"),
        ("and=1", 1, "expected a field name"),
    ],
)
def test_errors_say_what_and_where(text: str, column: int, what: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse(text)
    assert what in str(caught.value)
    assert f"at column {column}" in str(caught.value)


# -- hostile filters and records: typed errors, never RecursionError or ValueError ------------------------------

json_values = st.recursive(
    json_scalars | st.integers() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), children, max_size=3),
    max_leaves=12,
)


def nested_list(depth: int, inner: Any) -> Any:
    value = inner
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("(" * 500 + "status=error" + ")" * 500, "more than 32 nested"),
        ("not " * 2_000 + "status=error", "more than 32 nested"),
        (" and ".join(["status=error"] * 2_000), "more than 64 comparisons"),
        (" or ".join(f"tenant=t{index}" for index in range(65)), "more than 64 comparisons"),
    ],
)
def test_deep_or_long_filters_are_refused_with_a_filter_error(text: str, what: str) -> None:
    with pytest.raises(FilterError, match=what):
        parse(text)


def test_filters_at_the_limits_parse_render_and_evaluate() -> None:
    nested = "(" * 31 + "not status=error" + ")" * 31
    chain = " and ".join(["status!=error"] * 63) + " and " + nested
    expression = parse(chain)
    assert parse(render(expression)) == expression
    assert matches(expression, {"status": "ok"}) is True


@pytest.mark.parametrize(
    ("text", "document", "expected"),
    [
        ("n<" + "1" * 5_000, {"n": 5}, True),
        ("n=" + "1" * 5_000, {"n": 5}, False),
        ("n>-" + "9" * 5_000, {"n": -(10**300)}, True),
        ("n=" + "0" * 5_000 + "5", {"n": 5}, True),
        ("n!=" + "1" * 5_000, {"n": [1, 2]}, True),
        ("n<" + "1" * 5_000, {"n": float("nan")}, False),
        ("id=" + "1" * 5_000, {"id": "1" * 5_000}, True),
    ],
)
def test_a_5000_digit_number_compares_without_error(text: str, document: dict[str, Any], expected: bool) -> None:
    assert matches(parse(text), document) is expected


def test_deeply_nested_lists_are_walked_without_recursion() -> None:
    document = {"tags": nested_list(100_000, "red"), "n": nested_list(50_000, 7)}
    assert matches(parse("tags=red and n>=7 and tags~^r"), document) is True
    assert matches(parse("tags!=red"), document) is False


def test_a_list_index_of_any_length_is_only_missing() -> None:
    assert matches(parse("images." + "9" * 5_000 + "=x"), {"images": ["x"]}) is False


@given(expressions, json_values)
def test_matches_holds_or_fails_for_any_json_value(expression: Expr, document: Any) -> None:
    assert matches(expression, document) in (True, False)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"n": ' + b"1" * 5_000 + b"}", "not a JSON document Python reads"),
        (b"\xff\xfe\xfa", "not UTF-8"),
        (b"{not json", "not JSON"),
    ],
)
def test_a_record_the_filter_cannot_read_is_a_typed_error(value: bytes, reason: str) -> None:
    with pytest.raises(UnreadableRecord, match=reason):
        document_of(value)


def test_readable_records_and_tombstones() -> None:
    assert document_of(b'{"status": "error"}') == {"status": "error"}
    assert document_of(None) is None


@pytest.mark.parametrize("pattern", ["(a)\\\\1", "(?=x)x", "(?<!x)y", "a{2000}"])
def test_regexes_outside_linear_time_are_refused_at_parse_time(pattern: str) -> None:
    with pytest.raises(FilterError, match="RE2, which runs in linear time") as caught:
        parse(f'model~"{pattern}"')
    assert len(str(caught.value).splitlines()) == 1


def test_a_catastrophic_backtracking_pattern_runs_in_linear_time() -> None:
    """`^([A-Za-z ]+)*$` takes seconds per character added with a backtracking engine; RE2 does not backtrack."""
    expression = parse('note~"^([A-Za-z ]+)*$"')
    started = time.perf_counter()
    assert matches(expression, {"note": "a" * 30 + "!"}) is False
    assert matches(expression, {"note": "ab " * 10_000}) is True
    assert time.perf_counter() - started < 2.0
