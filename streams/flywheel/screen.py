"""The pure part of the raw-log stage: normalize, apply the filter rules, redact PII, and encode what leaves. No
I/O, no offsets.

`screen` gives either a `NormalizedLog` ready for dedupe, or a `RejectedLog` that names the normalization code or
the rule that fired. Rules see the log before redaction; everything that leaves is redacted (originals included).
`encode_outcome` turns either into the bytes of one Kafka record and never fails: a normalized log too large for a
message becomes a `too_large` rejection, and a rejection whose original cannot be encoded keeps its reason with
the original left out. A rejected original is bounded before it is kept (depth, length of each string, total
size), so a hostile raw log cannot make its own rejection unsendable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.codec import encode
from schemas.errors import InvalidLog
from schemas.logs import Lineage, NormalizedLog, RejectCode, RejectedLog
from schemas.settings import StreamsSettings
from streams.flywheel.jsontext import loads
from streams.flywheel.normalize import load_raw, loaded_log_id, log_id_of, normalize_loaded
from streams.flywheel.pii import identifiers_in_uri, redact_log, redact_strings, redact_text, redact_value
from streams.flywheel.rules import RuleSet, load_rules

MAX_REQUEST_BYTES = 1_000_000
"""The producer's request limit (Kafka's default `max.request.size`); a record over it could never be sent."""
MAX_RECORD_BYTES = 900_000
"""Records above this are not sent as they are (room left for the key, headers and the hard case's extra fields):
a normalized log becomes a `too_large` rejection, a rejection loses its original."""
MAX_ORIGINAL_CHARS = 2_000
"""Longer strings in a rejected original are cut (an inline image would not fit a message); the lineage points
at the full record."""
MAX_ORIGINAL_TOTAL_CHARS = 100_000
"""Characters (strings and keys) kept of one rejected original; the rest of its items are counted, not kept."""
NOT_READ: Any = object()
"""`rejection(value=...)` when the raw record was not read yet."""
NOT_JSON: Any = object()
"""A raw record that is not JSON (its original is kept as cut text)."""
MAX_ORIGINAL_DEPTH = 16
"""Containers nested deeper in a rejected original are replaced by a note (the serializer's own limit is lower
than what JSON parsers accept)."""


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
    value: Any = NOT_READ
    log_id = None
    try:
        value = load_raw(raw)
        log_id = loaded_log_id(value)
        log = normalize_loaded(value, log_id, lineage=lineage, synonyms=config.synonyms)
    except InvalidLog as exc:
        code: Any = exc.code
        return rejection(raw, lineage, code=code, detail=str(exc), config=config, value=value, log_id=log_id)
    rule = config.rules.first_match(log)
    if rule is not None:
        return rejection(
            raw,
            lineage,
            code="rule",
            rule=rule.name,
            detail=rule.description,
            config=config,
            value=value,
            log_id=log_id,
        )
    if not config.redact:
        return log
    for index, image in enumerate(log.images):
        found = identifiers_in_uri(image.uri)
        if found:
            detail = f"images[{index}].uri holds {' and '.join(found)}: the example cannot point at it without them"
            return rejection(raw, lineage, code="pii_in_image_uri", detail=detail, config=config, value=value)
    return redact_log(log, output_from_text=True)


def rejection(
    raw: bytes,
    lineage: Lineage,
    *,
    code: RejectCode,
    detail: str,
    config: ScreenConfig,
    rule: str | None = None,
    value: Any = NOT_READ,
    log_id: str | None = None,
) -> RejectedLog:
    """The rejection of one raw record: its id, the reason, and the original (bounded and redacted). `value`: the
    record's JSON value when `load_raw` already read it (it is not parsed again); `log_id`: its id when known."""
    if value is NOT_READ:
        try:
            value = loads(raw)
        except (ValueError, RecursionError):
            value = NOT_JSON
    if log_id is None:
        log_id = log_id_of(raw) if value is NOT_JSON else loaded_log_id(value)
    return RejectedLog(
        log_id=log_id,
        code=code,
        rule=rule,
        detail=(redact_text(detail) if config.redact else detail)[:1_000],
        original=_original(raw, value, redact=config.redact),
        lineage=lineage,
    )


def encode_outcome(
    outcome: NormalizedLog | RejectedLog, raw: bytes | None, config: ScreenConfig
) -> tuple[NormalizedLog | RejectedLog, bytes]:
    """The record to send for `outcome` and its bytes, always under `MAX_RECORD_BYTES`: a normalized log too large
    becomes a `too_large` rejection; a rejection that cannot be encoded or is too large keeps its code, rule and
    detail without the original (the lineage still points at the raw record)."""
    if isinstance(outcome, NormalizedLog):
        value = encode(outcome)
        if len(value) <= MAX_RECORD_BYTES:
            return outcome, value
        detail = f"the normalized record has {len(value)} bytes, more than {MAX_RECORD_BYTES}"
        assert outcome.lineage is not None, "the raw-log stage gives every log its lineage"
        outcome = rejection(raw or b"", outcome.lineage, code="too_large", detail=detail, config=config)
    try:
        value = encode(outcome)
    except ValueError as exc:
        why = f"its original could not be encoded ({type(exc).__name__})"
    else:
        if len(value) <= MAX_RECORD_BYTES:
            return outcome, value
        why = f"with its original it has {len(value)} bytes, more than {MAX_RECORD_BYTES}"
    bare = outcome.model_copy(update={"original": None, "detail": f"{outcome.detail} [{why}; original left out]"})
    return bare, encode(bare)


def _original(raw: bytes, value: Any, *, redact: bool) -> Any:
    """The raw value as JSON, bounded; or its text (cut) when it is not JSON. Strings redacted when asked."""
    if value is NOT_JSON:
        text = _cut(raw.decode("utf-8", "replace"))
        return redact_text(text) if redact else text
    texts = _texts_within_bounds(value, len(raw))
    if texts is not None:
        return redact_strings(value, texts) if redact else value
    bounded = _Bounded()
    original = bounded.value(value, depth=0)
    if not redact:
        return original
    # NOTE: one scan of every kept string (NUL between them, which no pattern needs) finds most originals clean;
    # only the others are walked string by string. A match spanning a NUL (the URL-signature pattern can) only
    # sends an original down that slower walk.
    joined = "\x00".join(bounded.texts)
    return original if redact_text(joined) == joined else redact_value(original, numbers=False)


def _texts_within_bounds(value: Any, size: int) -> list[str] | None:
    """Every string and key of a JSON value read from `size` bytes (in no particular order) when `_Bounded` would
    keep all of it as it is: no string or key too long, nothing too deep; None otherwise. `_Bounded` charges each
    string its length and each other item 8, and a JSON text spends at least one byte on each (and on each
    character), so no total cut is possible below `MAX_ORIGINAL_TOTAL_CHARS / 8` bytes."""
    # NOTE: a level-by-level walk that copies nothing (about half the cost of `_Bounded`, which copies every item).
    if size * 8 >= MAX_ORIGINAL_TOTAL_CHARS:
        return None
    texts: list[str] = []
    level = [value]
    for depth in range(MAX_ORIGINAL_DEPTH + 1):
        children: list[Any] = []
        for node in level:
            if isinstance(node, str):
                texts.append(node)
            elif isinstance(node, dict | list):
                if depth == MAX_ORIGINAL_DEPTH:
                    return None
                if isinstance(node, dict):
                    texts.extend(node)
                    children.extend(node.values())
                else:
                    children.extend(node)
        level = children
    return texts if all(len(text) <= MAX_ORIGINAL_CHARS for text in texts) else None


def _cut(text: str) -> str:
    if len(text) > MAX_ORIGINAL_CHARS:
        return f"{text[:MAX_ORIGINAL_CHARS]}…[{len(text) - MAX_ORIGINAL_CHARS} more chars]"
    return text


@dataclass
class _Bounded:
    """One pass over an original, keeping at most `MAX_ORIGINAL_TOTAL_CHARS` characters and `MAX_ORIGINAL_DEPTH`
    levels (recursion is bounded by the latter)."""

    left: int = MAX_ORIGINAL_TOTAL_CHARS
    texts: list[str] = field(default_factory=list)
    """Every string and key kept."""

    def value(self, value: Any, *, depth: int) -> Any:
        if isinstance(value, str):
            kept = _cut(value)
            self.left -= len(kept)
            self.texts.append(kept)
            return kept
        if not isinstance(value, dict | list):
            self.left -= 8
            return value
        if depth >= MAX_ORIGINAL_DEPTH:
            return f"…[nested deeper than {MAX_ORIGINAL_DEPTH} levels]"
        if isinstance(value, list):
            items: list[Any] = []
            for index, item in enumerate(value):
                if self.left <= 0:
                    items.append(f"…[{len(value) - index} more items]")
                    break
                items.append(self.value(item, depth=depth + 1))
            return items
        fields: dict[str, Any] = {}
        for index, (key, item) in enumerate(value.items()):
            if self.left <= 0:
                fields["…"] = f"[{len(value) - index} more keys]"
                break
            name = _cut(key)
            self.left -= len(name)
            self.texts.append(name)
            fields[name] = self.value(item, depth=depth + 1)
        return fields
