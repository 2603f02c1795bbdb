"""A stronger model's suggested answer for a hard case, which a person then confirms.

NOTE: this is the one module of `streams/` that imports from `workers/` beyond `workers.tokens`: a suggestion
is made by the same engine interface and image loader a worker serves with, so that the suggestion sees the image
exactly as the model in production does.
"""

from __future__ import annotations

from typing import Any

from schemas.cases import HardCase
from schemas.errors import VlmflowError
from schemas.settings import Settings
from schemas.tasks import MODEL_BOX_FIELD, task_schema
from streams.flywheel.model_output import normalize_objects
from workers.engines.base import EngineRequest
from workers.images import load_images


class SuggestError(VlmflowError):
    """A case the model cannot suggest an answer for: no fixed task schema, or an answer that is no object."""


async def suggest_answer(engine: Any, case: HardCase, settings: Settings, store: Any) -> dict[str, Any]:
    """Ask `engine` for the case's answer, constrained to its task's schema in the model's box convention, and
    bring boxes back to absolute pixels of the original image (the convention corrections are written in)."""
    log = case.log
    if log.task is None or log.task == "extract":
        raise SuggestError(f"case {case.case_id}: no fixed task schema to suggest with (task {log.task!r})")
    images = await load_images([image.uri for image in log.images], settings, store)
    schema = task_schema(log.task, box_field=MODEL_BOX_FIELD[settings.model.family])
    output = await engine.generate(
        EngineRequest(
            prompt=log.prompt, images=[i.image for i in images], json_schema=schema, images_at_final_size=True
        )
    )
    if not isinstance(output.parsed_json, dict):
        raise SuggestError(f"case {case.case_id}: the model's answer is no JSON object")
    first = images[0].size if images else None
    answer, problems = normalize_objects(
        output.parsed_json,
        width=first[0] if first else None,
        height=first[1] if first else None,
        synonyms=settings.streams.label_synonyms,
    )
    if problems or not isinstance(answer, dict):
        raise SuggestError(f"case {case.case_id}: the model's boxes cannot be read: {'; '.join(problems)}")
    return answer
