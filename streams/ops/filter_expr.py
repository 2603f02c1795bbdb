"""Filter expressions over JSON record values, as ops people type them on a command line.

    status=error
    tenant in (acme, globex) and not error.code=engine_error
    latency_ms>=500 or (model~"^qwen2" and attempt!=0)

Grammar (keywords are case-insensitive; `and` binds tighter than `or`):

    expr       := conj ('or' conj)*
    conj       := neg ('and' neg)*
    neg        := 'not' neg | '(' expr ')' | comparison
    comparison := FIELD OP VALUE | FIELD ['not'] 'in' '(' VALUE (',' VALUE)* ')'
    OP         := '=' | '==' | '!=' | '<' | '<=' | '>' | '>=' | '~'   (~ is a regular-expression search, RE2)
    FIELD      := a dotted path into the value, e.g. error.code or images.0 (a list index)
    VALUE      := a bare word, or a quoted string ('...' or "...", backslash escapes)

A value is compared with what the field holds: numbers numerically, `true`/`false` with booleans, `null` with
null, strings as text; against a list, a comparison holds when it holds for any element. A missing field, or a
value of another type, makes `=`, `in`, ordering and `~` false; `!=` and `not in` are their exact negations.

Bounds, since filters and records both come from outside: a filter holds at most `MAX_TERMS` comparisons, nests
`not` and parentheses at most `MAX_NESTING` deep, and its regular expressions run on RE2 (`google-re2`), in time
linear in the text searched; a construct RE2 cannot run in linear time (backreferences, lookaround) is refused
at parse time with one line. Evaluation walks nested lists without recursion and reads integers of any length, so
`matches` holds or fails for every JSON document and never raises. A record value that is no JSON document
(`document_of`: not UTF-8 JSON, nested past the decoder's recursion limit, an integer over Python's digit limit)
raises `UnreadableRecord`, which a replay counts and skips.
"""

from __future__ import annotations

import json
import math
import operator
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, get_args

import re2

from schemas.errors import VlmflowError

CompareOp = Literal["=", "!=", "<", "<=", ">", ">=", "~"]
COMPARE_OPS: tuple[CompareOp, ...] = get_args(CompareOp)
KEYWORDS = ("and", "or", "not", "in")
EXAMPLE = "status=error and tenant in (acme,globex)"
MAX_TERMS = 64
"""Comparisons in one filter; it bounds the syntax tree's depth, and so evaluation's."""
MAX_NESTING = 32
"""`not`s and parentheses open at once."""
MAX_LIST_INDEX_DIGITS = 9
"""A longer dotted part is a key, never a list index (no list is that long)."""

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")
_WORD = re.compile(r"[^\s()=!<>~,'\"\\]+")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")
_TOKEN_OPS = ("==", "!=", "<=", ">=", "=", "<", ">", "~")
_ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_MISSING = object()
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # NOTE: the refusal is the FilterError's one line, not a log on stderr as well


class FilterError(VlmflowError, ValueError):
    """A filter expression that does not parse; the message says where and what was expected."""


class UnreadableRecord(VlmflowError, ValueError):
    """A record value that is no JSON document a filter can read; the message says why."""


@dataclass(frozen=True)
class Compare:
    field: str
    op: CompareOp
    value: str


@dataclass(frozen=True)
class InSet:
    field: str
    values: tuple[str, ...]
    negated: bool = False


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class And:
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Or:
    left: Expr
    right: Expr


Expr = Compare | InSet | Not | And | Or


# -- parsing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: Literal["word", "string", "op", "(", ")", ",", "end"]
    text: str
    column: int
    """1-based, for error messages."""

    def is_keyword(self, keyword: str) -> bool:
        return self.kind == "word" and self.text.lower() == keyword


def _tokens(text: str) -> Iterator[_Token]:
    position = 0
    while position < len(text):
        char = text[position]
        if char.isspace():
            position += 1
        elif char in "(),":
            yield _Token(char, char, position + 1)  # type: ignore[arg-type]
            position += 1
        elif char in "'\"":
            yield _quoted(text, position)
            position += len(_quoted_source(text, position))
        elif op := next((op for op in _TOKEN_OPS if text.startswith(op, position)), None):
            yield _Token("op", "=" if op == "==" else op, position + 1)
            position += len(op)
        else:
            match = _WORD.match(text, position)
            if not match:
                raise _error(text, position + 1, f"unexpected {char!r}")
            yield _Token("word", match.group(), position + 1)
            position = match.end()
    yield _Token("end", "", len(text) + 1)


def _quoted_source(text: str, start: int) -> str:
    quote, position = text[start], start + 1
    while position < len(text):
        if text[position] == "\\":
            position += 2
        elif text[position] == quote:
            return text[start : position + 1]
        else:
            position += 1
    raise _error(text, start + 1, "unterminated quoted string")


def _quoted(text: str, start: int) -> _Token:
    body = _quoted_source(text, start)[1:-1]
    return _Token("string", re.sub(r"\\(.)", r"\1", body, flags=re.DOTALL), start + 1)


def _error(text: str, column: int, reason: str) -> FilterError:
    return FilterError(f"cannot parse filter {text!r}: {reason} at column {column} (e.g. {EXAMPLE!r})")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = list(_tokens(text))
        self.index = 0
        self.terms = 0
        self.nesting = 0

    @property
    def current(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.current
        self.index += 1
        return token

    def fail(self, expected: str) -> FilterError:
        found = "the end" if self.current.kind == "end" else repr(self.current.text)
        return _error(self.text, self.current.column, f"expected {expected}, found {found}")

    def expect(self, kind: str, expected: str) -> _Token:
        if self.current.kind != kind:
            raise self.fail(expected)
        return self.advance()

    def expression(self) -> Expr:
        result = self.conjunction()
        while self.current.is_keyword("or"):
            self.advance()
            result = Or(result, self.conjunction())
        return result

    def conjunction(self) -> Expr:
        result = self.negation()
        while self.current.is_keyword("and"):
            self.advance()
            result = And(result, self.negation())
        return result

    def negation(self) -> Expr:
        if self.current.is_keyword("not") or self.current.kind == "(":
            if self.nesting == MAX_NESTING:
                raise _error(self.text, self.current.column, f"more than {MAX_NESTING} nested 'not's and '('s")
            self.nesting += 1
            if self.advance().kind == "(":
                result = self.expression()
                self.expect(")", "')'")
            else:
                result = Not(self.negation())
            self.nesting -= 1
            return result
        return self.comparison()

    def comparison(self) -> Expr:
        token = self.current
        if self.terms == MAX_TERMS:
            raise _error(self.text, token.column, f"more than {MAX_TERMS} comparisons")
        self.terms += 1
        if token.kind != "word" or token.text.lower() in KEYWORDS or not _FIELD.match(token.text):
            raise self.fail("a field name (e.g. status or error.code)")
        field = self.advance().text
        if self.current.kind == "op":
            op = self.advance().text
            value_column = self.current.column
            value = self.value()
            if op == "~":
                _check_regex(self.text, value, value_column)
            return Compare(field, op, value)  # type: ignore[arg-type]
        negated = self.current.is_keyword("not")
        if negated:
            self.advance()
        if not self.current.is_keyword("in"):
            raise self.fail("'in'" if negated else f"an operator ({', '.join(COMPARE_OPS)}) or 'in'")
        self.advance()
        self.expect("(", "'(' after 'in'")
        values = [self.value()]
        while self.current.kind == ",":
            self.advance()
            values.append(self.value())
        self.expect(")", "',' or ')'")
        return InSet(field, tuple(values), negated)

    def value(self) -> str:
        token = self.current
        if token.kind == "string" or (token.kind == "word" and token.text.lower() not in KEYWORDS):
            return self.advance().text
        raise self.fail("a value (quote it if it is a keyword or holds spaces)")


def _check_regex(text: str, pattern: str, column: int) -> None:
    try:
        _regex(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise _error(
            text, column, f"bad regular expression {pattern!r} for RE2, which runs in linear time ({reason})"
        ) from None


def parse(text: str) -> Expr:
    """The expression in `text`; `FilterError` naming the column otherwise."""
    parser = _Parser(text)
    if parser.current.kind == "end":
        raise _error(text, 1, "empty filter")
    expression = parser.expression()
    if parser.current.kind != "end":
        raise parser.fail("'and', 'or' or the end")
    return expression


# -- rendering (for summaries and checkpoints; parse(render(e)) == e) ----------------------------------------


def render(expression: Expr) -> str:
    match expression:
        case Compare(field, op, value):
            return f"{field}{op}{_literal(value)}"
        case InSet(field, values, negated):
            return f"{field} {'not in' if negated else 'in'} ({','.join(_literal(value) for value in values)})"
        case Not(operand):
            return f"not {_operand(operand, 3)}"
        case And(left, right):
            return f"{_operand(left, 2)} and {_operand(right, 3)}"
        case Or(left, right):
            return f"{_operand(left, 1)} or {_operand(right, 2)}"


def _binding(expression: Expr) -> int:
    """How tightly an expression holds together: `or` 1, `and` 2, anything else 3."""
    return 1 if isinstance(expression, Or) else 2 if isinstance(expression, And) else 3


def _operand(expression: Expr, binding: int) -> str:
    """`expression` as an operand that must bind at least this tightly (left-associative operators)."""
    return render(expression) if _binding(expression) >= binding else f"({render(expression)})"


def _literal(value: str) -> str:
    if _WORD.fullmatch(value) and value.lower() not in KEYWORDS:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- evaluation ----------------------------------------------------------------------------------------------


def matches(expression: Expr, document: Any) -> bool:
    """Whether a decoded JSON value satisfies the expression."""
    match expression:
        case Compare(field, "!=", value):
            return not _equal(_lookup(document, field), value)
        case Compare(field, "=", value):
            return _equal(_lookup(document, field), value)
        case Compare(field, "~", value):
            return _search(_lookup(document, field), value)
        case Compare(field, op, value):
            return _ordered(_lookup(document, field), op, value)
        case InSet(field, values, negated):
            found = _lookup(document, field)
            return any(_equal(found, value) for value in values) != negated
        case Not(operand):
            return not matches(operand, document)
        case And(left, right):
            return matches(left, document) and matches(right, document)
        case Or(left, right):
            return matches(left, document) or matches(right, document)


def document_of(value: bytes | None) -> Any:
    """A record value as the JSON document a filter reads (None for a tombstone); `UnreadableRecord` otherwise."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except RecursionError:
        raise UnreadableRecord("nested too deeply for the JSON decoder") from None
    except UnicodeDecodeError:
        raise UnreadableRecord("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UnreadableRecord(f"not JSON ({exc.msg} at character {exc.pos})") from None
    except ValueError as exc:
        raise UnreadableRecord(f"not a JSON document Python reads ({str(exc)[:120]})") from None


def _lookup(document: Any, field: str) -> Any:
    current = document
    for part in field.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif _is_index(part) and isinstance(current, list) and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


def _is_index(part: str) -> bool:
    return part.isascii() and part.isdigit() and len(part) <= MAX_LIST_INDEX_DIGITS


def _leaves(found: Any) -> Iterator[Any]:
    """`found`, or the items of a list of (lists of) values in order, walked without recursion."""
    stack = [iter([found])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


@lru_cache(maxsize=256)
def _number(text: str) -> int | float | None:
    """The number `text` spells; an integer beyond Python's digit limit is beyond any integer JSON decoding gives,
    so only its sign matters for comparing with one: it becomes an infinity."""
    if not _NUMBER.match(text):
        return None
    if any(mark in text for mark in ".eE"):
        return float(text)
    negative = text.startswith("-")
    digits = text.removeprefix("-").lstrip("0") or "0"
    limit = sys.get_int_max_str_digits()
    if limit and len(digits) > limit:
        return -math.inf if negative else math.inf
    return -int(digits) if negative else int(digits)


def _equal(found: Any, value: str) -> bool:
    return any(_equal_one(item, value) for item in _leaves(found))


def _equal_one(found: Any, value: str) -> bool:
    if isinstance(found, bool):
        return value.lower() == ("true" if found else "false")
    if found is None:
        return value == "null"
    if isinstance(found, int | float):
        number = _number(value)
        return number is not None and found == number
    return isinstance(found, str) and found == value


def _ordered(found: Any, op: CompareOp, value: str) -> bool:
    return any(_ordered_one(item, op, value) for item in _leaves(found))


def _ordered_one(found: Any, op: CompareOp, value: str) -> bool:
    if isinstance(found, bool):
        return False
    if isinstance(found, int | float):
        number = _number(value)
        return number is not None and _ORDER[op](found, number)
    return isinstance(found, str) and _ORDER[op](found, value)


@lru_cache(maxsize=64)
def _regex(pattern: str) -> re2._Regexp:
    return re2.compile(pattern, _RE2_OPTIONS)


def _search(found: Any, pattern: str) -> bool:
    regex = _regex(pattern)
    return any(isinstance(item, str) and regex.search(item) is not None for item in _leaves(found))
