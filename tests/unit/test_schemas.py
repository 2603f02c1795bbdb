"""The contracts: models validate what they promise, and decoding never crashes a consumer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from schemas import TOPICS, ImageJob, InvalidMessage, JobResult, decode, encode
from schemas.codec import key_of, to_json
from schemas.topics import Topic
from tests.support.samples import JOB, SAMPLES


def _bytes(value: object) -> bytes:
    return encode(value) if isinstance(value, BaseModel) else to_json(value)


def test_every_topic_has_a_sample() -> None:
    assert set(SAMPLES) == set(TOPICS)


@pytest.mark.parametrize("topic_name", sorted(TOPICS))
def test_sample_round_trips_through_the_codec(topic_name: str) -> None:
    sample = SAMPLES[topic_name]
    decoded = decode(topic_name, _bytes(sample))
    if isinstance(sample, BaseModel):
        assert decoded == sample
    else:
        assert decoded.model_dump(exclude_none=True) == sample


def test_key_comes_from_the_registry_key_field() -> None:
    assert key_of(Topic.JOBS_IMAGE, JOB) == b"job-1"
    assert key_of(Topic.JOBS_RETRY, SAMPLES[Topic.JOBS_RETRY]) == b"job-1"


def test_unknown_field_is_rejected_naming_topic_and_field() -> None:
    raw = json.loads(encode(JOB))
    raw["colour"] = "red"
    with pytest.raises(InvalidMessage) as caught:
        decode(Topic.JOBS_IMAGE, json.dumps(raw))
    assert caught.value.topic == Topic.JOBS_IMAGE
    assert caught.value.field == "colour"
    assert caught.value.code == "invalid_message"


def test_newer_schema_version_is_rejected() -> None:
    raw = json.loads(encode(JOB))
    raw["schema_version"] = 99
    with pytest.raises(InvalidMessage, match="newer than this reader supports"):
        decode(Topic.JOBS_IMAGE, json.dumps(raw))


def test_oversize_payload_has_its_own_code() -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode(Topic.JOBS_IMAGE, encode(JOB), max_bytes=10)
    assert caught.value.code == "payload_too_large"


def test_not_json_and_tombstone_are_rejected() -> None:
    with pytest.raises(InvalidMessage, match="not JSON"):
        decode(Topic.JOBS_IMAGE, b"\xff\x00garbage")
    with pytest.raises(InvalidMessage, match="tombstone"):
        decode(Topic.JOBS_IMAGE, None)


def test_job_rules() -> None:
    with pytest.raises(ValidationError, match="needs output_schema"):
        ImageJob(job_id="j", task="extract", images=["s3://b/k"])
    with pytest.raises(ValidationError, match="only for 'extract'"):
        ImageJob(job_id="j", task="detect", images=["s3://b/k"], output_schema={"type": "object"})
    with pytest.raises(ValidationError, match="is not s3://"):
        ImageJob(job_id="j", task="caption", images=["ftp://host/a.png"])
    with pytest.raises(ValidationError, match="time zone"):
        ImageJob(job_id="j", task="caption", images=["s3://b/k"], deadline="2026-01-01T00:00:00")


def test_result_status_matches_payload() -> None:
    with pytest.raises(ValidationError, match="needs output"):
        JobResult(job_id="j", status="ok")
    with pytest.raises(ValidationError, match="needs error"):
        JobResult(job_id="j", status="error")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)


@given(topic_name=st.sampled_from(sorted(TOPICS)), value=json_values)
def test_arbitrary_json_is_decoded_or_rejected_with_invalid_message(topic_name: str, value: object) -> None:
    try:
        decode(topic_name, json.dumps(value))
    except InvalidMessage as exc:
        assert exc.topic == topic_name


@given(topic_name=st.sampled_from(sorted(TOPICS)), raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_decoded_or_rejected_with_invalid_message(topic_name: str, raw: bytes) -> None:
    try:
        decode(topic_name, raw)
    except InvalidMessage as exc:
        assert exc.code == "invalid_message"
