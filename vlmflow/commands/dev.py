"""`vlmflow dev up [--with label-studio] | down | status`: the local stack."""

from __future__ import annotations

import argparse

from schemas.settings import LabelStudioSettings, Settings, redact
from schemas.topics import TOPICS
from vlmflow.stack import LocalStack, ServiceName, ServiceStatus

WITH_CHOICES: dict[str, ServiceName] = {"label-studio": "labelstudio"}


def register(subcommands: argparse._SubParsersAction) -> None:
    dev = subcommands.add_parser("dev", help="the local stack: broker, S3 store, Redis")
    actions = dev.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start what is not running, wait until it answers, create topics and buckets")
    up.add_argument(
        "--with",
        dest="extras",
        action="append",
        choices=sorted(WITH_CHOICES),
        default=[],
        help="also start Label Studio (its environment: scripts/labelstudio-env.sh)",
    )
    actions.add_parser("down", help="stop every server the stack started")
    actions.add_parser("status", help="show each server; exit 1 when one died")
    dev.set_defaults(func=run)


def _print(statuses: list[ServiceStatus]) -> None:
    for status in statuses:
        pid = f" pid {status.pid}" if status.pid else ""
        detail = f"  ({status.detail})" if status.detail else ""
        print(f"{status.name:<11} {status.state:<8} {status.endpoint}{pid}{detail}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    extras = tuple(WITH_CHOICES[name] for name in getattr(args, "extras", []))
    stack = LocalStack(settings, extras=extras)
    if args.action == "up":
        from vlmflow.kafka_admin import create_topics

        statuses = stack.up(progress=lambda line: print(line, flush=True))
        created = create_topics(settings)
        print(f"topics: {len(created)} created, {len(TOPICS) - len(created)} already there")
        _print(statuses)
        print(f"export VLMFLOW_KAFKA__BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers}")
        print(f"export VLMFLOW_S3__ENDPOINT={settings.s3.endpoint}")
        print(f"export VLMFLOW_REDIS__URL={redact(settings.redis.url, settings)}")
        if any(status.name == "labelstudio" for status in statuses):
            ls = settings.labelstudio
            print(f"Label Studio: {ls.url}  login {ls.username} / {_shown_password(ls)}")
            print("  then: vlmflow review ls run   (the bridge: cases out to Label Studio, corrections back)")
        return 0
    if args.action == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        return 0
    statuses = stack.status()
    _print(statuses)
    return 1 if any(status.state == "dead" for status in statuses) else 0


def _shown_password(labelstudio: LabelStudioSettings) -> str:
    """The local stack's built-in admin password (public, in the source) is shown; a configured one never is."""
    built_in = LabelStudioSettings.model_fields["password"].default
    if labelstudio.password == built_in:
        return labelstudio.password.get_secret_value()
    return "(the password in VLMFLOW_LABELSTUDIO__PASSWORD)"
