"""Negatives: questions about real images that must be refused, so the model learns to say so instead of
inventing an answer. Each comes from one base example and keeps its images and task; only the question and the
answer (a refusal, valid for every task's schema) change.

- `wrong_field`: asks for a field the answer does not have (an IBAN of a street scene, a VAT number of a cat)
- `missing_partition`: asks about a page the input does not have (page N+1.. of N images)
- `unsupported_capability`: asks for what a vision-language model answering in text cannot do (audio, editing)
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from schemas.tasks import RefusalCode
from streams.dataset.mixing import Example
from streams.dataset.recipe import NegativeKind

ABSENT_FIELDS = (
    "iban",
    "vat_number",
    "passport_number",
    "serial_number",
    "expiry_date",
    "blood_type",
    "wifi_password",
    "tracking_number",
)
"""Fields that plausible documents have but that a base answer without them cannot have read from its image."""

UNSUPPORTED_REQUESTS = (
    "Transcribe the audio track that goes with this image.",
    "Generate a new image in the same style as this one.",
    "Remove the background and return the edited image.",
    "Translate the speech in the video this frame comes from into French.",
    "Play the melody written on this page.",
)

_CODE: dict[NegativeKind, RefusalCode] = {
    "wrong_field": "unknown_field",
    "missing_partition": "missing_partition",
    "unsupported_capability": "unsupported_capability",
}


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def _question(kind: NegativeKind, base: Example, rng: random.Random) -> tuple[str, str] | None:
    """The question and the refusal message of one negative; None when `base` cannot give this kind."""
    if kind == "wrong_field":
        present = set(_keys(base.answer))
        candidates = [name for name in ABSENT_FIELDS if name not in present]
        if not candidates:
            return None
        field = rng.choice(candidates)
        return (
            f'Read the field "{field}" from the image and answer with its value.',
            f'The image shows no field "{field}".',
        )
    if kind == "missing_partition":
        pages = len(base.images)
        page = pages + rng.randint(1, 3)
        plural = "s" if pages != 1 else ""
        return (
            f"Look at page {page} only. {base.prompt}".strip(),
            f"The input has {pages} page{plural}; page {page} is not part of it.",
        )
    request = rng.choice(UNSUPPORTED_REQUESTS)
    return request, "I can only answer questions about the given images in text; I cannot do that."


def negatives(base: list[Example], kinds: list[NegativeKind], *, source: str, rng: random.Random) -> list[Example]:
    """One negative of each kind for each base example (where the kind applies), in base-id order."""
    made = []
    for example in sorted(base, key=lambda e: e.example_id):
        for kind in kinds:
            question = _question(kind, example, rng)
            if question is None:
                continue
            prompt, message = question
            made.append(
                Example(
                    example_id=f"{example.example_id}~{kind}",
                    source=source,
                    task=example.task,
                    prompt=prompt,
                    images=example.images,
                    answer={"refusal": {"code": _CODE[kind], "message": message}},
                )
            )
    return made
