"""`vlmflow streams`: the flywheel's Faust worker with every agent. Start more to scale out (one consumer group)."""

from __future__ import annotations

import argparse

from schemas.errors import VlmflowError
from schemas.settings import Settings
from schemas.topics import TOPICS, Topic


class StreamsNotReady(VlmflowError):
    """The cluster lacks the registry's topics the worker reads and writes."""


def register(subcommands: argparse._SubParsersAction) -> None:
    streams = subcommands.add_parser(
        "streams",
        help="run the flywheel worker: normalize, filter, dedupe, redact, mine hard cases",
        description=f"Consumes {Topic.LOGS_RAW} and {Topic.LOGS_NORMALIZED} as group VLMFLOW_STREAMS__APP_ID; logs its "
        "counts every VLMFLOW_STREAMS__PROGRESS_INTERVAL_S seconds. Stop with Ctrl-C or SIGTERM.",
    )
    streams.add_argument("--loglevel", default="info", choices=("debug", "info", "warning", "error"))
    streams.set_defaults(func=run)


def _preflight(settings: Settings) -> None:
    """Fail with one line before Faust starts: Kafka unreachable, topics missing, Redis unreachable."""
    from schemas.connections import redis_client_sync
    from vlmflow.kafka_admin import admin_client

    with admin_client(settings) as admin:
        missing = sorted(set(TOPICS) - set(admin.list_topics()))
    if missing:
        raise StreamsNotReady(f"topics missing on {settings.kafka.bootstrap_servers}: {', '.join(missing)} "
                              "(run `vlmflow topics create`)")  # fmt: skip
    client = redis_client_sync(settings)
    try:
        client.ping()
    finally:
        client.close()


def run(args: argparse.Namespace, settings: Settings) -> int:
    import faust

    from streams.flywheel.app import create_app

    app = create_app(settings)
    _preflight(settings)
    faust.Worker(app, loglevel=args.loglevel).execute_from_commandline()
    return 0
