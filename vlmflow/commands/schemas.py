"""`vlmflow schemas export DIR`: one JSON Schema per topic, for producers in other languages."""

from __future__ import annotations

import argparse
from pathlib import Path

from schemas.settings import Settings


def register(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("schemas", help="JSON Schemas of the topic values")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write <topic>.schema.json for every topic into DIR")
    export.add_argument("directory", type=Path, metavar="DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.export import export_json_schemas

    for path in export_json_schemas(args.directory):
        print(path)
    return 0
