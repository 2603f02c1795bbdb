"""Exported JSON Schemas accept what the models accept and reject what they reject."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel

from schemas import TOPICS
from schemas.export import export_json_schemas
from schemas.topics import Topic
from tests.support.samples import SAMPLES


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    directory: Path = tmp_path_factory.mktemp("schemas")
    paths = export_json_schemas(directory)
    assert len(paths) == len(TOPICS)
    return {path.name.removesuffix(".schema.json"): json.loads(path.read_text()) for path in paths}


def _as_json(sample: object) -> object:
    return json.loads(sample.model_dump_json()) if isinstance(sample, BaseModel) else sample


@pytest.mark.parametrize("topic_name", sorted(TOPICS))
def test_schema_is_valid_and_accepts_the_sample(exported: dict[str, dict], topic_name: str) -> None:
    schema = exported[topic_name]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_as_json(SAMPLES[topic_name]), schema, cls=jsonschema.Draft202012Validator)
    assert schema["x-vlmflow-topic"]["name"] == topic_name


@pytest.mark.parametrize(
    ("topic_name", "mutate"),
    [
        (Topic.JOBS_IMAGE, lambda v: v.pop("job_id")),
        (Topic.JOBS_IMAGE, lambda v: v.update(task="paint")),
        (Topic.JOBS_IMAGE, lambda v: v.update(images="s3://b/k")),
        (Topic.JOBS_IMAGE, lambda v: v.update(unexpected=1)),
        (Topic.JOBS_RESULT, lambda v: v.update(status="maybe")),
        (Topic.JOBS_RESULT, lambda v: v.update(vision_tokens=-1)),
        (Topic.LOGS_NORMALIZED, lambda v: v.update(feedback="meh")),
        (Topic.CASES_HARD, lambda v: v.update(priority="high")),
        (Topic.GOLDEN, lambda v: v.update(version=0)),
    ],
)
def test_schema_rejects_invalid_values(exported: dict[str, dict], topic_name: str, mutate) -> None:
    value = _as_json(SAMPLES[topic_name])
    mutate(value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value, exported[topic_name], cls=jsonschema.Draft202012Validator)


def test_cli_exports_one_schema_per_topic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlmflow.cli import main

    assert main(["schemas", "export", str(tmp_path / "out")]) == 0
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == sorted(f"{name}.schema.json" for name in TOPICS)
    assert capsys.readouterr().out.count(".schema.json") == len(TOPICS)
