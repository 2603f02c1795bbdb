"""Dataset export: a recipe (YAML) → seeded, mixed examples from the golden set, JSONL files and negatives →
LLaMA-Factory sharegpt files, `dataset_info.json` and the two-phase training YAMLs, in a directory or in S3.

Everything but `export` is pure; the same seed gives byte-identical files.
"""

from streams.dataset.export import ExportError, ExportSummary, export_dataset
from streams.dataset.mixing import Example, MixError, mix
from streams.dataset.negatives import negatives
from streams.dataset.recipe import Recipe, RecipeError, load_recipe

__all__ = [
    "Example",
    "ExportError",
    "ExportSummary",
    "MixError",
    "Recipe",
    "RecipeError",
    "export_dataset",
    "load_recipe",
    "mix",
    "negatives",
]
