"""A dataset recipe: which sources an export mixes, in which ratios, with which seed, for which model.

```yaml
name: flywheel-demo
seed: 7
eval_fraction: 0.1            # held out per source and task, before any resampling
target:
  family: qwen2-vl            # box convention of the answers (qwen2-vl: 0–1000 grid; qwen2.5-vl: pixels)
  model_name_or_path: Qwen/Qwen2-VL-7B-Instruct
  template: qwen2_vl          # LLaMA-Factory's chat template
  max_pixels: 1003520         # image_max_pixels of training; default: the settings' model.max_pixels
phases:
  phase1:                     # projector only: captions and domain descriptions 8:2
    size: 1000                # training examples; default: as many as the sources give without repeats
    sources:
      - {name: captions, kind: jsonl, path: data/captions.jsonl, ratio: 8}
      - {name: domain, kind: jsonl, path: s3://vlm-datasets/domain.jsonl, ratio: 2}
  phase2:                     # LoRA on the LLM, projector trainable: golden records and refusal negatives
    sources:
      - {name: golden, kind: golden, ratio: 8}             # the compacted topic; or path: a snapshot
      - {name: negatives, kind: negatives, of: golden, ratio: 2}
training:                     # optional: LLaMA-Factory arguments that replace the generated ones
  phase2: {lora_rank: 16, num_train_epochs: 2.0}
```

JSONL sources hold one example a line: `{"id"?, "task"?, "prompt", "images": [uri or {uri, width, height}],
"answer": text or object}`; golden snapshots (one `GoldenRecord` a line) are read the same way. Relative paths are
relative to the recipe file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import VlmflowError, first_error
from schemas.jobs import Task
from schemas.settings import ModelFamily

PhaseName = Literal["phase1", "phase2"]
NegativeKind = Literal["wrong_field", "missing_partition", "unsupported_capability"]
NEGATIVE_KINDS: tuple[NegativeKind, ...] = ("wrong_field", "missing_partition", "unsupported_capability")


class RecipeError(VlmflowError):
    """A recipe file that cannot be read or does not hold together; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Source(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    ratio: Annotated[float, Field(gt=0)]
    """Relative weight in its phase's mix (8 and 2 give 80% and 20%)."""


class JsonlSource(_Source):
    kind: Literal["jsonl"]
    path: str
    """A local file or `s3://bucket/key`."""
    task: Task = "caption"
    """The task of lines that do not name one."""


class GoldenSource(_Source):
    kind: Literal["golden"]
    path: str | None = None
    """A snapshot (local or `s3://`); None reads the compacted topic `vlm.golden` to its end."""


class NegativesSource(_Source):
    kind: Literal["negatives"]
    of: str
    """The source whose examples are turned into questions that must be refused."""
    kinds: list[NegativeKind] = list(NEGATIVE_KINDS)


Source = Annotated[JsonlSource | GoldenSource | NegativesSource, Field(discriminator="kind")]


class Phase(_Strict):
    size: Annotated[int, Field(ge=1)] | None = None
    """Training examples to draw; None: the largest mix that needs no source to repeat an example."""
    sources: Annotated[list[Source], Field(min_length=1)]

    @model_validator(mode="after")
    def _names_and_references(self) -> Phase:
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        for source in self.sources:
            if isinstance(source, NegativesSource):
                base = next((s for s in self.sources if s.name == source.of), None)
                if base is None or isinstance(base, NegativesSource):
                    raise ValueError(f"negatives source {source.name!r}: 'of' must name a golden or jsonl source")
        return self


class Target(_Strict):
    family: ModelFamily = "qwen2-vl"
    model_name_or_path: str = "Qwen/Qwen2-VL-7B-Instruct"
    template: str = "qwen2_vl"
    max_pixels: Annotated[int, Field(ge=3_136)] | None = None
    """LLaMA-Factory's `image_max_pixels`, which also fixes the resized size Qwen2.5-VL's pixel boxes refer to."""


class Recipe(_Strict):
    name: Annotated[str, Field(min_length=1)]
    seed: int
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    target: Target = Target()
    phases: Annotated[dict[PhaseName, Phase], Field(min_length=1)]
    training: dict[PhaseName, dict[str, Any]] = {}
    """LLaMA-Factory arguments per phase that replace (or add to) the generated training YAML."""


def load_recipe(path: Path) -> tuple[Recipe, Path]:
    """The recipe in `path` and the directory its relative paths start from."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not YAML: {str(exc).splitlines()[0]}") from None
    try:
        return Recipe.model_validate(data), path.resolve().parent
    except ValidationError as exc:
        where, message = first_error(exc)
        raise RecipeError(f"recipe {path}: {where}: {message}") from None
