"""`streams.flywheel.screen` and the pure half of `streams.flywheel.dedupe`: what the raw-log agent decides."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.logs import Lineage, NormalizedLog, RejectedLog
from schemas.settings import StreamsSettings
from schemas.topics import Topic
from streams.flywheel.dedupe import content_hash, lineage_text, request_fingerprint
from streams.flywheel.normalize import normalize
from streams.flywheel.pii import redact_value
from streams.flywheel.rules import RuleSet
from streams.flywheel.screen import MAX_ORIGINAL_CHARS, ScreenConfig, _Bounded, _original, encode_outcome, screen

CONFIG = ScreenConfig.from_settings(StreamsSettings(label_synonyms={"kitty": "cat"}))
LINEAGE = Lineage(topic=Topic.LOGS_RAW, partition=1, offset=9)


def legacy(**overrides: object) -> bytes:
    answer = '{"objects": [{"label": "Kitty", "bbox_2d": [1, 2, 3, 4]}]}'
    log = {"req_id": "r-1", "ts": 1772366400, "app": "shop", "img": "b/a.png", "img_w": 640, "img_h": 480,
           "q": "who is jane@example.com?", "ans": answer}  # fmt: skip
    log.update(overrides)
    return json.dumps(log).encode()


def test_a_good_log_is_normalized_and_redacted() -> None:
    outcome = screen(legacy(), lineage=LINEAGE, config=CONFIG)
    assert isinstance(outcome, NormalizedLog)
    assert outcome.prompt == "who is [EMAIL]?" and outcome.lineage == LINEAGE
    assert outcome.output == {"objects": [{"label": "cat", "bbox_xyxy": [1.0, 2.0, 3.0, 4.0]}]}


def test_rules_see_the_log_before_redaction() -> None:
    rules = RuleSet.model_validate({"rules": [{"name": "emails", "when": {"field": "prompt", "regex": "@example"}}]})
    config = ScreenConfig(rules=rules, synonyms={}, redact=True)
    outcome = screen(legacy(), lineage=LINEAGE, config=config)
    assert isinstance(outcome, RejectedLog)
    assert (outcome.code, outcome.rule) == ("rule", "emails")
    assert outcome.original["q"] == "who is [EMAIL]?"


def test_rejections_name_the_code_and_keep_the_original() -> None:
    outcome = screen(legacy(ts="never"), lineage=LINEAGE, config=CONFIG)
    assert isinstance(outcome, RejectedLog)
    assert (outcome.code, outcome.rule, outcome.lineage) == ("invalid_timestamp", None, LINEAGE)
    assert outcome.detail.startswith("invalid_timestamp: ts:") and outcome.original["ts"] == "never"
    rule = screen(legacy(app="loadtest-1"), lineage=LINEAGE, config=CONFIG)
    assert isinstance(rule, RejectedLog) and (rule.code, rule.rule) == ("rule", "test-traffic")


def test_unreadable_records_are_rejected_as_text_cut_and_redacted() -> None:
    text = b"oops jane@example.com " + b"x" * 5_000
    outcome = screen(text, lineage=LINEAGE, config=CONFIG)
    assert isinstance(outcome, RejectedLog) and outcome.code == "not_json"
    assert outcome.original.startswith("oops [EMAIL] xxx") and outcome.original.endswith("more chars]")
    assert len(outcome.original) < MAX_ORIGINAL_CHARS + 50
    tombstone = screen(None, lineage=LINEAGE, config=CONFIG)
    assert isinstance(tombstone, RejectedLog) and tombstone.code == "not_json"
    inline = screen(legacy(img="data:image/png;base64," + "A" * 10_000), lineage=LINEAGE, config=CONFIG)
    assert isinstance(inline, RejectedLog) and inline.code == "inline_image"
    assert len(inline.original["img"]) < MAX_ORIGINAL_CHARS + 50


def test_a_lone_surrogate_is_a_not_json_rejection_that_can_be_sent() -> None:
    """`json` reads `"\\ud800"` into a string that no encoder can write as UTF-8: refused when read, so the record
    gets its rejection rather than failing to encode (an `internal_error` in the stage)."""
    for raw in (legacy(q="who is \ud800?"), legacy(ans='{"label": "\udfff"}'), legacy(**{"\udbff": 1})):
        outcome = screen(raw, lineage=LINEAGE, config=CONFIG)
        assert isinstance(outcome, RejectedLog) and outcome.code == "not_json", raw
        assert "surrogate" in outcome.detail
        final, value = encode_outcome(outcome, raw, CONFIG)
        assert final.original is not None and b"\\ud" in value
    paired = screen(legacy(q="\ud83d\ude00"), lineage=LINEAGE, config=CONFIG)
    assert isinstance(paired, NormalizedLog) and paired.prompt == "\U0001f600"


def test_without_redaction_texts_stay() -> None:
    config = ScreenConfig(rules=CONFIG.rules, synonyms={}, redact=False)
    outcome = screen(legacy(), lineage=LINEAGE, config=config)
    assert isinstance(outcome, NormalizedLog) and outcome.prompt == "who is jane@example.com?"


def test_content_hash_and_request_fingerprint() -> None:
    first = normalize(legacy())
    resent = normalize(legacy(req_id="r-2", ts=1772366500, app="shop"))
    other_answer = normalize(legacy(req_id="r-3", ans='{"objects": []}'))
    other_tenant = normalize(legacy(req_id="r-4", app="claims"))
    assert content_hash(first) == content_hash(resent) == content_hash(other_tenant) != content_hash(other_answer)
    assert request_fingerprint(first) == request_fingerprint(other_answer) != request_fingerprint(other_tenant)
    assert lineage_text(LINEAGE) == f"{Topic.LOGS_RAW}:1:9"


def test_a_deep_or_huge_raw_log_still_gets_a_sendable_rejection() -> None:
    """Issue 12 item 8: a 300-deep raw log broke the rejection's encoding; a ~1 MB one exceeded the request size."""
    from streams.flywheel.screen import MAX_RECORD_BYTES, encode_outcome

    deep = ("[" * 300 + "]" * 300).encode()
    huge = json.dumps({"req_id": "r", "items": ["x" * 50] * 20_000}).encode()
    for raw in (deep, huge):
        outcome = screen(raw, lineage=LINEAGE, config=CONFIG)
        final, value = encode_outcome(outcome, raw, CONFIG)
        assert isinstance(final, RejectedLog) and len(value) <= MAX_RECORD_BYTES


ORIGINALS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet="ab1@.=x<\x00 ", max_size=2_100),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)  # fmt: skip


def nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@settings(max_examples=300, deadline=None)
@given(ORIGINALS, st.sampled_from([0, 12, 15, 16, 17]))
def test_an_original_within_the_bounds_is_kept_as_bounded(value: Any, depth: int) -> None:
    """Originals that `_Bounded` keeps whole skip it; the kept value is the same either way, redacted or not."""
    original = nested(value, depth)
    raw = json.dumps(original).encode()
    bounded = _Bounded().value(original, depth=0)
    assert _original(raw, original, redact=False) == bounded
    assert _original(raw, original, redact=True) == redact_value(bounded, numbers=False)
