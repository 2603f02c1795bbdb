"""`vlmflow golden snapshot`: store the golden set as it is now (the streams leader also does so periodically)."""

from __future__ import annotations

import argparse

from schemas.settings import Settings
from schemas.topics import Topic


def register(subcommands: argparse._SubParsersAction) -> None:
    golden = subcommands.add_parser("golden", help=f"the golden set on {Topic.GOLDEN} and its snapshots")
    actions = golden.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("snapshot", help="write the latest version of every record to golden/snapshots/ now")
    golden.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from streams.flywheel.golden import snapshot

    uri, count = snapshot(settings)
    print(f"golden snapshot: {count} records to {uri}")
    return 0
