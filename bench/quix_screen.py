"""The peer of `bench.bench_streams`: a Quix Streams application applying the flywheel's very `screen` per record.

    python bench/quix_screen.py --bootstrap HOST:PORT --group G --count N --normalized T1 --rejected T2

Reads vlm.logs.raw from the start, screens each record (normalize, rules, PII redaction) exactly as the raw-log
stage does, encodes the outcome the same way (`encode_outcome`) and writes it, keyed by log id, to T1 or T2, with
the time it was written as its timestamp (Quix keeps the input's by default; the benchmark measures output
times). Stops after N records. Quix Streams is a bench-only dependency (the `bench` extra in `.venv-bench`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from quixstreams import Application, message_context
from quixstreams.models.serializers import Serializer

from schemas.logs import Lineage, NormalizedLog
from schemas.settings import StreamsSettings
from schemas.topics import Topic
from streams.flywheel.screen import ScreenConfig, encode_outcome, screen
from streams.flywheel.screening import build_name


class EncodedValue(Serializer):
    """The outcome's bytes, as `encode_outcome` made them."""

    def __call__(self, value: Any, ctx: Any) -> bytes:
        return bytes(value[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--normalized", required=True)
    parser.add_argument("--rejected", required=True)
    args = parser.parse_args()
    config = ScreenConfig.from_settings(StreamsSettings())
    print(f"screening: {build_name()}", flush=True)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        auto_create_topics=False,
        loglevel="WARNING",
        producer_extra_config={"linger.ms": 5, "acks": "all"},
    )
    raw = app.topic(Topic.LOGS_RAW.value, key_deserializer="bytes", value_deserializer="bytes")
    outputs = {
        True: app.topic(args.normalized, key_serializer="bytes", value_serializer=EncodedValue()),
        False: app.topic(args.rejected, key_serializer="bytes", value_serializer=EncodedValue()),
    }

    def screened(value: bytes | None) -> tuple[bool, bytes, bytes]:
        context = message_context()
        lineage = Lineage(topic=context.topic, partition=context.partition, offset=context.offset)
        outcome, data = encode_outcome(screen(value, lineage=lineage, config=config), value, config)
        return isinstance(outcome, NormalizedLog), outcome.log_id.encode(), data

    frame = app.dataframe(raw).apply(screened)
    frame = frame.set_timestamp(lambda value, key, timestamp, headers: int(time.time() * 1000))
    frame.to_topic(lambda value, key, timestamp, headers: outputs[value[0]], key=lambda value: value[1])
    app.run(count=args.count, collect=False)


if __name__ == "__main__":
    main()
