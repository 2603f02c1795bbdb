"""Generated hostile jobs for the worker's fuzz test: records for `vlm.jobs.image` whose key is always a job id
(so each must end as one result) and whose value is anything a careless or malicious producer could send.

What varies: the record itself (bytes that are no JSON, JSON that is no job, nesting past the parser, a record over
the size limit), the job's fields (unknown task, too many images, long prompt, bad reply_to, past deadline), the
`output_schema` of `extract` jobs (chains and cycles of `$ref`, definitions that double per level, non-local and
broken references, catastrophic and unsupported regular expressions, size and depth at and past the limits), the
image URIs (path tricks, foreign buckets, user info, unreachable and forbidden hosts, broken base64, a
decompression bomb, a truncated PNG, absurdly long URIs), and the engine's answer (`HostileAnswers`: too deep to
encode, no object, cut off, huge, NaN, an engine that raises).
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from schemas.tasks import MAX_OUTPUT_SCHEMA_BYTES
from schemas.topics import Topic
from vlmflow.job_mix import UNREACHABLE_HOST, png_bomb
from workers.engines.base import EngineOutput, EngineRequest
from workers.engines.instant import InstantEngine

ANSWER_MARKER = "hostile-answer:"
"""A job prompt containing this and a kind from `HOSTILE_ANSWERS` gets that answer from `HostileAnswers`."""
HOSTILE_ANSWERS = ("deep", "array", "cut_off", "huge", "nan", "raises", "huge_key", "none_text")


@dataclass(frozen=True)
class HostileRecord:
    key: bytes
    """Always a valid job id: the record must be answered."""
    value: bytes
    kind: str
    """What is hostile about it (for the test's report)."""


def _png(rng: random.Random, size: tuple[int, int] = (48, 32)) -> bytes:
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _chain(hops: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(hops)}
    defs[f"d{hops}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "required": ["x"], "$defs": defs}


def _doubling(levels: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(levels)}
    defs[f"d{levels}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "required": ["x"], "$defs": defs}


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _pattern(pattern: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}, "required": ["x"]}


SCHEMAS: dict[str, Callable[[random.Random], Any]] = {
    "chain": lambda rng: _chain(rng.choice([1, 10, 63, 64, 65, 200, 500])),
    "cycle": lambda _: {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
    "self_root": lambda _: {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]},
    "doubling": lambda rng: _doubling(rng.choice([3, 12, 20, 40])),
    "remote_ref": lambda _: {"properties": {"x": {"$ref": "http://169.254.169.254/latest"}}, "required": ["x"]},
    "broken_ref": lambda rng: {"properties": {"x": {"$ref": rng.choice(["#/nope", "#/$defs/", "#/0/1", "#%zz"])}}},
    "nested_id": lambda _: {"properties": {"x": {"$id": "urn:x", "$defs": {"y": {}}, "$ref": "#/$defs/y"}}},
    "catastrophic": lambda rng: _pattern(rng.choice(["^([A-Za-z ]+)*$", "^(a+)+$", "(x+x+)+y", "^(\\w+\\s?)*$"])),
    "unsupported_re": lambda rng: _pattern(rng.choice(["(a)\\1", "(?=a)", "(?<!b)c", "("])),
    "pattern_props": lambda _: {"patternProperties": {"^(a|aa)+$": {"type": "string"}}, "additionalProperties": False},
    "unevaluated": lambda _: {"patternProperties": {"^a": {}}, "unevaluatedProperties": False},
    "deep": lambda rng: _nested(rng.choice([5, 7, 8, 30, 60])),
    "too_large": lambda _: {"type": "object", "description": "x" * (MAX_OUTPUT_SCHEMA_BYTES + 10)},
    "not_a_schema": lambda rng: rng.choice([{"type": 7}, {"type": "nope"}, {"required": "x"}, {"minLength": -1}]),
    "not_an_object": lambda rng: rng.choice([[], "schema", 5, None, True]),
    "reserved_defs": lambda _: {"$ref": "#/$defs/RefusalAnswer", "$defs": {"RefusalAnswer": {"type": "string"}}},
    "big_enum": lambda rng: {"type": "object", "properties": {"x": {"enum": list(range(5_000))}}, "required": ["x"]},
    "long_string": lambda rng: {"properties": {"x": {"type": "string", "minLength": rng.choice([1, 4_000, 60_000])}}},
    "many_items": lambda _: {"properties": {"x": {"type": "array", "items": {"type": "object"}, "minItems": 3_000}}},
    "plain": lambda _: {"type": "object", "properties": {"x": {"type": "number"}}},
}

URIS: dict[str, Callable[[random.Random], str]] = {
    "traversal": lambda rng: rng.choice(
        ["s3://vlm-images/../x.png", "s3://vlm-images/a/./b.png", "s3://vlm-images//x"]
    ),
    "foreign_bucket": lambda _: "s3://not-an-image-bucket/a.png",
    "missing_object": lambda _: f"s3://vlm-images/fuzz/{uuid.uuid4().hex}.png",
    "user_info": lambda _: "http://10.0.0.1:80\\@127.0.0.1:1/x.png",
    "forbidden_host": lambda rng: rng.choice(["http://169.254.169.254/latest", "https://evil.example/a.png"]),
    "unreachable": lambda _: f"http://{UNREACHABLE_HOST}/image.png",
    "bad_base64": lambda _: "data:image/png;base64,@@@not-base64@@@",
    "not_an_image": lambda _: _data_uri(b"plain text, no image " * 10),
    "bomb": lambda _: _data_uri(png_bomb(20_000, 20_000)),
    "truncated": lambda rng: _data_uri(_png(rng)[:60]),
    "long_uri": lambda _: "https://unlisted.example/" + "a" * 100_000,
    "unicode": lambda _: "s3://vlm-images/ünïcødé\u202e.png",
    "thin": lambda rng: _data_uri(_png(rng, (4_000, 10))),
    "no_scheme": lambda _: "file:///etc/passwd",
}


def _raw(rng: random.Random, max_bytes: int) -> bytes:
    """A value that is no job at all."""
    return rng.choice(
        [
            rng.randbytes(rng.randrange(0, 200)),
            b"",
            b"null",
            b"[1, 2, 3]",
            b'{"job_id": ',
            b"[" * 100_000,
            b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
            b'"' + b"x" * (max_bytes + 10) + b'"',
            json.dumps({"job_id": "x", "task": "caption"}).encode(),
            b"\xff\xfe\x00 not utf-8",
        ]
    )


class HostileJobs:
    """Deterministic for a seed; each record's key is a fresh job id."""

    def __init__(self, seed: int, *, max_bytes: int):
        self.rng = random.Random(seed)
        self.max_bytes = max_bytes
        self._good_png = _data_uri(_png(self.rng))

    def records(self, n: int) -> Iterator[HostileRecord]:
        for _ in range(n):
            yield self.one()

    def one(self) -> HostileRecord:
        job_id = uuid.UUID(int=self.rng.getrandbits(128)).hex
        roll = self.rng.random()
        if roll < 0.08:
            return HostileRecord(job_id.encode(), _raw(self.rng, self.max_bytes), "raw")
        job: dict[str, Any] = {"job_id": job_id, "task": "caption", "images": [self._good_png]}
        kind = "good"
        if roll < 0.40:
            name, make = self.rng.choice(list(SCHEMAS.items()))
            job |= {"task": "extract", "output_schema": make(self.rng)}
            kind = f"schema:{name}"
        elif roll < 0.60:
            name, make = self.rng.choice(list(URIS.items()))
            job["images"] = [make(self.rng)] + ([self._good_png] if self.rng.random() < 0.3 else [])
            kind = f"uri:{name}"
        elif roll < 0.75:
            answer = self.rng.choice(HOSTILE_ANSWERS)
            task = self.rng.choice(["caption", "extract"])
            job |= {"task": task, "prompt": f"{ANSWER_MARKER}{answer}"}
            if task == "extract":
                job["output_schema"] = {"type": "object"}
            kind = f"answer:{answer}"
        elif roll < 0.95:
            field, value = self._field()
            job[field] = value
            kind = f"field:{field}"
        return HostileRecord(job_id.encode(), json.dumps(job, allow_nan=True).encode(), kind)

    def _field(self) -> tuple[str, Any]:
        rng = self.rng
        return rng.choice(
            [
                ("task", rng.choice(["translate", "", None, 7])),
                ("images", rng.choice([[], [self._good_png] * 9, "s3://vlm-images/a.png", [None]])),
                ("prompt", "p" * rng.choice([7_999, 8_001, 100_000])),
                ("reply_to", rng.choice(["__consumer_offsets", Topic.JOBS_RESULT, "reply.missing", "a" * 300, "r/x"])),
                ("deadline", rng.choice(["2000-01-01T00:00:00Z", "yesterday", "9999-12-31T23:59:59Z"])),
                ("max_output_tokens", rng.choice([0, -1, 4_097, 10**30, 1])),
                ("attempt", rng.choice([-1, 10**6, "x"])),
                ("tenant", "t" * rng.choice([64, 65])),
                ("submitted_at", rng.choice(["0001-01-01T00:00:00Z", "not a time"])),
                ("extra_field", {"nested": [1, 2, 3]}),
                ("job_id", "not the key"),
            ]
        )


class HostileAnswers(InstantEngine):
    """The instant engine, except for jobs whose prompt names a hostile answer (`ANSWER_MARKER`)."""

    async def generate(self, request: EngineRequest) -> EngineOutput:
        marker = request.prompt.find(ANSWER_MARKER)
        if marker < 0:
            return await super().generate(request)
        kind = request.prompt[marker + len(ANSWER_MARKER) :].split()[0]
        if kind == "raises":
            raise RuntimeError("the engine fell over")
        parsed, text, finish = _hostile_answer(kind)
        return EngineOutput(text, parsed, 10, 10, None, finish, 0.0, 0.0)


def _hostile_answer(kind: str) -> tuple[Any, str, str]:
    """(parsed JSON, text, finish reason) of a hostile answer."""
    if kind == "deep":
        deep: Any = "leaf"
        for _ in range(5_000):
            deep = {"a": deep}
        return {"caption": "x", "a": deep}, '{"caption": "x", "a": {"a": ...}}', "stop"
    if kind == "array":
        return [1, 2], "[1, 2]", "stop"
    if kind == "cut_off":
        return None, '{"caption": "cut', "length"
    if kind == "huge":
        return {"caption": "x" * 3_000_000}, "(3 MB)", "stop"
    if kind == "nan":
        return {"caption": "x", "score": math.nan, "inf": math.inf}, "{NaN}", "stop"
    if kind == "huge_key":
        return {"k" * 200_000: 1}, "(a long key)", "stop"
    return {"caption": "x"}, "", "stop"
