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
| `regex: R`     | is text in which R is found (Python `re.search`)                       |
| `missing: B`   | is absent, null, blank text or an empty list/object (B true), or not   |
| `less_than: N`, `greater_than: N` | is a number below / above N                         |
| `longer_than: N` | is text or a list longer than N                                      |
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import VlmflowError
from schemas.logs import NormalizedLog

TESTS = ("equals", "in_", "regex", "missing", "less_than", "greater_than", "longer_than")
COMBINATIONS = ("all_", "any_", "not_")


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
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r}: {exc}") from None
        return self

    @cached_property
    def pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.regex) if self.regex is not None else None

    def holds(self, record: dict[str, Any]) -> bool:
        """Whether this condition holds for `record` (a normalized log dumped to JSON types)."""
        if self.all_ is not None:
            return all(condition.holds(record) for condition in self.all_)
        if self.any_ is not None:
            return any(condition.holds(record) for condition in self.any_)
        if self.not_ is not None:
            return not self.not_.holds(record)
        assert self.field is not None
        return self._test(lookup(record, self.field))

    def _test(self, value: Any) -> bool:
        if self.missing is not None:
            return _is_missing(value) == self.missing
        if self.in_ is not None:
            return value in self.in_
        if self.pattern is not None:
            return isinstance(value, str) and self.pattern.search(value) is not None
        if self.less_than is not None:
            return _is_number(value) and value < self.less_than
        if self.greater_than is not None:
            return _is_number(value) and value > self.greater_than
        if self.longer_than is not None:
            return isinstance(value, str | list) and len(value) > self.longer_than
        return bool(value == self.equals)


def lookup(record: Any, path: str) -> Any:
    """The value at a dotted path (list items by index); None where the path leads nowhere."""
    current = record
    for part in path.split("."):
        if isinstance(current, dict):
            current = current.get(part)
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return None
    return current


def _is_missing(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or value == [] or value == {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.\-]*$", max_length=64)]
    description: str = ""
    when: Condition


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule]

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        return self

    def first_match(self, log: NormalizedLog) -> Rule | None:
        """The first rule whose condition holds for `log`, or None when the log passes."""
        record = log.model_dump(mode="json")
        return next((rule for rule in self.rules if rule.when.holds(record)), None)


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
