"""`vlmflow topics create | list`: the topic registry on the cluster."""

from __future__ import annotations

import argparse

from schemas.settings import Settings
from schemas.topics import TOPICS


def register(subcommands: argparse._SubParsersAction) -> None:
    topics = subcommands.add_parser("topics", help="create and inspect the registry's topics")
    actions = topics.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("create", help="create every registry topic with its partitions and cleanup policy")
    actions.add_parser("list", help="the registry: name, key, partitions, cleanup policy")
    topics.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "create":
        from vlmflow.kafka_admin import create_topics

        created = create_topics(settings)
        for name in TOPICS:
            print(f"{name:<22} {'created' if name in created else 'exists'}")
        return 0
    for spec in TOPICS.values():
        print(f"{spec.name:<22} key={spec.key_field:<12} partitions={spec.partitions:<3} {spec.cleanup_policy}")
    return 0
