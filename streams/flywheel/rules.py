"""Declarative filter rules (YAML): each rule has a name and a condition over the normalized log; the first rule
whose condition holds rejects the log, and the rejection names it.

    rules:
      - name: test-traffic
        description: load tests and synthetic probes are not user traffic
        when: {field: tenant, regex: "^(test|loadtest)-"}
      - name: implausible-latency
        when:
          any:
            - {field: latency_ms, less_than: 0}
            - {field: latency_ms, greater_than: 600000}

A condition is either one test of a field (a dotted path into the normalized log, list items by index, e.g.
`images.0.width`) or a combination: `all: [...]`, `any: [...]`, `not: {...}`. Tests:

| test           | holds when the field                                                   |
| -------------- | ---------------------------------------------------------------------- |
| `equals: V`    | equals V (a missing field is null)                                     |
| `in: [V, ...]` | equals one of the values                                               |
| `regex: R`     | is text in which R is found (RE2 syntax, searched in linear time)      |
| `missing: B`   | is absent, null, blank text or an empty list/object (B true), or not   |
| `less_than: N`, `greater_than: N` | is a number below / above N                         |
| `longer_than: N` | is text or a list longer than N                                      |

Regexes come from operators' files and run over hostile text, so they are evaluated by RE2 (`google-re2`), whose
time is linear in the text whatever the pattern: a pattern RE2 cannot run (backreferences, lookaround, possessive
or over-large repeats) is refused when the file is loaded, with one line naming the rule. RE2 differs from Python's
`re` in what it refuses and in its digit, word, space and boundary classes, which are ASCII only.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import cached_property, lru_cache, reduce
from importlib import resources
from math import isfinite
from pathlib import Path
from typing import Annotated, Any, Self

import re2
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from schemas.errors import VlmflowError
from schemas.logs import NormalizedLog

TESTS = ("equals", "in_", "regex", "missing", "less_than", "greater_than", "longer_than")
COMBINATIONS = ("all_", "any_", "not_")
CACHED_TEXT_CHARS = 256
"""Texts up to this length have their match remembered per pattern (tenants, models and tasks repeat; the RE2
binding costs several µs a call)."""
CACHED_TEXTS = 4096


class RulesError(VlmflowError):
    """A rules file that cannot be read; the message names the file and the rule."""


class Condition(BaseModel):
    """One field test, or `all` / `any` / `not` of conditions (exactly one of them per condition)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, ignored_types=(cached_property,))

    field: str | None = None
    equals: Any = None
    in_: Annotated[list[Any] | None, Field(alias="in")] = None
    regex: str | None = None
    missing: bool | None = None
    less_than: float | None = None
    greater_than: float | None = None
    longer_than: Annotated[int, Field(ge=0)] | None = None
    all_: Annotated[list[Condition] | None, Field(alias="all", min_length=1)] = None
    any_: Annotated[list[Condition] | None, Field(alias="any", min_length=1)] = None
    not_: Annotated[Condition | None, Field(alias="not")] = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        given = [name for name in (*TESTS, *COMBINATIONS) if name in self.model_fields_set]
        if len(given) != 1:
            names = ", ".join(name.rstrip("_") for name in given) or "none"
            raise ValueError(f"a condition needs exactly one test or combination, got: {names}")
        if (given[0] in TESTS) != (self.field is not None):
            raise ValueError("a test needs `field`; all/any/not take none")
        if self.regex is not None:
            LinearPattern(self.regex)
        return self

    @cached_property
    def pattern(self) -> LinearPattern | None:
        return LinearPattern(self.regex) if self.regex is not None else None

    def holds(self, record: Any) -> bool:
        """Whether this condition holds for `record`: a normalized log, or the same dumped to JSON types."""
        return self.predicate(record.__dict__ if isinstance(record, BaseModel) else record)

    @cached_property
    def predicate(self) -> Predicate:
        """This condition as one closure over a log's fields, built once: evaluating it makes no attribute or `None`
        checks and creates no generators (`all`/`any` are chained `and`/`or`); a field test reads its field itself,
        the path split once."""
        if self.all_ is not None:
            return reduce(_both, [condition.predicate for condition in self.all_])
        if self.any_ is not None:
            return reduce(_either, [condition.predicate for condition in self.any_])
        if self.not_ is not None:
            inner = self.not_.predicate
            return lambda fields: not inner(fields)
        assert self.field is not None
        read = _reader(self.field)
        if self.missing is not None:
            return _missing(read, self.missing)
        if self.in_ is not None:
            values = self.in_
            return lambda fields: (value if type(value := read(fields)) in _PLAIN else _json_form(value)) in values
        if self.pattern is not None:
            found_in = self.pattern.found_in
            return lambda fields: isinstance(value := read(fields), str) and found_in(value)
        if self.less_than is not None:
            return _beyond(read, operator.lt, self.less_than)
        if self.greater_than is not None:
            return _beyond(read, operator.gt, self.greater_than)
        if self.longer_than is not None:
            length = self.longer_than
            return lambda fields: isinstance(value := read(fields), str | list) and len(value) > length
        expected = self.equals
        return lambda fields: (value if type(value := read(fields)) in _PLAIN else _json_form(value)) == expected


Fields = dict[str, Any]
"""A normalized log's fields by name: its `__dict__` (where a pydantic model keeps exactly its fields, all of them),
or the log dumped (`model_dump`, every field)."""
Predicate = Callable[[Fields], bool]


def _beyond(read: Callable[[Fields], Any], compare: Callable[[Any, float], bool], bound: float) -> Predicate:
    """`_is_number(value) and compare(value, bound)`, with no call of a Python function for a float (most values)."""
    # NOTE: for a float `_is_number` is `isfinite`, which then runs only when the comparison holds (seldom: most
    # values are in bounds); other types take the general test.
    return lambda fields: (
        (compare(value, bound) and isfinite(value))
        if type(value := read(fields)) is float
        else (_is_number(value) and compare(value, bound))
    )


def _both(first: Predicate, second: Predicate) -> Predicate:
    return lambda fields: first(fields) and second(fields)


def _either(first: Predicate, second: Predicate) -> Predicate:
    return lambda fields: first(fields) or second(fields)


_JSON_FORM: TypeAdapter[Any] = TypeAdapter(Any)
_PLAIN = (str, int, float, bool, type(None))
"""Types whose JSON form is the value itself (`type()` makes the test exact)."""


def _json_form(value: Any) -> Any:
    """What `model_dump(mode="json")` makes of a value read from a log: times as ISO text, models as objects. Values
    of a `_PLAIN` type are their own JSON form: callers test that first (inline, as most values are plain)."""
    return _JSON_FORM.dump_python(value, mode="json")


class LinearPattern:
    """A regex searched by RE2 (time linear in the text); `ValueError` naming the pattern when RE2 refuses it."""

    def __init__(self, regex: str):
        options = re2.Options()
        options.never_capture = True
        options.log_errors = False
        try:
            self._compiled = re2.compile(regex, options)
        except re2.error as exc:
            reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            raise ValueError(f"regex {regex!r}: RE2 (linear time) cannot run it: {reason}") from None
        self._found_in_short = lru_cache(maxsize=CACHED_TEXTS)(self._search)

    def _search(self, text: str) -> bool:
        return self._compiled.search(text) is not None

    def found_in(self, text: str) -> bool:
        return self._found_in_short(text) if len(text) <= CACHED_TEXT_CHARS else self._search(text)


def lookup(record: Any, path: str) -> Any:
    """The value at a dotted path (list items by index, model fields by name); None where the path leads nowhere."""
    return _lookup(record, path.split("."))


def _reader(path: str) -> Callable[[Fields], Any]:
    """`lookup` at `path` over a log's fields, as one callable built once."""
    parts = path.split(".")
    if len(parts) > 1:
        return lambda fields: _lookup(fields, parts)
    # NOTE: a field of the log itself (most rules) is read by `itemgetter`, one C call: every log's fields hold
    # every field of `NormalizedLog`, so only a name that is none of them needs the `None` of a path leading nowhere.
    if path in NormalizedLog.model_fields:
        return operator.itemgetter(path)
    return lambda fields: None


def _lookup(record: Any, parts: list[str]) -> Any:
    current = record
    for part in parts:
        if isinstance(current, BaseModel):
            current = getattr(current, part) if part in type(current).__pydantic_fields__ else None
        elif isinstance(current, dict):
            current = current.get(part)
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return None
    return current


def _missing(read: Callable[[Fields], Any], missing: bool) -> Predicate:
    """Whether the field is absent, null, blank text or an empty list/object (`missing` true), or not: one call per
    test, the commonest kinds of value first. Text is blank when `strip()` leaves nothing, which `isspace` tells
    without copying it (it stops at the first other character)."""

    def holds(fields: Fields) -> bool:
        value = read(fields)
        if value is None:
            return missing
        if isinstance(value, str):
            return (not value or value.isspace()) == missing
        if type(value) in _CONTAINERS:
            return (not value) == missing
        return (value == [] or value == {}) == missing

    return holds


_CONTAINERS = (list, dict)


def _is_number(value: Any) -> bool:
    """A finite number. Every int is one, whatever its size (`isfinite` would raise for one beyond a float's
    range, and Python compares such ints with a float bound exactly)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and isfinite(value))


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.\-]*$", max_length=64)]
    description: str = ""
    when: Condition


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))

    rules: list[Rule]

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        return self

    def first_match(self, log: NormalizedLog) -> Rule | None:
        """The first rule whose condition holds for `log`, or None when the log passes. Fields are read from the
        model's `__dict__` as the rules need them (no dump of the whole log, no attribute lookups)."""
        fields = log.__dict__
        for rule, holds in self._predicates:
            if holds(fields):
                return rule
        return None

    @cached_property
    def _predicates(self) -> list[tuple[Rule, Predicate]]:
        return [(rule, rule.when.predicate) for rule in self.rules]


def parse_rules(text: str, source: str) -> RuleSet:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"rules {source}: not YAML: {exc}".splitlines()[0]) from None
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _where(data, first["loc"])
        raise RulesError(f"rules {source}: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def _where(data: Any, loc: tuple[int | str, ...]) -> str:
    """`rule 'name' when.any.0` for a location inside a rule; the bare location otherwise."""
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = data.get("rules") if isinstance(data, dict) else None
        rule = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
        name = rule.get("name") if isinstance(rule, dict) else None
        rest = ".".join(str(part) for part in loc[2:])
        return f"rule {name or '#' + str(loc[1] + 1)!r}{' ' + rest if rest else ''}"
    return ".".join(str(part) for part in loc) or "the file"


def load_rules(path: Path | None) -> RuleSet:
    """The rules in `path`, or the built-in defaults (`streams/flywheel/default_rules.yaml`) when None."""
    if path is None:
        return parse_rules(resources.files("streams.flywheel").joinpath("default_rules.yaml").read_text(), "(built-in)")
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesError(f"rules {path}: {exc.strerror}") from None
    return parse_rules(text, str(path))
