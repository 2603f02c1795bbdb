"""`vlmflow model tiny DIR`: write the tiny random-weight Qwen2-VL checkpoint the local stack and the tests serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from schemas.errors import VlmflowError
from schemas.settings import Settings


def register(subcommands: argparse._SubParsersAction) -> None:
    model = subcommands.add_parser("model", help="model checkpoints for the engine")
    actions = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    tiny = actions.add_parser("tiny", help="write a tiny random Qwen2-VL checkpoint (served with load_format=dummy)")
    tiny.add_argument("dir", nargs="?", type=Path, help="target directory (default: VLMFLOW_MODEL__PATH)")
    model.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from workers.tiny_model import write_tiny_qwen2_vl
    except ImportError as exc:
        raise VlmflowError(
            f"writing the tiny model needs transformers ({exc.name} is missing): run scripts/engine-env.sh and "
            "use .venv-engine/bin/vlmflow"
        ) from None
    written = write_tiny_qwen2_vl(args.dir or settings.model.path)
    print(written)
    return 0
