"""`streams.flywheel.pii`: emails, phone numbers and long digit runs are redacted; dates, times and boxes are not."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.logs import ImageInfo, NormalizedLog
from streams.flywheel.pii import (
    _NUMBERS,
    EMAIL,
    _number,
    _redact_emails,
    _redact_numbers,
    _redact_signatures,
    identifiers_in_uri,
    redact_log,
    redact_strings,
    redact_text,
    redact_value,
)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("mail jane.doe+x@mail.example.co.uk!", "mail [EMAIL]!"),
        ("call +1 415 555 0100 now", "call [PHONE] now"),
        ("(415) 555-0100", "[PHONE]"),
        ("415-555-0100 or 415.555.0100", "[PHONE] or [PHONE]"),
        ("+44 20 7946 0958", "[PHONE]"),
        ("+49 30 123456", "[PHONE]"),
        ("ssn 123-45-6789", "ssn [PHONE]"),
        ("card 4111 1111 1111 1111", "card [PHONE]"),
        ("account 4155550100", "account [NUMBER]"),
        ("acct ACC-123456789", "acct ACC-[NUMBER]"),
        ("ID12345678901", "ID[NUMBER]"),
    ],
)
def test_pii_is_redacted(text: str, redacted: str) -> None:
    assert redact_text(text) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "on 2024-01-15 10:30 it broke",
        "12:30:45",
        "555 1234",
        "pi is 3.14159265358979",
        "version 10.0.19045",
        "bbox [12.5, 300, 640, 480]",
        "1,234,567,890 items",
        "an image of 1024x768 pixels",
    ],
)
def test_ordinary_numbers_are_kept(text: str) -> None:
    assert redact_text(text) == text


def test_values_keys_and_id_like_numbers() -> None:
    value = {"owner@example.com": ["call 415-555-0100", 123456789, 12345678, True, 1.5, None]}
    assert redact_value(value) == {"[EMAIL]": ["call [PHONE]", "[NUMBER]", 12345678, True, 1.5, None]}
    assert redact_value(value, numbers=False) == {"[EMAIL]": ["call [PHONE]", 123456789, 12345678, True, 1.5, None]}


def test_redact_log_covers_every_text_and_leaves_references() -> None:
    log = NormalizedLog(
        log_id="log-1",
        source_format="openai-chat",
        request_id="req-4155550100",
        timestamp=datetime(2026, 3, 1, tzinfo=UTC),
        prompt="I am jane@example.com",
        images=[ImageInfo(uri="s3://b/jane@example.com/a.png")],
        output_text='{"phone": "415-555-0100"}',
        output={"phone": "415-555-0100"},
        output_error="near 415-555-0100",
        correction={"phone": "+1 415 555 0199", "id": 987654321},
    )
    redacted = redact_log(log)
    assert redacted.prompt == "I am [EMAIL]"
    assert redacted.output_text == '{"phone": "[PHONE]"}'
    assert redacted.output == {"phone": "[PHONE]"}
    assert redacted.output_error == "near [PHONE]"
    assert redacted.correction == {"phone": "[PHONE]", "id": "[NUMBER]"}
    assert (redacted.request_id, redacted.images) == (log.request_id, log.images)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("+49 30 1234567", "[PHONE]"),
        ("0151 12345678", "[PHONE]"),
        ("call 415-555-0100: ask for Bob", "call [PHONE]: ask for Bob"),
        (
            "see https://x/a.png?X-Goog-Signature=abc123&X-Goog-Date=1",
            "see https://x/a.png?X-Goog-Signature=[SECRET]&X-Goog-Date=1",
        ),
    ],
)
def test_issue_12_phone_forms_and_signatures_are_redacted(text: str, redacted: str) -> None:
    assert redact_text(text) == redacted


def test_identifiers_in_image_uris_are_found() -> None:
    assert identifiers_in_uri("s3://vlm-images/jane.doe@example.com/id-card.jpg") == ["email"]
    assert identifiers_in_uri("s3://vlm-images/jane.doe%40example.com/id.jpg") == ["email"]
    assert identifiers_in_uri("s3://vlm-images/users/+4915112345678/a.jpg") == ["phone"]
    assert identifiers_in_uri("s3://vlm-images/chat/1772366400123.png") == []


# -- the fast scans give exactly what the patterns' own `sub` gives ------------------------------------------------

NUMBERY = st.text(alphabet="0123456789 .-()+@:,a_\n\t٣x", max_size=60)
EMAILY = st.text(alphabet="ab.c@-_%+1 é", max_size=40)


@settings(max_examples=500, deadline=None)
@given(NUMBERY)
def test_number_redaction_equals_the_patterns_sub(text: str) -> None:
    assert _redact_numbers(text) == _NUMBERS.sub(_number, text)


@settings(max_examples=500, deadline=None)
@given(EMAILY)
def test_email_redaction_equals_the_patterns_sub(text: str) -> None:
    assert _redact_emails(text) == EMAIL.sub("[EMAIL]", text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ab 1234567890@.x=&sig\x00+-", max_size=30), min_size=3, max_size=3))
def test_redact_log_reads_each_text_from_one_scan_as_if_scanned_alone(texts: list[str]) -> None:
    """The prompt, answer and error are scanned NUL-joined; NULs inside them and signatures running on past the end
    of a text fall back to one scan each."""
    prompt, answer, error = texts
    log = NormalizedLog(log_id="log-1", source_format="openai-chat", request_id="r", prompt=prompt,
                        timestamp=datetime(2026, 3, 1, tzinfo=UTC), output_text=answer, output_error=error)  # fmt: skip
    redacted = redact_log(log)
    assert (redacted.prompt, redacted.output_text, redacted.output_error) == tuple(map(redact_text, texts))


# -- the scans give what the previous, plain `sub` definitions gave -------------------------------------------------

SIGNED_PARAM_BEFORE = re.compile(
    r"(?i)(?<![\w-])((?:x-(?:amz|goog|oss|cos|ms)-(?:signature|credential|security-token)|signature|sig"
    r"|awsaccesskeyid|googleaccessid|ossaccesskeyid|access_token|token)=)[^&\s\"'<>]+"
)
"""`SIGNED_PARAM` as it was written before `_redact_signatures`."""


def redact_text_before(text: str) -> str:
    """`redact_text` as it was: every pattern's own `sub` over the whole text."""
    text = EMAIL.sub("[EMAIL]", text)
    text = SIGNED_PARAM_BEFORE.sub(r"\1[SECRET]", text)
    return _NUMBERS.sub(_number, text)


def redact_value_before(value: Any) -> Any:
    """`redact_value` with `redact_text_before` for every string and key."""
    if isinstance(value, str):
        return redact_text_before(value)
    if isinstance(value, dict):
        return {redact_text_before(key): redact_value_before(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_value_before(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**8:
        return "[NUMBER]"
    return value


PIECES = [
    *"0123456789 .-()+@=&?\x00:_a\n\t٣١",
    *("+1 ", "415 555 0100", "(0151) ", "123456789", "4111 1111 1111", "2024-01-15 10:30", "1.5", "ab@cd.org"),
    *("sig=", "Signature=", "X-Amz-Signature=", "x-goog-security-token=", "token=", "access_token=", "ſig=", "-sig="),
    *("tok", "en=", '"', "<", "ACC-", "id", "é"),
]
"""Text rich in what the patterns look at: digits (Arabic-Indic too), separators, `@`, `=`, `&`, NULs and URL
parameter names (`ſ` matches `s` without case)."""
RICH = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=False) | RICH,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(RICH, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=1000, deadline=None)
@given(RICH)
def test_redact_text_equals_the_plain_subs(text: str) -> None:
    assert redact_text(text) == redact_text_before(text)


@settings(max_examples=1000, deadline=None)
@given(RICH)
def test_number_runs_give_the_patterns_sub(text: str) -> None:
    assert _redact_numbers(text) == _NUMBERS.sub(_number, text)


@settings(max_examples=1000, deadline=None)
@given(RICH)
def test_signatures_tried_at_each_equals_sign_give_the_patterns_sub(text: str) -> None:
    assert _redact_signatures(text) == SIGNED_PARAM_BEFORE.sub(r"\1[SECRET]", text)


@settings(max_examples=300, deadline=None)
@given(JSONISH)
def test_values_are_redacted_as_with_the_plain_subs(value: Any) -> None:
    assert redact_value(value) == redact_value_before(value)


def strings_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [*value, *(text for item in value.values() for text in strings_of(item))]
    if isinstance(value, list):
        return [text for item in value for text in strings_of(item)]
    return []


@settings(max_examples=1000, deadline=None)
@given(JSONISH)
def test_strings_scanned_as_one_text_give_the_value_redacted_string_by_string(value: Any) -> None:
    """`redact_strings` joins the strings (`<` and a NUL between them), splits the result back, and falls back to
    the walk where a string holds the separator."""
    assert redact_strings(value, strings_of(value)) == redact_value(value, numbers=False)


def test_a_value_without_pii_is_returned_as_it_is() -> None:
    value = {"objects": [{"label": "car", "bbox_xyxy": [1.0, 2.0, 3.0, 4.0]}], "note": "seen at 10:30"}
    assert redact_value(value) is value
    assert redact_strings(value, strings_of(value)) is value
    changed = redact_value({"a": [1], "b": {"c": "mail a@b.org"}})
    assert changed == {"a": [1], "b": {"c": "mail [EMAIL]"}}


def test_a_signature_name_longer_than_any_known_one_is_not_one() -> None:
    text = "a?x-goog-security-token=1&xx-goog-security-token=2&X-GOOG-SECURITY-TOKEN=3"
    assert (
        _redact_signatures(text)
        == "a?x-goog-security-token=[SECRET]&xx-goog-security-token=2&X-GOOG-SECURITY-TOKEN=[SECRET]"
    )
