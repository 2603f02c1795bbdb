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
from operator import is_
from typing import TypeVar
from urllib.parse import unquote

from schemas.logs import NormalizedLog

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]++@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
"""The lookbehind lets a match start only where a run of address characters starts, so a long run without `@`
is scanned once, not once per character (which made a 600 kB answer take minutes)."""
_ADDRESS_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
"""What `EMAIL` matches before the `@`."""
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
_NUMBER_START = re.compile(r"[+(\d](?:(?<![\w@+].)|(?<=\d)(?<![\d.].))")
"""Where a match of `_NUMBERS` can start: `+`, `(` or a digit after no word character, `@` or `+` (a phone number),
or a digit after no digit or `.` (a long number). Written to start with that character, so that `re` finds these
places by a fast scan for it; `_NUMBERS` starts with lookbehinds, so `re` would try it in full at every position."""
_NUMBER_RUN = re.compile(r"[+(\d][\d\s.\-()+]{6,}")
"""Where `_NUMBERS` can match text it redacts. Its matches are made of these characters, so each lies inside one
run of them, and those that are redacted hold 7 digits or more; so matches in shorter runs change nothing, and
matches in one run do not move those in another. A run is taken from its first `+`, `(` or digit, where `_NUMBERS`
can first start in it."""
_ASCII_NUMBER_RUN = re.compile(r"[+(0-9][0-9\s.\-()+]{6,}")
"""`_NUMBER_RUN` for ASCII text, where `[0-9]` is `\\d`: `re` tests a range faster than the Unicode digit category,
and the run search tries every digit of a text (less than half the cost)."""
_RUN_CHARS = bytes(
    ord("1") if code < 128 and re.fullmatch(r"[\d\s.\-()+]", chr(code)) else ord("0") for code in range(256)
)
"""ASCII characters that `_NUMBER_RUN` repeats as `1`, others as `0`: in ASCII text translated by it, the first run
starts at the first `1111111` (a run is 7 of these characters or more), and a text without one holds none.
NOTE: translating and searching the bytes costs a fifth of the run search in a text without runs (most texts)."""
_RUN_START = b"1" * 7
_SIGNED_NAME = (
    r"(?<![\w-])(?:x-(?:amz|goog|oss|cos|ms)-(?:signature|credential|security-token)|signature|sig"
    r"|awsaccesskeyid|googleaccessid|ossaccesskeyid|access_token|token)="
)
SIGNED_PARAM = re.compile(rf"({_SIGNED_NAME})[^&\s\"'<>]+", re.IGNORECASE)
"""A signature, credential or token in a URL query written into a text: its value is what grants access."""
_SIGNED_NAME_AT_END = re.compile(rf"{_SIGNED_NAME}\Z", re.IGNORECASE)
"""A parameter name of `SIGNED_PARAM` and its `=`, ending where the search ends."""
_LONGEST_SIGNED_NAME = len("x-goog-security-token=")
"""How far before its `=` a name of `SIGNED_PARAM` can start."""
_URI_PHONE = re.compile(r"(?<![\w+])\+\d(?:[\s.\-]?\d){6,14}(?!\d)")

_SCAN = re.compile(r"[@=0-9]")
"""Only texts holding one of these can hold anything this module redacts."""
T = TypeVar("T")


def redact_text(text: str) -> str:
    """The text with every email, phone number, long digit run and URL signature replaced by a placeholder."""
    if _SCAN.search(text) is None:
        return text
    if "@" in text:
        text = _redact_emails(text)
    if "=" in text:
        text = _redact_signatures(text)
    return _redact_numbers(text)


def _redact_emails(text: str) -> str:
    """`EMAIL.sub("[EMAIL]", text)`, with `EMAIL` tried only where a match can start: every match holds an `@` and
    starts where the run of address characters before it starts (`re` would try `EMAIL`, which starts with a
    lookbehind, at every position). A run that began inside the last match cannot start one, as with `sub`."""
    parts: list[str] = []
    done = 0
    at = text.find("@")
    while at != -1:
        start = at
        while start > done and text[start - 1] in _ADDRESS_CHARS:
            start -= 1
        match = None
        if start < at and (start > done or done == 0 or text[done - 1] not in _ADDRESS_CHARS):
            match = EMAIL.match(text, start)
        if match is None:
            at = text.find("@", at + 1)
            continue
        parts += (text[done:start], "[EMAIL]")
        done = match.end()
        at = text.find("@", done)
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


def _redact_signatures(text: str) -> str:
    """`SIGNED_PARAM.sub(r"\\1[SECRET]", text)`, with `SIGNED_PARAM` tried only where a name ends at an `=` (`re`
    would try it, as it starts with a lookbehind, at every position). A name is a run of word characters and
    dashes, so each `=` ends at most one, starting after the previous `=` or match and at most the longest name
    before it."""
    parts: list[str] = []
    done = searched = 0
    at = text.find("=")
    while at != -1:
        # NOTE: `endpos` makes `\Z` match right after this `=`; lookbehinds still see the text before `pos`.
        name = _SIGNED_NAME_AT_END.search(text, max(searched, at + 1 - _LONGEST_SIGNED_NAME), at + 1)
        match = None if name is None else SIGNED_PARAM.match(text, name.start())
        if match is None:
            searched = at + 1
        else:
            parts += (text[done : match.start()], match.group(1), "[SECRET]")
            done = searched = match.end()
        at = text.find("=", searched)
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


def _redact_numbers(text: str) -> str:
    """`_NUMBERS.sub(_number, text)`, with `_NUMBERS` tried only inside `_NUMBER_RUN`s and there only where
    `_NUMBER_START` says a match can start (the same matches, found as `sub` finds them: leftmost first, the next
    search from the end of the last match)."""
    if text.isascii():
        first = text.encode().translate(_RUN_CHARS).find(_RUN_START)
        if first == -1:
            return text
        runs = _ASCII_NUMBER_RUN.finditer(text, first)
    else:
        runs = _NUMBER_RUN.finditer(text)
    parts: list[str] = []
    done = 0
    for run in runs:
        # NOTE: `_NUMBER_START` only looks behind, so `end` does not change where it matches; `_NUMBERS` is matched
        # without it, since its lookaheads must see the text after the run.
        end = run.end()
        start = _NUMBER_START.search(text, run.start(), end)
        while start is not None:
            at = start.start()
            match = _NUMBERS.match(text, at)
            if match is None:
                start = _NUMBER_START.search(text, at + 1, end)
                continue
            parts += (text[done:at], _number(match))
            done = match.end()
            start = _NUMBER_START.search(text, done, end) if done < end else None
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


def _number(match: re.Match[str]) -> str:
    if match.lastgroup == "number":
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
    `[NUMBER]` (off for raw originals, whose numbers are times and sizes needed to diagnose a rejection). Only what
    changes is copied: the very value when nothing does."""
    if isinstance(value, str):
        return redact_text(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        fields = {}
        changed = False
        for key, item in value.items():
            new_key = redact_text(key) if isinstance(key, str) else key
            new_item = fields[new_key] = redact_value(item, numbers=numbers)
            changed = changed or new_key is not key or new_item is not item
        return fields if changed else value  # type: ignore[return-value]
    if isinstance(value, list):
        items = [redact_value(item, numbers=numbers) for item in value]
        return value if all(map(is_, items, value)) else items  # type: ignore[return-value]
    if numbers and isinstance(value, int) and not isinstance(value, bool) and abs(value) >= LONG_NUMBER_MIN:
        return "[NUMBER]"  # type: ignore[return-value]
    return value


def redact_strings(value: T, texts: list[str]) -> T:
    """`redact_value(value, numbers=False)` for a caller that walked `value` already and has every string and key
    of it in `texts` (in any order): they are scanned as one text, and most values hold nothing to redact."""
    joined = _SEPARATOR.join(texts)
    redacted = redact_text(joined)
    if redacted == joined:
        return value
    parts = redacted.split(_SEPARATOR)
    if len(parts) != len(texts) or joined.count(_SEPARATOR) != len(texts) - 1:
        return redact_value(value, numbers=False)
    return _rebuilt(value, dict(zip(texts, parts, strict=True)))


_SEPARATOR = "<\x00"
"""Between the texts `redact_strings` scans as one: no pattern matches a NUL but a URL signature's value, which
`<` ends, as the end of a text does; next to either, each pattern behaves as at the start or end of a text."""


def _rebuilt(value: T, redacted: dict[str, str]) -> T:
    """`value` with each string and key replaced by its redacted text in `redacted`."""
    if isinstance(value, str):
        return redacted[value]  # type: ignore[return-value]
    if isinstance(value, dict):
        return {  # type: ignore[return-value]
            (redacted[key] if isinstance(key, str) else key): _rebuilt(item, redacted) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rebuilt(item, redacted) for item in value]  # type: ignore[return-value]
    return value


def redact_log(log: NormalizedLog, *, output_from_text: bool = False) -> NormalizedLog:
    """The log with its prompt, answer, correction and error text redacted (the very same log when nothing in it
    is PII: its texts are scanned once, NUL-joined, and most logs hold none; a correction, in one more scan).

    `output_from_text` says that `output` was read from `output_text` (or `output_text` written from `output`), as
    `streams.flywheel.normalize` does: then every string, key and whole number of `output` appears in that text
    (the vocabulary's own keys and labels aside), so a text without escapes in which nothing is redacted proves
    that `output` holds nothing to redact either, and its walk is skipped."""
    text = log.output_text
    joined = "\x00".join((log.prompt, text or "", log.output_error or ""))
    redacted = redact_text(joined)
    texts_clean = redacted == joined
    output_clean = log.output is None or (output_from_text and texts_clean and text is not None and "\\" not in text)
    correction = None if log.correction is None else redact_value(log.correction)
    if texts_clean and output_clean and correction is log.correction:
        return log
    prompt, text, error = (log.prompt, text, log.output_error) if texts_clean else _texts(log, joined, redacted)
    return log.model_copy(
        update={
            "prompt": prompt,
            "output_text": text,
            "output": log.output if output_clean else redact_value(log.output),
            "output_error": error,
            "correction": correction,
        }
    )


def _texts(log: NormalizedLog, joined: str, redacted: str) -> tuple[str, str | None, str | None]:
    """The prompt, answer text and error redacted, read from `redacted` (`redact_text(joined)`) where it splits
    back into three texts: no pattern but a URL signature's value matches a NUL, and next to one each behaves as at
    the start or end of a text. Redacted one by one when a text holds a NUL or a signature ran on across one."""
    parts = redacted.split("\x00")
    if len(parts) != 3 or joined.count("\x00") != 2:
        return redact_text(log.prompt), redact_value(log.output_text), redact_value(log.output_error)
    prompt, text, error = parts
    return prompt, text if log.output_text is not None else None, error if log.output_error is not None else None
