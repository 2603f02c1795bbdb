"""The `vlmflow` command line. Each area registers its subcommands from `vlmflow/commands/<area>.py`.

Errors a user can act on (bad configuration, an unreachable server, bad input) print as one line on stderr
and exit with status 2; only defects show a traceback. No secret reaches the terminal: every line printed here
goes through `schemas.settings.redact` (URL passwords, the configured secret values).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from schemas.errors import VlmflowError, first_error
from schemas.settings import Settings, load_settings, redact

COMMAND_MODULES = (
    "vlmflow.commands.dev",
    "vlmflow.commands.topics",
    "vlmflow.commands.schemas",
    "vlmflow.commands.check",
    "vlmflow.commands.budget",
    "vlmflow.commands.worker",
    "vlmflow.commands.submit",
    "vlmflow.commands.model",
    "vlmflow.commands.demo",
    "vlmflow.commands.streams",
    "vlmflow.commands.replay",
    "vlmflow.commands.offsets",
    "vlmflow.commands.lag",
    "vlmflow.commands.review",
    "vlmflow.commands.golden",
    "vlmflow.commands.dataset",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmflow", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", help="local stack state directory (VLMFLOW_STATE_DIR; default .vlmflow)")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subcommands)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if args.state_dir:
        overrides["state_dir"] = args.state_dir
    return load_settings(**overrides)


def one_line_error(exc: BaseException, settings: Settings | None) -> str | None:
    """The one-line message for an error a user can act on; None for a defect (which keeps its traceback)."""
    from aiokafka.errors import KafkaError as AsyncKafkaError
    from kafka.errors import KafkaError
    from minio.error import S3Error
    from redis.exceptions import RedisError
    from urllib3.exceptions import HTTPError

    if isinstance(exc, VlmflowError):
        return str(exc)
    if isinstance(exc, ValidationError):
        where, message = first_error(exc)
        return f"invalid setting {where}: {message}"
    kafka = settings.kafka.bootstrap_servers if settings else "the configured broker"
    s3 = settings.s3.endpoint if settings else "the configured S3 endpoint"
    redis_url = redact(settings.redis.url, settings) if settings else "the configured Redis"
    if isinstance(exc, KafkaError | AsyncKafkaError):
        return f"Kafka at {kafka}: {type(exc).__name__}: {exc}"
    if isinstance(exc, S3Error):
        if exc.code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"):
            return f"S3 at {s3} rejected the credentials ({exc.code}); check VLMFLOW_S3__ACCESS_KEY and SECRET_KEY"
        return f"S3 at {s3}: {exc.code}: {exc.message}"
    if isinstance(exc, HTTPError):
        return f"cannot reach S3 at {s3}: {type(exc).__name__}"
    if isinstance(exc, RedisError):
        return f"Redis at {redis_url}: {type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = settings_from(args)
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        print("vlmflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = one_line_error(exc, settings)
        if message is None:
            raise
        print(f"vlmflow: error: {redact(message, settings)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
