"""`vlmflow replay`: copy a window of a topic, by time or by offset, into a topic; resumable, rate-limited, with a
dry run. The design (what makes the window exact and a resume send nothing twice) is in streams/ops/replay/run.py."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from schemas.settings import Settings
from streams.ops.window import TIME_HELP

if TYPE_CHECKING:
    from streams.ops.replay.checkpoint import ReplayCheckpoint

REQUEST_OPTIONS = (
    "source",
    "destination",
    "partitions",
    "from_time",
    "to_time",
    "from_offsets",
    "to_offsets",
    "filter",
)
UNREADABLE_SHOWN = 5
"""Records the filter could not read that the summary lists by position (the count covers all of them)."""


def register(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "replay",
        help="copy a window of a topic (by time or offset) into a topic",
        description="Copy the records of [--from, --to) into --to-topic, with key, value, headers and timestamp, "
        "marked with x-replay-* headers. Resume an interrupted replay with --resume ID.",
    )
    parser.add_argument("--topic", dest="source", metavar="SRC", help="the topic to read")
    parser.add_argument("--partitions", metavar="P,P,...", help="only these partitions (default: all)")
    parser.add_argument("--from", dest="from_time", metavar="TIME", help=f"window start, inclusive: {TIME_HELP}")
    parser.add_argument("--to", dest="to_time", metavar="TIME", help="window end, exclusive (default: open)")
    parser.add_argument("--from-offset", dest="from_offsets", metavar="P:O,...", help="start offsets, inclusive")
    parser.add_argument("--to-offset", dest="to_offsets", metavar="P:O,...", help="end offsets, exclusive")
    parser.add_argument("--to-topic", dest="destination", metavar="DST", help="the topic to write")
    parser.add_argument(
        "--filter", metavar="EXPR", help="on value fields, e.g. 'status=error and tenant in (acme,globex)'"
    )
    parser.add_argument("--rate", metavar="N/s", help="at most this many records per second")
    parser.add_argument("--dry-run", action="store_true", help="count and sample what would be sent; write nothing")
    parser.add_argument("--resume", metavar="ID", help="go on with an interrupted replay from its checkpoint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from streams.ops.rate_limit import parse_rate
    from streams.ops.replay.checkpoint import ReplayCounts
    from streams.ops.replay.run import run_replay

    now = datetime.now(UTC)
    rate = parse_rate(args.rate) if args.rate else None
    checkpoint = _resumed(args, settings) if args.resume else _started(args, settings, now)
    plan = checkpoint.plan
    if checkpoint.done:
        print(f"replay {plan.replay_id} is already complete: {plan.describe()}")
        return 0
    if not args.dry_run:
        print(f"replay {plan.replay_id}: {plan.describe()}", file=sys.stderr)
        print(f"if it stops, resume it with: vlmflow replay --resume {plan.replay_id}", file=sys.stderr)
    with tqdm(
        total=plan.total,
        initial=plan.total - checkpoint.remaining,
        unit="rec",
        desc=f"replay {plan.replay_id}",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:

        def progress(counts: ReplayCounts) -> None:
            bar.update(1)
            bar.set_postfix_str(f"sent {counts.sent:,}", refresh=False)

        outcome = run_replay(settings, checkpoint, dry_run=args.dry_run, rate=rate, progress=progress)
    counts = outcome.checkpoint.counts
    skipped = f"{counts.outside_window:,} outside the window, {counts.filtered_out:,} filtered out"
    if counts.unreadable:
        skipped += f" ({counts.unreadable:,} the filter could not read, skipped)"
    unreadable = [f"  skipped {r.partition}@{r.offset}: {r.reason}" for r in outcome.unreadable[:UNREADABLE_SHOWN]]
    if outcome.dry_run:
        from streams.ops.tail import format_record

        print(f"dry run: {plan.describe()}")
        print(f"would send {counts.sent:,} of {counts.scanned:,} records read ({skipped}); nothing was written")
        for record in outcome.samples:
            print(f"  {format_record(record)}")
        for line in unreadable:
            print(line)
        return 0
    again = (
        f", {counts.already_delivered:,} already delivered before an interruption" if counts.already_delivered else ""
    )
    print(f"replay {plan.replay_id} complete: {plan.describe()}")
    print(f"sent {counts.sent:,} of {counts.scanned:,} records read ({skipped}{again})")
    print(f"this run: {outcome.sent_now:,} records in {outcome.elapsed_s:.1f} s ({outcome.rate:,.0f}/s)")
    for line in unreadable:
        print(line)
    return 0


def _request_fields(args: argparse.Namespace) -> dict[str, object]:
    from streams.ops.window import parse_partition_list

    fields = {name: getattr(args, name) for name in REQUEST_OPTIONS}
    if args.partitions is not None:
        fields["partitions"] = parse_partition_list(args.partitions)
    return {name: value for name, value in fields.items() if value is not None}


def _started(args: argparse.Namespace, settings: Settings, now: datetime) -> ReplayCheckpoint:
    from streams.ops.replay.plan import ReplayError, ReplayRequest
    from streams.ops.replay.run import start_replay
    from vlmflow.kafka_admin import admin_client

    fields = _request_fields(args)
    missing = [flag for flag, name in (("--topic", "source"), ("--to-topic", "destination")) if name not in fields]
    if missing:
        raise ReplayError(f"a replay needs {' and '.join(missing)} (or --resume ID)")
    request = ReplayRequest(**fields)  # type: ignore[arg-type]
    request.window(int(now.timestamp() * 1000))
    with admin_client(settings) as admin:
        return start_replay(settings, admin, request, now=now, dry_run=args.dry_run)


def _resumed(args: argparse.Namespace, settings: Settings) -> ReplayCheckpoint:
    """The checkpoint of `--resume ID`; window options given as well must be the ones it was started with."""
    from streams.ops.replay.checkpoint import load_checkpoint
    from streams.ops.replay.plan import ReplayError

    checkpoint = load_checkpoint(settings, args.resume)
    asked = checkpoint.plan.request.model_dump()
    for name, value in _request_fields(args).items():
        if asked[name] != value:
            raise ReplayError(
                f"replay {args.resume} was started with {name}={asked[name]!r}, not {value!r}; "
                "give --resume ID alone to go on as planned"
            )
    return checkpoint
