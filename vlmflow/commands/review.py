"""`vlmflow review next | submit | skip | stats | suggest`: work through the correction queue.

`next` claims the top case under a lease and remembers the claim in the state directory, so `submit` and `skip`
need no ids; `--case` and `--token` name another claim. `suggest` pre-fills answers with the configured engine
(`engine.kind`: `vllm` or `instant`); a person still confirms them (`submit --accept-suggestion`).

`review ls setup | run [--once] | status` is the Label Studio bridge (`streams.review.labelstudio`): `setup`
creates the projects, S3 storages and webhooks, `run` moves cases out and corrections back until stopped (the
production bridge service runs it), `status` counts the cases held in Label Studio.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from schemas.cases import Correction, CorrectionSource
from schemas.codec import encode, key_of
from schemas.errors import VlmflowError
from schemas.settings import Settings
from schemas.topics import Topic
from streams.review.queue import Claim, CorrectionQueue
from streams.review.suggest import suggest_answer
from workers.engines.factory import build_engine


class ReviewError(VlmflowError):
    """A review command that cannot go on: no claim to act on, an unreadable answer file, no suggestion."""


def register(subcommands: argparse._SubParsersAction) -> None:
    review = subcommands.add_parser("review", help="the correction queue: claim, correct, submit")
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    reviewer = argparse.ArgumentParser(add_help=False)
    reviewer.add_argument("--reviewer", default=getpass.getuser(), help="who reviews (default: the login name)")
    claim = argparse.ArgumentParser(add_help=False)
    claim.add_argument("--case", help="case id of the claim (default: the last one `next` gave this reviewer)")
    claim.add_argument("--token", help="lease token of that claim")

    next_ = actions.add_parser("next", parents=[reviewer], help="claim the highest-priority case and show it")
    next_.add_argument("--lease-s", type=float, help="lease length (default: streams.review_lease_s)")
    next_.add_argument("--json", action="store_true", help="print the claim as JSON")

    submit = actions.add_parser("submit", parents=[reviewer, claim], help="submit the corrected JSON answer")
    answer = submit.add_mutually_exclusive_group(required=True)
    answer.add_argument("answer", nargs="?", help="file with the corrected JSON, or - for standard input")
    answer.add_argument("--accept-suggestion", action="store_true", help="confirm the model's suggestion as is")
    submit.add_argument("--task", help="the task, when the case's log does not name it")
    submit.add_argument("--output-schema", type=Path, help="JSON Schema file of an extract job's answer")

    actions.add_parser("skip", parents=[reviewer, claim], help="give the claimed case back to others")
    stats = actions.add_parser("stats", help="queue length, leases, totals")
    stats.add_argument("--json", action="store_true")

    suggest = actions.add_parser("suggest", help="pre-fill suggestions for the top pending cases with a model")
    suggest.add_argument("--limit", type=int, default=20, help="how many of the top cases (default 20)")

    ls = actions.add_parser("ls", help="Label Studio as the review surface: the bridge to the correction queue")
    ls_actions = ls.add_subparsers(dest="ls_action", required=True, metavar="ACTION")
    ls_actions.add_parser("setup", help="create or update the projects, S3 storages and webhooks")
    ls_run = ls_actions.add_parser("run", help="the bridge: cases out, corrections back (webhooks and a poll)")
    ls_run.add_argument("--once", action="store_true", help="one pass, then print what it did as JSON and exit")
    ls_actions.add_parser("status", help="projects and the cases the bridge holds in Label Studio")
    review.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "ls":
        return asyncio.run(_labelstudio(args, settings))
    return asyncio.run(_run(args, settings))


async def _labelstudio(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from streams.review.labelstudio import open_bridge, serve, status

    if args.ls_action == "setup":
        async with open_bridge(settings, serving="setup") as bridge:
            for task, project_id in bridge.projects.items():
                print(f"{task:<8} {settings.labelstudio.url}/projects/{project_id}/data")
        return 0
    if args.ls_action == "status":
        print(json.dumps(await status(settings), sort_keys=True))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = await serve(settings, once=args.once, ready=lambda line: print(line, flush=True))
    if args.once:
        print(json.dumps(report.__dict__, sort_keys=True))
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.connections import redis_client

    redis = redis_client(settings)
    try:
        queue = CorrectionQueue(redis, settings.streams.review_queue)
        if args.action == "next":
            return await _next(args, settings, queue)
        if args.action == "submit":
            return await _submit(args, settings, queue)
        if args.action == "skip":
            case_id, token = _claim_ids(args, settings)
            await queue.skip(case_id, token)
            _claim_file(settings, args.reviewer).unlink(missing_ok=True)
            print(f"skipped {case_id}: back in the queue for other reviewers")
            return 0
        if args.action == "stats":
            return await _stats(args, queue)
        return await _suggest(args, settings, queue)
    finally:
        await redis.aclose()


def _claim_file(settings: Settings, reviewer: str) -> Path:
    safe = "".join(char if char.isalnum() or char in "-_." else "_" for char in reviewer)
    return settings.state_dir / "review" / f"{safe}.claim.json"


def _claim_ids(args: argparse.Namespace, settings: Settings) -> tuple[str, str]:
    if args.case and args.token:
        return args.case, args.token
    if args.case or args.token:
        raise ReviewError("--case and --token go together")
    path = _claim_file(settings, args.reviewer)
    if not path.exists():
        raise ReviewError(f"no claim of {args.reviewer!r} to act on; run `vlmflow review next` first")
    saved = json.loads(path.read_text())
    return saved["case_id"], saved["token"]


def _show(claim: Claim) -> str:
    case = claim.case
    log = case.log
    lines = [
        f"case      {case.case_id}  (priority {case.priority}, score {case.score})",
        f"task      {log.task or '-'}    tenant {log.tenant}    model {log.model or '-'}",
        f"lease     until {claim.lease_ends.isoformat(timespec='seconds')}",
        "signals   " + "; ".join(f"{s.name} (+{s.weight}){f': {s.detail}' if s.detail else ''}" for s in case.signals),
    ]
    lines += [f"image     {image.uri}  {image.width or '?'}x{image.height or '?'}" for image in log.images]
    lines += ["prompt", f"  {log.prompt}", "output"]
    output = log.output if log.output is not None else log.output_text
    lines += [f"  {line}" for line in json.dumps(output, indent=2, ensure_ascii=False).splitlines()]
    if log.correction is not None:
        lines += ["user's correction", f"  {json.dumps(log.correction, ensure_ascii=False)}"]
    if claim.suggestion is not None:
        lines += ["suggestion (confirm with `vlmflow review submit --accept-suggestion`)"]
        lines += [f"  {line}" for line in json.dumps(claim.suggestion, indent=2, ensure_ascii=False).splitlines()]
    lines += ["submit    vlmflow review submit ANSWER.json   (or: review skip)"]
    return "\n".join(lines)


async def _next(args: argparse.Namespace, settings: Settings, queue: CorrectionQueue) -> int:
    claim = await queue.claim(args.reviewer, args.lease_s or settings.streams.review_lease_s)
    if claim is None:
        print("the queue is empty")
        return 1
    path = _claim_file(settings, args.reviewer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"case_id": claim.case.case_id, "token": claim.token}))
    if args.json:
        print(
            json.dumps(
                {
                    "case": claim.case.model_dump(mode="json"),
                    "token": claim.token,
                    "lease_ends": claim.lease_ends.isoformat(),
                    "suggestion": claim.suggestion,
                },
                sort_keys=True,
            )
        )
    else:
        print(_show(claim))
    return 0


def _read_json(source: str) -> Any:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise ReviewError(f"cannot read {source}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReviewError(f"{source}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


async def _publisher(settings: Settings) -> Any:
    from aiokafka import AIOKafkaProducer

    from schemas.connections import aiokafka_options

    producer = AIOKafkaProducer(**aiokafka_options(settings.kafka), acks="all")
    await producer.start()
    return producer


async def _submit(args: argparse.Namespace, settings: Settings, queue: CorrectionQueue) -> int:
    from streams.review.submit import submit_correction

    case_id, token = _claim_ids(args, settings)
    source: CorrectionSource
    if args.accept_suggestion:
        claim = await queue.renew(case_id, token, settings.streams.review_lease_s)
        if claim.suggestion is None:
            raise ReviewError(f"case {case_id} has no suggestion; run `vlmflow review suggest` or submit a file")
        answer, source = claim.suggestion, "model"
    else:
        answer, source = _read_json(args.answer), "human"
    output_schema = _read_json(str(args.output_schema)) if args.output_schema else None
    producer = await _publisher(settings)

    async def publish(correction: Correction) -> None:
        await producer.send_and_wait(
            Topic.CORRECTIONS_DONE, key=key_of(Topic.CORRECTIONS_DONE, correction), value=encode(correction)
        )

    try:
        correction = await submit_correction(
            queue,
            publish,
            case_id=case_id,
            token=token,
            answer=answer,
            reviewer=args.reviewer,
            source=source,
            task=args.task,
            output_schema=output_schema,
        )
    finally:
        await producer.stop()
    _claim_file(settings, args.reviewer).unlink(missing_ok=True)
    print(f"submitted {correction.case_id} ({correction.task}, {correction.source}) to {Topic.CORRECTIONS_DONE}")
    return 0


async def _stats(args: argparse.Namespace, queue: CorrectionQueue) -> int:
    stats = await queue.stats()
    if args.json:
        print(json.dumps({**stats.__dict__}, sort_keys=True))
        return 0
    top = stats.top_priority if stats.top_priority is not None else "-"
    print(f"pending {stats.pending} (top priority {top}), leased {stats.leased}, submitted {stats.submitted}")
    print("totals  " + ", ".join(f"{name} {count}" for name, count in sorted(stats.counters.items())))
    return 0


async def _suggest(args: argparse.Namespace, settings: Settings, queue: CorrectionQueue) -> int:
    from tqdm import tqdm

    from schemas.connections import object_store

    todo = [case for case, suggestion in await queue.peek(args.limit) if suggestion is None]
    if not todo:
        print("no pending case without a suggestion")
        return 0
    engine = build_engine(settings)
    store = object_store(settings)
    await engine.start()
    made, failed = 0, []
    try:
        for case in tqdm(todo, desc="suggest", unit="case", disable=None):
            try:
                answer = await suggest_answer(engine, case, settings, store)
            except VlmflowError as exc:
                failed.append(str(exc))
                continue
            made += await queue.suggest(case.case_id, answer)
    finally:
        await engine.close()
    for line in failed:
        print(f"no suggestion: {line}", file=sys.stderr)
    print(f"suggested {made} of {len(todo)} cases; a reviewer confirms each with `review submit --accept-suggestion`")
    return 0
