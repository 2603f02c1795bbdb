"""Seeded, reproducible mixing of example pools: a train/eval split stratified by task, then quotas by ratio.

Every random choice draws from its own `random.Random` seeded with the recipe seed and the names of what it
chooses for (phase, split, source, task), so adding a source or a task changes no other source's draw.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any

from pydantic import BaseModel, ConfigDict

from schemas.errors import VlmflowError
from schemas.logs import ImageInfo


class MixError(VlmflowError):
    """A mix that cannot be drawn (a source with a ratio but no examples)."""


class Example(BaseModel):
    """One training example before it is written: a question about images and its answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    example_id: str
    """Stable across exports (a golden record id, a JSONL line's `id`, or `<source>:<line>`)."""
    source: str
    task: str
    prompt: str
    images: list[ImageInfo]
    answer: dict[str, Any] | str
    """JSON answers in the normalized convention (`bbox_xyxy` pixels); plain text for captions that are text."""


def seeded(seed: int, *names: str) -> random.Random:
    """A generator for one choice, independent of every other choice's draws."""
    return random.Random(":".join([str(seed), *names]))


def quotas(total: int, ratios: dict[str, float]) -> dict[str, int]:
    """`total` split by `ratios` with the largest-remainder method: the counts sum to `total` exactly; ties
    in the remainder go to the name that sorts first."""
    weight = sum(ratios.values())
    exact = {name: total * ratio / weight for name, ratio in ratios.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(ratios, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def natural_size(pool_sizes: dict[str, int], ratios: dict[str, float]) -> int:
    """The largest total whose quotas need no source to repeat an example."""

    def fits(total: int) -> bool:
        return all(count <= pool_sizes[name] for name, count in quotas(total, ratios).items())

    # NOTE: the proportional estimate is within a few of the answer either way, since quotas round.
    weight = sum(ratios.values())
    size = min(math.floor(pool_sizes[name] * weight / ratio) for name, ratio in ratios.items())
    while size < sum(pool_sizes.values()) and fits(size + 1):
        size += 1
    while size > 0 and not fits(size):
        size -= 1
    return size


def split_by_task(examples: list[Example], eval_fraction: float, rng_of: Any) -> tuple[list[Example], list[Example]]:
    """Train and eval parts of one source, each task split on its own (stratified): `round(n * eval_fraction)`
    examples of a task are held out, at least one when the fraction is not 0 and the task has two or more, and
    never all of them. `rng_of(task)` gives the task's generator."""
    by_task: dict[str, list[Example]] = defaultdict(list)
    for example in sorted(examples, key=lambda e: e.example_id):
        by_task[example.task].append(example)
    train: list[Example] = []
    evaluation: list[Example] = []
    for task in sorted(by_task):
        group = by_task[task]
        rng_of(task).shuffle(group)
        held_out = round(len(group) * eval_fraction)
        if eval_fraction > 0 and len(group) >= 2:
            held_out = max(1, held_out)
        held_out = min(held_out, len(group) - 1)
        evaluation += group[:held_out]
        train += group[held_out:]
    return train, evaluation


def draw(pool: list[Example], count: int, rng: random.Random) -> list[Example]:
    """`count` examples of `pool`: whole shuffled passes, then a sample of the rest, so no example repeats more
    than once beyond any other."""
    if count and not pool:
        raise MixError("cannot draw from an empty pool")
    ordered = sorted(pool, key=lambda e: e.example_id)
    drawn: list[Example] = []
    for _ in range(count // len(ordered) if ordered else 0):
        passed = list(ordered)
        rng.shuffle(passed)
        drawn += passed
    return drawn + rng.sample(ordered, count - len(drawn))


def mix(pools: dict[str, list[Example]], ratios: dict[str, float], size: int | None, rng_of: Any) -> list[Example]:
    """Draw `size` examples (None: the natural size) from `pools` by `ratios`, then shuffle them together.
    `rng_of(name)` gives the generator of a source's draw, `rng_of("")` the one of the final shuffle."""
    total = natural_size({name: len(pool) for name, pool in pools.items()}, ratios) if size is None else size
    mixed: list[Example] = []
    for name, count in sorted(quotas(total, ratios).items()):
        if count and not pools[name]:
            raise MixError(f"source {name!r} has no examples, but its ratio asks for {count}")
        mixed += draw(pools[name], count, rng_of(name))
    rng_of("").shuffle(mixed)
    return mixed
