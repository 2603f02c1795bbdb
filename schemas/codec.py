"""Bytes on a topic to models and back. A decode error names the topic and the field, and never crashes a consumer."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas.errors import InvalidMessage, first_error
from schemas.topics import topic


@cache
def _adapter(value_type: Any) -> TypeAdapter[Any]:
    return TypeAdapter(value_type)


def decode(topic_name: str, raw: bytes | str | None, *, max_bytes: int | None = None) -> Any:
    """Validate one record value against its topic's model; raise `InvalidMessage` with a reason otherwise."""
    spec = topic(topic_name)
    if raw is None:
        raise InvalidMessage(topic_name, "empty value (tombstone)")
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidMessage(topic_name, f"{len(raw)} bytes, limit {max_bytes}", code="payload_too_large")
    try:
        return _adapter(spec.value_type).validate_json(raw)
    except ValidationError as exc:
        where, message = first_error(exc, top="")
        if exc.errors()[0]["type"] == "json_invalid":
            raise InvalidMessage(topic_name, f"not JSON: {message}") from None
        raise InvalidMessage(topic_name, message, field=where or None) from None


def encode(value: BaseModel) -> bytes:
    return value.model_dump_json(exclude_none=False).encode()


def key_of(topic_name: str, value: BaseModel) -> bytes:
    """The record key of `value` on `topic_name`, read from the registry's key field (dotted paths allowed)."""
    current: Any = value
    for part in topic(topic_name).key_field.split("."):
        current = getattr(current, part)
    return str(current).encode()


def to_json(value: Any) -> bytes:
    """Plain JSON for values that are not models (source logs written by other systems, test fixtures)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
