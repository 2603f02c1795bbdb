"""JSON Schema of every topic value, for producers and consumers written in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import TypeAdapter

from schemas.topics import TOPICS


def topic_json_schema(topic_name: str) -> dict[str, object]:
    spec = TOPICS[topic_name]
    schema = TypeAdapter(spec.value_type).json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"urn:vlmflow:topic:{topic_name}"
    schema.setdefault("title", topic_name)
    schema["x-vlmflow-topic"] = {
        "name": spec.name,
        "key": spec.key_field,
        "partitions": spec.partitions,
        "cleanup.policy": spec.cleanup_policy,
    }
    return schema


def export_json_schemas(directory: Path) -> list[Path]:
    """Write `<topic>.schema.json` for every registry topic; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TOPICS:
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(topic_json_schema(name), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
