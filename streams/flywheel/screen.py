"""The pure part of the raw-log agent: normalize, apply the filter rules, redact PII. No I/O, no offsets.

The result is either a `NormalizedLog` ready for dedupe, or a `RejectedLog` that names the normalization code or
the rule that fired. Rules see the log before redaction; everything that leaves is redacted (originals included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from schemas.errors import InvalidLog
from schemas.logs import Lineage, NormalizedLog, RejectCode, RejectedLog
from schemas.settings import StreamsSettings
from streams.flywheel.normalize import normalize, raw_log_id
from streams.flywheel.pii import redact_log, redact_text, redact_value
from streams.flywheel.rules import RuleSet, load_rules

MAX_ORIGINAL_CHARS = 2_000
"""Longer strings in a rejected original are cut (an inline image would not fit a message); the lineage points
at the full record."""


@dataclass(frozen=True)
class ScreenConfig:
    rules: RuleSet
    synonyms: dict[str, str]
    redact: bool

    @classmethod
    def from_settings(cls, streams: StreamsSettings) -> ScreenConfig:
        return cls(rules=load_rules(streams.rules_path), synonyms=streams.label_synonyms, redact=streams.redact_pii)


def screen(raw: bytes | None, *, lineage: Lineage, config: ScreenConfig) -> NormalizedLog | RejectedLog:
    """One raw record → the normalized, redacted log, or its rejection with the reason."""
    if raw is None:
        return rejection(b"", lineage, code="not_json", detail="not_json: empty value (tombstone)", config=config)
    try:
        log = normalize(raw, lineage=lineage, synonyms=config.synonyms)
    except InvalidLog as exc:
        return rejection(raw, lineage, code=exc.code, detail=str(exc), config=config)  # type: ignore[arg-type]
    rule = config.rules.first_match(log)
    if rule is not None:
        return rejection(raw, lineage, code="rule", rule=rule.name, detail=rule.description, config=config)
    return redact_log(log) if config.redact else log


def rejection(
    raw: bytes,
    lineage: Lineage,
    *,
    code: RejectCode,
    detail: str,
    config: ScreenConfig,
    rule: str | None = None,
) -> RejectedLog:
    """The rejection of one raw record: its id, the reason, and the original (cut and redacted)."""
    return RejectedLog(
        log_id=raw_log_id(raw),
        code=code,
        rule=rule,
        detail=(redact_text(detail) if config.redact else detail)[:1_000],
        original=_original(raw, redact=config.redact),
        lineage=lineage,
    )


def _original(raw: bytes, *, redact: bool) -> Any:
    """The raw value as JSON with long strings cut, or its text (cut) when it is not JSON; redacted when asked."""
    try:
        original = _cut(json.loads(raw))
        return redact_value(original, numbers=False) if redact else original
    except (ValueError, RecursionError):
        text = _cut(raw.decode("utf-8", "replace"))
        return redact_text(text) if redact else text


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_ORIGINAL_CHARS:
        return f"{value[:MAX_ORIGINAL_CHARS]}…[{len(value) - MAX_ORIGINAL_CHARS} more chars]"
    if isinstance(value, list):
        return [_cut(item) for item in value]
    if isinstance(value, dict):
        return {key: _cut(item) for key, item in value.items()}
    return value
