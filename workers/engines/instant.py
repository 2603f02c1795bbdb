"""An engine without a model: it answers every request at once with the smallest instance of its JSON schema.

This is a real engine, not a stand-in for vLLM: the worker-overhead benchmark runs the whole worker loop
(consume, admit, infer, publish, commit) against it to measure everything but the model, and fast tests of the
worker loop use it where the engine's answer does not matter.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from workers.engines.base import EngineOutput, EngineRequest, KvCache

JsonSchema = dict[str, Any]


class InstantEngine:
    """Answers with `minimal_instance(request.json_schema)` (or `{}` without a schema); no model, no tokens.

    Token counts in its outputs are 0 and `num_image_tokens` is None: it has no tokenizer.
    """

    async def start(self) -> None:
        """Nothing to load."""

    def kv_cache(self) -> KvCache | None:
        """No model, no KV cache: nothing for a budget to protect."""
        return None

    async def generate(self, request: EngineRequest) -> EngineOutput:
        """The schema's smallest instance, serialized as the model would emit it."""
        started = time.perf_counter()
        answer = {} if request.json_schema is None else minimal_instance(request.json_schema)
        latency_s = time.perf_counter() - started
        return EngineOutput(
            text=json.dumps(answer),
            parsed_json=answer,
            num_prompt_tokens=0,
            num_completion_tokens=0,
            num_image_tokens=None,
            finish_reason="stop",
            time_to_first_token_s=latency_s,
            latency_s=latency_s,
        )

    async def close(self) -> None:
        """Nothing to release."""


def minimal_instance(schema: JsonSchema, root: JsonSchema | None = None) -> Any:
    """A small value valid against `schema`: required properties only, fewest array items, shortest strings.

    Covers what task schemas (and pydantic's JSON Schema export) use: `$ref` into the root document, `const`,
    `enum`, `anyOf` / `oneOf` (first branch), `allOf` (merged one level deep), `type` (first of a list), `properties` /
    `required`, `items` / `minItems`, `minLength`, `minimum` / `exclusiveMinimum`. `pattern` and `format` are
    not honoured.
    """
    root = schema if root is None else root
    if "$ref" in schema:
        return minimal_instance(_resolve_ref(schema["$ref"], root), root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            return minimal_instance(schema[combinator][0], root)
    if "allOf" in schema:
        rest = {key: value for key, value in schema.items() if key != "allOf"}
        return minimal_instance(_merge([rest, *schema["allOf"]], root), root)

    kind = schema.get("type", "object" if "properties" in schema else "null")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: minimal_instance(properties.get(name, {}), root) for name in schema.get("required", [])}
    if kind == "array":
        return [minimal_instance(schema.get("items", {}), root) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return "x" * schema.get("minLength", 0)
    if kind in ("integer", "number"):
        return _minimal_number(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    return None


def _minimal_number(schema: JsonSchema, *, integer: bool) -> int | float:
    """0, or the lowest value the schema's lower bound allows."""
    low: float
    if "minimum" in schema:
        low = schema["minimum"]
        return math.ceil(low) if integer else low
    if "exclusiveMinimum" in schema:
        low = schema["exclusiveMinimum"]
        return math.floor(low) + 1 if integer else low + 1
    return 0


def _merge(parts: list[JsonSchema], root: JsonSchema) -> JsonSchema:
    """One schema requiring what all `parts` require: properties and required names united, the rest overlaid."""
    merged: JsonSchema = {}
    for part in parts:
        for key, value in (_resolve_ref(part["$ref"], root) if "$ref" in part else part).items():
            if key == "properties":
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required":
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged[key] = value
    return merged


def _resolve_ref(ref: str, root: JsonSchema) -> JsonSchema:
    """The subschema a local `$ref` ("#/$defs/Name") points to."""
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref is supported, not {ref!r}")
    node = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node
