"""The three servers of the stack, over real connections: the broker, the S3 store and Redis."""

from __future__ import annotations

import io
import time
import uuid

import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from schemas import JobResult, Settings, decode, encode
from schemas.codec import key_of
from schemas.connections import object_store
from schemas.topics import Topic


def test_validated_message_round_trips_through_the_broker_with_key_and_headers(settings: Settings) -> None:
    result = JobResult(job_id="job-42", status="ok", task="caption", output={"caption": "a red button"})
    producer = KafkaProducer(**settings.kafka.client_options())
    sent = producer.send(
        Topic.JOBS_RESULT,
        key=key_of(Topic.JOBS_RESULT, result),
        value=encode(result),
        headers=[("reply-to", b"team.results"), ("trace-id", b"abc")],
    ).get(timeout=10)
    producer.close()

    consumer = KafkaConsumer(**settings.kafka.client_options(), enable_auto_commit=False)
    partition = TopicPartition(Topic.JOBS_RESULT, sent.partition)
    consumer.assign([partition])
    consumer.seek(partition, sent.offset)
    records = []
    deadline = time.monotonic() + 15
    while not records and time.monotonic() < deadline:
        records = consumer.poll(timeout_ms=500).get(partition, [])
    consumer.close()

    record = records[0]
    assert record.key == b"job-42"
    assert dict(record.headers) == {"reply-to": b"team.results", "trace-id": b"abc"}
    assert decode(Topic.JOBS_RESULT, record.value) == result


def test_object_round_trips_through_the_s3_store(stack_settings: Settings) -> None:
    client = object_store(stack_settings)
    bucket = stack_settings.s3.image_buckets[0]
    key = f"tests/{uuid.uuid4().hex}.bin"
    payload = bytes(range(256)) * 1000
    client.put_object(bucket, key, io.BytesIO(payload), len(payload), content_type="application/octet-stream")
    response = client.get_object(bucket, key)
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()
    assert client.stat_object(bucket, key).size == len(payload)


def test_redis_answers_a_lua_script_with_server_time(stack_settings: Settings) -> None:
    client = redis.Redis.from_url(stack_settings.redis.url)
    script = client.register_script(
        "local now = redis.call('TIME'); redis.call('SET', KEYS[1], ARGV[1]); "
        "return {redis.call('GET', KEYS[1]), tonumber(now[1])}"
    )
    value, server_seconds = script(keys=[f"test:{{lua}}:{uuid.uuid4().hex}"], args=["hello"])
    client.close()
    assert value == b"hello"
    assert abs(server_seconds - time.time()) < 60
