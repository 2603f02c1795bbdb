"""PII redaction: emails, phone numbers, long digit runs (ID, account and card numbers) and URL signatures in every
text that can reach a dataset, replaced by `[EMAIL]`, `[PHONE]`, `[NUMBER]` and `<param>=[SECRET]`.

Redacted: the prompt, the answer text, every string (and object key) inside the parsed answer and the
correction, and whole integers of 9 or more digits there. Not redacted: ids, tenants, model names and image URIs,
which are references rather than text (an image key is what the dataset points at); a log whose image URI holds
an email or an international phone number is rejected instead (`identifiers_in_uri`), since its reference cannot
be kept without the identifier.

Phone numbers are found by one region-free pattern (digit groups of 1–8 digits joined by spaces, dots or dashes,
optionally `+country` and `(area)`), redacted from 9 digits on (7 after a `+`). The `phonenumbers` library was
measured for this and not taken: it needs the caller's region to read national numbers (and then finds "30" in
"10:30" for Germany), and its matcher costs about 360 µs per text on the 2-core development machine, more than the
whole screening of a log. Every pattern is linear in the text's length, and a text without `@`, `=` or a digit is
not scanned at all.
"""

from __future__ import annotations

import re
from typing import TypeVar
from urllib.parse import unquote

from schemas.logs import NormalizedLog

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]++@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
"""The lookbehind lets a match start only where a run of address characters starts, so a long run without `@`
is scanned once, not once per character (which made a 600 kB answer take minutes)."""
PHONE = (
    r"(?<![\w@+])(?P<country>\+\d{1,3}[\s.\-]?)?(?:\(\d{1,4}\)[\s.\-]?)?\d{1,4}(?:[\s.\-]\d{2,8}){1,5}"
    r"(?!\w|[.\-]\d|:\d)"
)
"""Digit groups joined by spaces, dots or dashes. Not followed by `:digit`, so `2024-01-15 10:30` is a date and a
time, while `call 0151 12345678: ...` is a number."""
PHONE_MIN_DIGITS = 9
PHONE_MIN_DIGITS_INTERNATIONAL = 7
LONG_NUMBER = r"(?<![\d.])\d{9,}(?![\d]|\.\d)"
LONG_NUMBER_MIN = 10**8
"""Whole numbers from this up (9 digits) are ID-like."""
_NUMBERS = re.compile(f"(?P<phone>{PHONE})|(?P<number>{LONG_NUMBER})")
"""Phone numbers and long digit runs in one pass (a phone number is tried first at each position)."""
SIGNED_PARAM = re.compile(
    r"(?i)(?<![\w-])((?:x-(?:amz|goog|oss|cos|ms)-(?:signature|credential|security-token)|signature|sig"
    r"|awsaccesskeyid|googleaccessid|ossaccesskeyid|access_token|token)=)[^&\s\"'<>]+"
)
"""A signature, credential or token in a URL query written into a text: its value is what grants access."""
_URI_PHONE = re.compile(r"(?<![\w+])\+\d(?:[\s.\-]?\d){6,14}(?!\d)")

_SCAN = re.compile(r"[@=0-9]")
"""Only texts holding one of these can hold anything this module redacts."""
_NUMBER_CANDIDATE = re.compile(r"\d(?:[\s.\-()]{0,2}\d){6}")
"""Seven digits with at most two separators between neighbours: every phone number and long digit run holds such
a span. Searching for it is several times cheaper than the full pattern, and most texts (answers full of
coordinates like `[120, 40, 300, 200]`) do not hold one."""

T = TypeVar("T")


def redact_text(text: str) -> str:
    """The text with every email, phone number, long digit run and URL signature replaced by a placeholder."""
    if _SCAN.search(text) is None:
        return text
    if "@" in text:
        text = EMAIL.sub("[EMAIL]", text)
    if "=" in text:
        text = SIGNED_PARAM.sub(r"\1[SECRET]", text)
    if _NUMBER_CANDIDATE.search(text) is None:
        return text
    return _NUMBERS.sub(_number, text)


def _number(match: re.Match[str]) -> str:
    if match.group("number") is not None:
        return "[NUMBER]"
    found = match.group(0)
    digits = sum(map(str.isdigit, found))
    needed = PHONE_MIN_DIGITS_INTERNATIONAL if match.group("country") else PHONE_MIN_DIGITS
    return "[PHONE]" if digits >= needed else found


def identifiers_in_uri(uri: str) -> list[str]:
    """What identifies a person in an image URI (`email`, `phone`): an email or an international phone number
    anywhere in it, percent-encoded or not (so a URI without `@`, `+` or `%` is not scanned). Plain digit runs are
    not counted: object keys are full of ids and times."""
    if "@" not in uri and "+" not in uri and "%" not in uri:
        return []
    text = unquote(uri)
    found = []
    if EMAIL.search(text) is not None:
        found.append("email")
    if _URI_PHONE.search(text) is not None:
        found.append("phone")
    return found


def redact_value(value: T, *, numbers: bool = True) -> T:
    """A JSON value with every string and key redacted and, with `numbers`, ID-like whole numbers replaced by
    `[NUMBER]` (off for raw originals, whose numbers are times and sizes needed to diagnose a rejection)."""
    if isinstance(value, str):
        return redact_text(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {  # type: ignore[return-value]
            (redact_text(key) if isinstance(key, str) else key): redact_value(item, numbers=numbers)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_value(item, numbers=numbers) for item in value]  # type: ignore[return-value]
    if numbers and isinstance(value, int) and not isinstance(value, bool) and abs(value) >= LONG_NUMBER_MIN:
        return "[NUMBER]"  # type: ignore[return-value]
    return value


def redact_log(log: NormalizedLog, *, output_from_text: bool = False) -> NormalizedLog:
    """The log with its prompt, answer, correction and error text redacted (the very same log when nothing in it
    is PII: its texts are scanned once, NUL-joined, and most logs hold none).

    `output_from_text` says that `output` was read from `output_text` (or `output_text` written from `output`), as
    `streams.flywheel.normalize` does: then every string, key and whole number of `output` appears in that text
    (the vocabulary's own keys and labels aside), so a text without escapes in which nothing is redacted proves
    that `output` holds nothing to redact either, and its walk is skipped."""
    text = log.output_text
    joined = "\x00".join((log.prompt, text or "", log.output_error or ""))
    texts_clean = redact_text(joined) == joined
    output_clean = log.output is None or (output_from_text and texts_clean and text is not None and "\\" not in text)
    if texts_clean and output_clean and log.correction is None:
        return log
    return log.model_copy(
        update={
            "prompt": redact_text(log.prompt),
            "output_text": redact_value(text),
            "output": log.output if output_clean else redact_value(log.output),
            "output_error": redact_value(log.output_error),
            "correction": redact_value(log.correction),
        }
    )
