"""`vlmflow submit IMAGE... --task detect` and `vlmflow results [--follow]`: the producer side by hand."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.base import utc_now
from schemas.errors import VlmflowError, first_error
from schemas.jobs import TASKS, ImageJob
from schemas.settings import Settings
from schemas.topics import Topic

REMOTE_PREFIXES = ("s3://", "data:", "http://", "https://")


def register(subcommands: argparse._SubParsersAction) -> None:
    submit = subcommands.add_parser("submit", help="submit one image job per IMAGE (local files are uploaded to S3)")
    submit.add_argument("images", nargs="+", metavar="IMAGE", help="a local file, s3://bucket/key, data: URI or URL")
    submit.add_argument("--task", required=True, choices=TASKS)
    submit.add_argument("--prompt", help="extra instruction; for `ground`, the element to find")
    submit.add_argument("--schema", type=Path, help="JSON Schema file of the answer (task `extract`)")
    submit.add_argument("--reply-to", help=f"a topic that gets the results as well as {Topic.JOBS_RESULT}")
    submit.add_argument("--deadline", type=float, metavar="SECONDS", help="answer deadline_exceeded after this")
    submit.add_argument("--wait", action="store_true", help="print each job's result as a JSON line when it comes")
    submit.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits for all results")
    submit.set_defaults(func=run_submit)
    results = subcommands.add_parser("results", help=f"print the results on {Topic.JOBS_RESULT} as JSON lines")
    results.add_argument("--follow", action="store_true", help="keep printing new results until Ctrl-C")
    results.set_defaults(func=run_results)


def _image_uri(settings: Settings, image: str) -> str:
    """Remote references go as they are; a local file is uploaded to the first image bucket."""
    if image.startswith(REMOTE_PREFIXES):
        return image
    from vlmflow.objectstore import put_image

    path = Path(image)
    if not path.is_file():
        raise VlmflowError(f"{image}: no such file (and not an s3://, data: or http(s):// URI)")
    return put_image(settings, path.read_bytes(), path.suffix)


def _output_schema(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VlmflowError(f"--schema {path}: {exc}") from None
    if not isinstance(schema, dict):
        raise VlmflowError(f"--schema {path}: a JSON Schema is an object")
    return schema


def _jobs(args: argparse.Namespace, settings: Settings) -> list[ImageJob]:
    schema = _output_schema(args.schema)
    deadline = None if args.deadline is None else utc_now() + timedelta(seconds=args.deadline)
    try:
        return [
            ImageJob(
                job_id=uuid.uuid4().hex,
                task=args.task,
                images=[_image_uri(settings, image)],
                prompt=args.prompt,
                output_schema=schema,
                reply_to=args.reply_to,
                deadline=deadline,
            )
            for image in args.images
        ]
    except ValidationError as exc:
        where, message = first_error(exc, top="job")
        raise VlmflowError(f"invalid job: {where}: {message}") from None


async def _submit(settings: Settings, jobs: list[ImageJob], wait: bool, timeout_s: float) -> int:
    from workers.client import JobClient

    async with JobClient(settings) as client:
        for job in jobs:
            await client.submit(job)
            print(f"{job.job_id} {job.images[0][:80]}", file=sys.stderr if wait else sys.stdout, flush=True)
        if not wait:
            return 0
        received = 0
        async for result in client.results([job.job_id for job in jobs], timeout_s):
            print(result.model_dump_json(), flush=True)
            received += 1
    if received < len(jobs):
        print(
            f"vlmflow: {len(jobs) - received} of {len(jobs)} results did not come within {timeout_s:.0f} s",
            file=sys.stderr,
        )
        return 1
    return 0


def run_submit(args: argparse.Namespace, settings: Settings) -> int:
    jobs = _jobs(args, settings)
    return asyncio.run(_submit(settings, jobs, args.wait, args.timeout))


async def _print_results(settings: Settings, follow: bool) -> None:
    from workers.client import read_results

    async for result in read_results(settings, follow=follow):
        print(result.model_dump_json(), flush=True)


def run_results(args: argparse.Namespace, settings: Settings) -> int:
    asyncio.run(_print_results(settings, args.follow))
    return 0
