"""PII redaction: emails, phone numbers and long digit runs (ID, account and card numbers) in every text that can
reach a dataset, replaced by `[EMAIL]`, `[PHONE]` and `[NUMBER]`.

Redacted: the prompt, the answer text, every string (and object key) inside the parsed answer and the
correction, and whole integers of 9 or more digits there. Not redacted: ids, tenants, model names and image URIs,
which are references rather than text (an image key is what the dataset points at).
"""

from __future__ import annotations

import re
from typing import TypeVar

from schemas.logs import NormalizedLog

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]++@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
"""The lookbehind lets a match start only where a run of address characters starts, so a long run without `@`
is scanned once, not once per character (which made a 600 kB answer take minutes)."""
PHONE = re.compile(
    r"(?<![\w@+])(\+\d{1,3}[\s.\-]?)?(?:\(\d{1,4}\)[\s.\-]?)?\d{1,4}(?:[\s.\-]\d{2,6}){1,5}(?![\w:]|[.\-]\d)"
)
"""Digit groups joined by spaces, dots or dashes, optionally with `+country` and `(area)`. Only matches with at
least `PHONE_MIN_DIGITS` digits (7 after a `+`) are redacted, so dates like 2024-01-15 and times stay."""
PHONE_MIN_DIGITS = 9
LONG_NUMBER = re.compile(r"(?<![\d.])\d{9,}(?![\d]|\.\d)")
LONG_NUMBER_MIN = 10**8
"""Whole numbers from this up (9 digits) are ID-like."""

T = TypeVar("T")


def redact_text(text: str) -> str:
    """The text with every email, phone number and long digit run replaced by a placeholder."""
    text = EMAIL.sub("[EMAIL]", text)
    text = PHONE.sub(_phone, text)
    return LONG_NUMBER.sub("[NUMBER]", text)


def _phone(match: re.Match[str]) -> str:
    digits = sum(character.isdigit() for character in match.group(0))
    needed = 7 if match.group(1) else PHONE_MIN_DIGITS
    return "[PHONE]" if digits >= needed else match.group(0)


def redact_value(value: T, *, numbers: bool = True) -> T:
    """A JSON value with every string and key redacted and, with `numbers`, ID-like whole numbers replaced by
    `[NUMBER]` (off for raw originals, whose numbers are times and sizes needed to diagnose a rejection)."""
    if isinstance(value, str):
        return redact_text(value)  # type: ignore[return-value]
    if isinstance(value, bool):
        return value
    if numbers and isinstance(value, int) and abs(value) >= LONG_NUMBER_MIN:
        return "[NUMBER]"  # type: ignore[return-value]
    if isinstance(value, list):
        return [redact_value(item, numbers=numbers) for item in value]  # type: ignore[return-value]
    if isinstance(value, dict):
        return {  # type: ignore[return-value]
            (redact_text(key) if isinstance(key, str) else key): redact_value(item, numbers=numbers)
            for key, item in value.items()
        }
    return value


def redact_log(log: NormalizedLog) -> NormalizedLog:
    """The log with its prompt, answer, correction and error text redacted."""
    return log.model_copy(
        update={
            "prompt": redact_text(log.prompt),
            "output_text": redact_value(log.output_text),
            "output": redact_value(log.output),
            "output_error": redact_value(log.output_error),
            "correction": redact_value(log.correction),
        }
    )
