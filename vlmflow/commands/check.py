"""`vlmflow check`: connect to each configured server and say which one does not answer, in one line each (with
passwords and secret keys shown as `***`)."""

from __future__ import annotations

import argparse

from schemas.settings import Settings, redact


def register(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("check", help="probe Kafka, Redis and S3 with the current settings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.connections import object_store, redis_client_sync
    from vlmflow.kafka_admin import admin_client

    with admin_client(settings) as admin:
        topics = admin.list_topics()
    print(f"kafka  ok  {settings.kafka.bootstrap_servers} ({len(topics)} topics)")
    client = redis_client_sync(settings)
    try:
        client.ping()
    finally:
        client.close()
    print(f"redis  ok  {redact(settings.redis.url, settings)}")
    buckets = [bucket.name for bucket in object_store(settings).list_buckets()]
    print(f"s3     ok  {settings.s3.endpoint} (buckets: {', '.join(buckets) or 'none'})")
    return 0
