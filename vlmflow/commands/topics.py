"""`vlmflow topics create | list | describe | tail`: the topic registry on the cluster, and what a topic holds."""

from __future__ import annotations

import argparse

from schemas.settings import Settings
from schemas.topics import TOPICS


def register(subcommands: argparse._SubParsersAction) -> None:
    topics = subcommands.add_parser("topics", help="create and inspect the registry's topics")
    actions = topics.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("create", help="create every registry topic with its partitions and cleanup policy")
    actions.add_parser("list", help="the registry: name, key, partitions, cleanup policy")
    describe = actions.add_parser("describe", help="partitions, leaders, replicas and offsets of a topic")
    describe.add_argument("topic", metavar="T")
    tail = actions.add_parser("tail", help="the newest records of a topic, decoded with its schema")
    tail.add_argument("topic", metavar="T")
    tail.add_argument("--n", type=int, default=10, metavar="N", help="how many of the newest records (default 10)")
    tail.add_argument("--follow", action="store_true", help="then keep printing new records until interrupted")
    topics.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "create":
        from vlmflow.kafka_admin import create_topics

        created = create_topics(settings)
        for name in TOPICS:
            print(f"{name:<22} {'created' if name in created else 'exists'}")
        return 0
    if args.action == "describe":
        from streams.ops.describe import describe_topic, render_description
        from vlmflow.kafka_admin import admin_client

        with admin_client(settings) as admin:
            description = describe_topic(settings, admin, args.topic)
        for line in render_description(description):
            print(line)
        return 0
    if args.action == "tail":
        return _tail(args, settings)
    for spec in TOPICS.values():
        print(f"{spec.name:<22} key={spec.key_field:<12} partitions={spec.partitions:<3} {spec.cleanup_policy}")
    return 0


def _tail(args: argparse.Namespace, settings: Settings) -> int:
    from streams.ops.tail import follow, format_record, last_records
    from vlmflow.kafka_admin import admin_client

    with admin_client(settings) as admin:
        records, ends = last_records(settings, admin, args.topic, max(0, args.n))
    for record in records:
        print(format_record(record), flush=True)
    if args.follow:
        for record in follow(settings, ends):
            print(format_record(record), flush=True)
    return 0
