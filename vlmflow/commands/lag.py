"""`vlmflow lag [--group G]`: committed offset, partition end and lag per group and partition."""

from __future__ import annotations

import argparse

from schemas.settings import Settings


def register(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("lag", help="consumer lag per group and partition")
    parser.add_argument("--group", action="append", metavar="G", help="only this group (repeatable; default: all)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from streams.ops.lag import group_lags, render_lag
    from vlmflow.kafka_admin import admin_client

    with admin_client(settings) as admin:
        groups = group_lags(settings, admin, args.group)
    for line in render_lag(groups):
        print(line)
    return 0
