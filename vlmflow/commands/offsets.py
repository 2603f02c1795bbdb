"""`vlmflow offsets reset`: move a consumer group on a topic. Prints the plan; applies it only with --execute,
and never while the group has active members (as `kafka-consumer-groups --reset-offsets`)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from schemas.settings import Settings
from streams.ops.window import TIME_HELP


def register(subcommands: argparse._SubParsersAction) -> None:
    offsets = subcommands.add_parser("offsets", help="move consumer groups' committed offsets")
    actions = offsets.add_subparsers(dest="action", required=True, metavar="ACTION")
    reset = actions.add_parser(
        "reset",
        help="plan (and with --execute apply) new committed offsets for a group on a topic",
        description="Prints the current and new offset per partition. Nothing changes without --execute.",
    )
    reset.add_argument("--group", required=True, metavar="G")
    reset.add_argument("--topic", required=True, metavar="T")
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-datetime", metavar="TIME", help=f"first record at or after TIME: {TIME_HELP}")
    target.add_argument("--to-earliest", action="store_true", help="the start of each partition")
    target.add_argument("--to-latest", action="store_true", help="the end of each partition (skip everything)")
    target.add_argument("--shift-by", type=int, metavar="N", help="move the committed offsets by N (negative: back)")
    reset.add_argument("--execute", action="store_true", help="apply the plan (default: dry run)")
    offsets.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from streams.cluster import describe_group
    from streams.ops.reset import ResetTarget, apply_reset, plan_reset, render_plan
    from streams.ops.window import parse_time
    from vlmflow.kafka_admin import admin_client

    if args.to_datetime is not None:
        target = ResetTarget("datetime", parse_time(args.to_datetime, int(datetime.now(UTC).timestamp() * 1000)))
    elif args.shift_by is not None:
        target = ResetTarget("shift", args.shift_by)
    else:
        target = ResetTarget("earliest" if args.to_earliest else "latest")
    with admin_client(settings) as admin:
        plan = plan_reset(settings, admin, args.group, args.topic, target)
        for line in render_plan(plan):
            print(line)
        if not args.execute:
            state = describe_group(admin, args.group)
            if state.active:
                print(
                    f"note: group {args.group} has {state.members} active member(s); --execute would be refused",
                    file=sys.stderr,
                )
            print("dry run: nothing changed; add --execute to apply")
            return 0
        apply_reset(admin, plan)
    print(f"applied: group {args.group} will start at the NEW offsets on {args.topic}")
    return 0
