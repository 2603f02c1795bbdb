"""InstantEngine answers at once with a value its request's schema accepts; no model, no engine env needed."""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from workers.engines import Engine, EngineRequest, InstantEngine
from workers.engines.instant import minimal_instance


class Refusal(BaseModel):
    code: Literal["unsupported", "unreadable"]
    message: str = Field(min_length=3)


class Box(BaseModel):
    label: str
    xyxy: list[int] = Field(min_length=4, max_length=4)
    confidence: float = Field(gt=0.5)


class Detections(BaseModel):
    boxes: list[Box] = Field(min_length=1)
    count: int = Field(ge=1)
    note: str | None = None
    refusal: Refusal | None = None


SCHEMAS: list[dict[str, Any]] = [
    Detections.model_json_schema(),
    {"anyOf": [Box.model_json_schema(), {"type": "null"}]},
    {
        "type": "object",
        "properties": {"kind": {"const": "invoice"}, "total": {"type": ["number", "null"]}},
        "required": ["kind", "total"],
    },
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2},
    {
        "allOf": [
            {"$ref": "#/$defs/named"},
            {"required": ["size"], "properties": {"size": {"type": "integer", "exclusiveMinimum": 7}}},
        ],
        "$defs": {"named": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
    },
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_minimal_instance_is_valid(schema: dict[str, Any]) -> None:
    jsonschema.validate(minimal_instance(schema), schema)


async def test_instant_engine_answers_with_schema_valid_json() -> None:
    engine: Engine = InstantEngine()
    await engine.start()
    schema = Detections.model_json_schema()

    output = await engine.generate(EngineRequest(prompt="Find the boxes.", json_schema=schema))
    await engine.close()

    assert json.loads(output.text) == output.parsed_json
    jsonschema.validate(output.parsed_json, schema)
    assert output.finish_reason == "stop"
    assert output.num_image_tokens is None
