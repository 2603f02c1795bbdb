"""`vlmflow dataset export --recipe RECIPE.yaml --out DIR_OR_S3_PREFIX`: LLaMA-Factory training data."""

from __future__ import annotations

import argparse
from pathlib import Path

from schemas.settings import Settings


def register(subcommands: argparse._SubParsersAction) -> None:
    dataset = subcommands.add_parser("dataset", help="training data for LLaMA-Factory from the golden set")
    actions = dataset.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="mix, split and convert a recipe's sources into an export")
    export.add_argument("--recipe", type=Path, required=True, help="recipe YAML (see streams/dataset/recipe.py)")
    export.add_argument("--out", required=True, help="a new directory, or s3://bucket/prefix")
    dataset.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from streams.dataset.export import export_dataset
    from streams.dataset.recipe import load_recipe

    recipe, base_dir = load_recipe(args.recipe)
    summary = export_dataset(recipe, base_dir, args.out, settings)
    for phase, splits in summary.manifest["phases"].items():
        counts = ", ".join(f"{split} {numbers['examples']}" for split, numbers in splits.items())
        print(f"{phase}: {counts}")
    print(f"{len(summary.files)} files ({summary.manifest['images']} images) in {summary.out}")
    return 0
