"""JSON text of raw logs and answers, read and written fast (orjson) with exactly the standard library's results.

orjson parses and serializes 4–7× faster than `json`, and the flywheel reads every raw log, parses every answer
and hashes every log's canonical form. Where the two libraries would give different results, the standard
library's result is the one kept, so ids and decisions do not depend on which parser ran:

- `loads`: orjson reads integers beyond 64 bits as floats (a 20-digit account number would lose digits). Texts
  with a run of 20 or more digits, and texts orjson refuses, go to `json.loads`. Either way NaN, Infinity, numbers
  too large for a float (`1e400`) and lone surrogates (which `json` reads and orjson does not) are refused: so
  every float `loads` returns is finite, and every string can be written as UTF-8.
- `canonical`: `json.dumps(sort_keys=True, separators=(",", ":"))` escapes every character outside printable
  ASCII, writes small floats as `1e-05` and NaN as `NaN`; orjson writes UTF-8, `0.00001` and `null`. orjson's
  bytes are kept only when they are printable ASCII without a small float, and without `null` unless the value
  holds no NaN or infinity; everything else is written by `json.dumps`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

import orjson

_DIGITS_AS_ZERO = bytes(ord("0") if chr(code).isdigit() and code < 128 else ord(".") for code in range(256))
_LONG_DIGITS = b"0" * 20
"""orjson reads integers up to 64 bits exactly; a run of 20 digits may be a larger one. Found by mapping digits to
`0` and everything else to `.` and searching the bytes (a regex costs four times as much)."""
_SMALL_FLOAT = re.compile(rb"e-(?<=\de-)")
"""A float orjson writes with a negative exponent (`json` writes small floats with an exponent orjson does not).
NOTE: `e-` first, the digit before it checked behind: `re` finds a literal start by a fast scan, and this search
costs less than `b"e-" in out` alone (with `\\de-`, `re` tries every byte: ten times as much)."""
_SORTED = orjson.OPT_SORT_KEYS


class RefusedJson(ValueError):
    """A text that Python's `json` reads but that holds no JSON value: NaN, Infinity, a number beyond a float's
    range, or a string with half a surrogate pair (`"\\ud800"`), which is not Unicode text and could not be written
    as UTF-8 again (every record it reached would fail to encode)."""


def _refuse_constant(name: str) -> NoReturn:
    raise RefusedJson(f"{name} is not JSON")


def loads(data: bytes | str) -> Any:
    """The JSON value of `data`; raises `ValueError` (a `json.JSONDecodeError`, `RefusedJson` or
    `UnicodeDecodeError`) or `RecursionError` exactly as `json.loads` with NaN, Infinity and lone surrogates refused
    would."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _LONG_DIGITS not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    # NOTE: only texts orjson refused or that hold long digit runs get here (few): writing the value as UTF-8 is
    # what finds a lone surrogate in any string or key.
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise RefusedJson("a string holds half a surrogate pair (a \\ud800-\\udfff escape): not Unicode text") from None
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RefusedJson(f"{text[:20]} is not a finite number")
    return value


def canonical(value: Any, *, finite: bool = False) -> bytes:
    """`json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)` as bytes, byte for byte. `finite`:
    the caller knows that `value` holds no NaN or infinity (it came from `loads`), so it is not walked to check."""
    try:
        out = orjson.dumps(value, option=_SORTED)
    except TypeError:
        out = None
    if out is None or not _same_as_json(out) or (not finite and b"null" in out and not _finite(value)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return out


def _same_as_json(out: bytes) -> bool:
    """Whether `json.dumps` would write these bytes too: printable ASCII (orjson escapes control characters but
    not DEL) and no float that either library writes in its own way. Substring tests and a regex that starts
    with a literal: none of them tries a pattern at every byte."""
    if not out.isascii() or b"\x7f" in out or b"0.0000" in out:
        return False
    return _SMALL_FLOAT.search(out) is None


def _finite(value: Any) -> bool:
    """Whether no float in `value` is NaN or infinite (orjson writes those as `null`); walked without recursion."""
    pending = [value]
    while pending:
        current = pending.pop()
        if isinstance(current, float):
            if not math.isfinite(current):
                return False
        elif isinstance(current, dict):
            pending.extend(current.values())
        elif isinstance(current, list | tuple):
            pending.extend(current)
    return True


def dumps(value: Any) -> str:
    """Compact JSON text (UTF-8 kept as is), for values that only travel inside our own records."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
