"""A seeded mix of image jobs, good ones and bad ones of every kind, each with the answer it must get.

The demo, the worker tests and the benchmarks submit these. Images are generated (shapes on a background) and
stored in the S3 store or sent inline; the bad jobs cover each error code a worker gives for bad input.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from PIL import Image, ImageDraw

from schemas.base import utc_now
from schemas.errors import ErrorCode
from schemas.jobs import MAX_IMAGES_PER_JOB, TASKS, ImageJob, Task
from schemas.settings import Settings
from schemas.tasks import MAX_OUTPUT_SCHEMA_DEPTH
from vlmflow.objectstore import put_image
from workers.tokens import image_tokens

GOOD_SIZES = ((320, 240), (640, 480), (1024, 768), (200, 600), (96, 96), (1400, 1000))
EXTRACT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "shapes": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["title", "shapes"],
    "additionalProperties": False,
}
GROUND_PROMPT = "the largest shape"
UNREACHABLE_HOST = "127.0.0.1:1"
"""An allow-list entry (host:port, the allow-list restricts ports) where nothing listens (tcpmux, unused on these
machines): every fetch is refused, a failure worth retrying."""


@dataclass(frozen=True)
class PlannedJob:
    """One job to submit and what its result must be."""

    job_id: str
    task: Task | None
    expected: ErrorCode | None
    """None: an `ok` result whose output fits the task schema; otherwise the error code of the result."""
    kind: str
    """`good`, or the kind of bad input (names the case in test output)."""
    value: bytes
    """The record value for `vlm.jobs.image` (an encoded `ImageJob`, or something that is not one)."""
    job: ImageJob | None = None


def encoded_image(size: tuple[int, int], fmt: str, rng: random.Random) -> bytes:
    """A picture of a few coloured shapes, `fmt` as Pillow names it."""
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(rng.randint(1, 4)):
        x1, y1 = rng.randrange(width), rng.randrange(height)
        x2, y2 = (
            min(width - 1, x1 + rng.randint(4, width // 2 + 4)),
            min(height - 1, y1 + rng.randint(4, height // 2 + 4)),
        )
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x1, y1, max(x1, x2), max(y1, y2)), fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels and whose pixel data is empty: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _job(task: Task, images: list[str], **fields: Any) -> ImageJob:
    prompt = GROUND_PROMPT if task == "ground" else None
    schema = EXTRACT_SCHEMA if task == "extract" else None
    options: dict[str, Any] = {"prompt": prompt, "output_schema": schema, **fields}
    return ImageJob(job_id=uuid.uuid4().hex, task=task, images=images, **options)


def _planned(job: ImageJob, expected: ErrorCode | None, kind: str) -> PlannedJob:
    return PlannedJob(job.job_id, job.task, expected, kind, job.model_dump_json().encode(), job)


class JobMix:
    """Builds the jobs; stores the images it needs in the S3 store as it goes (blocking I/O)."""

    def __init__(self, settings: Settings, *, seed: int = 0, max_output_tokens: int = 512):
        self.settings = settings
        self.rng = random.Random(seed)
        self.max_output_tokens = max_output_tokens
        self._stored: list[str] = []  # s3:// URIs of the good images in the store

    def _good_uris(self) -> list[str]:
        if not self._stored:
            for index, size in enumerate(GOOD_SIZES):
                fmt, suffix = ("PNG", ".png") if index % 2 else ("JPEG", ".jpg")
                self._stored.append(put_image(self.settings, encoded_image(size, fmt, self.rng), suffix))
        return self._stored

    def good(self) -> PlannedJob:
        task = self.rng.choice(TASKS)
        if self.rng.random() < 0.25:
            size = self.rng.choice(GOOD_SIZES[:4])
            uri = data_uri(encoded_image(size, "PNG", self.rng), "image/png")
        else:
            uri = self.rng.choice(self._good_uris())
        return _planned(_job(task, [uri], max_output_tokens=self.max_output_tokens), None, "good")

    def bad_kinds(self) -> dict[str, Callable[[], PlannedJob]]:
        """Every kind of bad input that applies to these settings: `never_fits` needs a budget that a job of
        `engine.limit_images_per_prompt` images can exceed; `fetch_fails` (retried, then dead-lettered) needs
        127.0.0.1 in the URL allow-list."""
        bad_images: dict[str, tuple[Callable[[], list[str]], ErrorCode]] = {
            "missing_object": (self._missing_object, "image_not_found"),
            "forbidden_bucket": (lambda: ["s3://not-an-image-bucket/a.png"], "bucket_forbidden"),
            "forbidden_url": (lambda: ["https://unlisted.example.org/a.png"], "url_forbidden"),
            "undecodable": (lambda: [put_image(self.settings, b"this is no image " * 40, ".png")], "image_undecodable"),
            "truncated": (self._truncated, "image_truncated"),
            "bomb": (lambda: [data_uri(png_bomb(20_000, 20_000), "image/png")], "image_too_large"),
            "aspect_ratio": (self._thin, "aspect_ratio"),
            "inline_too_large": (self._oversize_inline, "payload_too_large"),
        }
        never_fits = self._never_fits_images()
        if never_fits is not None:
            bad_images["never_fits"] = (lambda: never_fits, "too_many_tokens")
        if UNREACHABLE_HOST in self.settings.worker.url_allow_list:
            bad_images["fetch_fails"] = (self._unreachable_url, "retries_exhausted")
        kinds = {kind: partial(self._bad, images, code, kind) for kind, (images, code) in bad_images.items()}
        return {
            **kinds,
            "deadline_passed": self._deadline_passed,
            "bad_output_schema": self._bad_output_schema,
            "deep_output_schema": self._deep_output_schema,
            "not_a_job": self._not_a_job,
        }

    def plan(self, total: int, bad: int) -> list[PlannedJob]:
        """`total` jobs of which `bad` are bad (every applicable kind at least once when `bad` allows), shuffled."""
        kinds = list(self.bad_kinds().values())
        jobs = [kinds[index % len(kinds)]() for index in range(bad)]
        jobs += [self.good() for _ in range(total - bad)]
        self.rng.shuffle(jobs)
        return jobs

    def _bad(self, images: Callable[[], list[str]], expected: ErrorCode, kind: str) -> PlannedJob:
        task: Task = self.rng.choice(("detect", "caption"))
        return _planned(_job(task, images(), max_output_tokens=self.max_output_tokens), expected, kind)

    def _missing_object(self) -> list[str]:
        return [f"s3://{self.settings.s3.image_buckets[0]}/missing/{uuid.uuid4().hex}.png"]

    def _truncated(self) -> list[str]:
        data = encoded_image((400, 300), "JPEG", self.rng)
        return [put_image(self.settings, data[: len(data) // 2], ".jpg")]

    def _thin(self) -> list[str]:
        """An image 250 times wider than high: over the processor's aspect-ratio limit of 200."""
        return [data_uri(encoded_image((1_000, 4), "PNG", self.rng), "image/png")]

    def _oversize_inline(self) -> list[str]:
        payload = base64.b64encode(self.rng.randbytes(self.settings.worker.max_inline_image_bytes + 1024)).decode()
        return [f"data:image/png;base64,{payload}"]

    def _deadline_passed(self) -> PlannedJob:
        deadline = utc_now() - timedelta(seconds=1)
        job = _job("caption", [self.rng.choice(self._good_uris())], deadline=deadline, max_output_tokens=8)
        return _planned(job, "deadline_exceeded", "deadline_passed")

    def _never_fits_images(self) -> list[str] | None:
        """Images whose tokens together exceed the budget's capacity, if a job the engine takes can hold them."""
        model = self.settings.model
        width, height = GOOD_SIZES[-1]
        per_image = image_tokens(
            width, height, family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels
        )
        capacity = self.settings.budget.capacity
        if capacity is None:  # the engine's KV cache decides at start: no job is known never to fit
            return None
        count = capacity // per_image + 1
        if count > min(MAX_IMAGES_PER_JOB, self.settings.engine.limit_images_per_prompt):
            return None
        return [self._good_uris()[-1]] * count

    def _unreachable_url(self) -> list[str]:
        return [f"http://{UNREACHABLE_HOST}/image.png"]

    def _bad_output_schema(self) -> PlannedJob:
        job = _job("extract", [self.rng.choice(self._good_uris())], output_schema={"type": "no-such-type"})
        return _planned(job, "invalid_output_schema", "bad_output_schema")

    def _deep_output_schema(self) -> PlannedJob:
        """A valid JSON Schema nested past `MAX_OUTPUT_SCHEMA_DEPTH`: refused before it reaches the grammar compiler."""
        schema: dict[str, Any] = {"type": "string"}
        for _ in range(MAX_OUTPUT_SCHEMA_DEPTH):
            schema = {"type": "object", "properties": {"field": schema}}
        job = _job("extract", [self.rng.choice(self._good_uris())], output_schema=schema)
        return _planned(job, "invalid_output_schema", "deep_output_schema")

    def _not_a_job(self) -> PlannedJob:
        job_id = uuid.uuid4().hex
        value = f'{{"job_id": "{job_id}", "task": "detect"}}'.encode()
        return PlannedJob(job_id, None, "invalid_message", "not_a_job", value)
