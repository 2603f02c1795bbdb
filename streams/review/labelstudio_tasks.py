"""Cases to Label Studio tasks and annotations back to answers: pure functions, no I/O.

Out: a `HardCase` becomes a task whose data holds the image URI, the prompt, the case's signals and priority (so
reviewers can sort by them) and the model's answer as a prediction, boxes converted from absolute pixels of the
original image (`bbox_xyxy`) to Label Studio's percent of the image:

    x = x1 / W · 100,  y = y1 / H · 100,  width = (x2 − x1) / W · 100,  height = (y2 − y1) / H · 100

A model's label that is not configured becomes `other`; the original travels in the task data under the region's
id, and comes back when the reviewer leaves the region labelled `other`.

Back: an annotation's results are hostile until checked. Each problem raises `InvalidAnnotation` with one line a
reviewer can act on: no verdict, a region without a label or with one the project does not have, a box outside
the image (beyond `tolerance_px`; within it the box is clamped), a rotated box, a ground answer with other than
one box, an empty caption, extract text that is not a JSON object. The answer is then validated against the
task's schema (`schemas.tasks.validate_answer`), boxes as `bbox_xyxy` rounded to 0.1 px.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.cases import HardCase
from schemas.errors import VlmflowError, first_error
from schemas.jobs import TASKS, Task
from schemas.tasks import InvalidAnswer, validate_answer
from streams.review.labelstudio_config import (
    ANSWER,
    BOX_TASKS,
    COMMENT,
    IMAGE,
    LABEL,
    OTHER_LABEL,
    REFUSAL_CODE,
    VERDICT,
    VERDICTS,
    Verdict,
)

EXTRACT_SCHEMA: dict[str, Any] = {"type": "object"}
"""What an extract answer is checked against: normalized logs do not keep the job's own `output_schema`."""
MAX_TEXT_CHARS = 64_000
"""A text answer (caption, extract JSON) longer than this is refused before it is parsed."""
MAX_REGIONS = 500
"""An annotation with more boxes than this is refused (no detect answer needs them; each is checked)."""
MAX_PROMPT_CHARS = 4_000
"""Text shown in a task (prompt, model output) is cut to this."""
DEFAULT_REFUSAL_MESSAGE = "a reviewer judged that the question cannot be answered from the image"


class InvalidAnnotation(VlmflowError, ValueError):
    """An annotation that cannot become a correction; the message is shown to the reviewer on the task."""


class UnsupportedCase(VlmflowError, ValueError):
    """A case Label Studio cannot show: no task, an unknown task, or other than one image."""


@dataclass(frozen=True)
class ImageSize:
    width: int
    height: int


def case_task(case: HardCase) -> Task:
    """The case's task type, or `UnsupportedCase` saying why Label Studio cannot show it."""
    task = next((known for known in TASKS if known == case.log.task), None)
    if task is None:
        raise UnsupportedCase(
            f"case {case.case_id}: task {case.log.task!r} has no Label Studio project; review it in the CLI"
        )
    if len(case.log.images) != 1:
        raise UnsupportedCase(
            f"case {case.case_id}: {len(case.log.images)} images; Label Studio shows one, review it in the CLI"
        )
    return task


def case_image_size(case: HardCase) -> ImageSize | None:
    image = case.log.images[0]
    if image.width is None or image.height is None:
        return None
    return ImageSize(image.width, image.height)


# -- out: case → task ------------------------------------------------------------------------------------------


def xyxy_to_percent(box: list[float], size: ImageSize) -> dict[str, float]:
    """Absolute pixels `[x1, y1, x2, y2]` of the original image → Label Studio's `x, y, width, height` in percent."""
    x1, y1, x2, y2 = box
    return {
        "x": x1 / size.width * 100,
        "y": y1 / size.height * 100,
        "width": (x2 - x1) / size.width * 100,
        "height": (y2 - y1) / size.height * 100,
    }


def percent_to_xyxy(value: dict[str, float], size: ImageSize) -> list[float]:
    """The inverse of `xyxy_to_percent`, rounded to 0.1 px as normalized boxes are."""
    x1 = value["x"] / 100 * size.width
    y1 = value["y"] / 100 * size.height
    x2 = (value["x"] + value["width"]) / 100 * size.width
    y2 = (value["y"] + value["height"]) / 100 * size.height
    return [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)]


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _predicted_boxes(task: Task, output: Any) -> list[tuple[list[float], str | None]]:
    """The model's boxes with their labels; objects whose box could not be read are left out."""
    if not isinstance(output, dict):
        return []
    if task == "ground":
        box, label = output.get("bbox_xyxy"), output.get("label")
        if not isinstance(box, list) or not _is_box(box):
            return []
        return [(box, label if isinstance(label, str) else None)]
    objects = output.get("objects")
    found = []
    for item in objects if isinstance(objects, list) else []:
        if isinstance(item, dict) and _is_box(item.get("bbox_xyxy")):
            label = item.get("label")
            found.append((item["bbox_xyxy"], label if isinstance(label, str) else None))
    return found


def _prediction_result(
    case: HardCase, task: Task, labels: list[str], size: ImageSize | None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The model's answer as prediction results, and region id → the model's label where it became `other`."""
    log = case.log
    if task in BOX_TASKS:
        if size is None:
            return [], {}
        results, origin = [], {}
        for index, (box, label) in enumerate(_predicted_boxes(task, log.output)):
            key = (label or "").strip().lower()
            shown = key if key in labels else OTHER_LABEL
            region_id = f"m{index}"
            if shown == OTHER_LABEL and key and key != OTHER_LABEL:
                origin[region_id] = key
            results.append(
                {
                    "id": region_id,
                    "from_name": LABEL,
                    "to_name": IMAGE,
                    "type": "rectanglelabels",
                    "original_width": size.width,
                    "original_height": size.height,
                    "image_rotation": 0,
                    "value": {**xyxy_to_percent(box, size), "rotation": 0, "rectanglelabels": [shown]},
                }
            )
        return results, origin
    if task == "caption" and isinstance(log.output, dict) and isinstance(log.output.get("caption"), str):
        text = log.output["caption"]
    elif task == "extract" and log.output is not None:
        text = json.dumps(log.output, indent=2, ensure_ascii=False)
    else:
        text = log.output_text or ""
    if not text:
        return [], {}
    return [{"id": "m0", "from_name": ANSWER, "to_name": IMAGE, "type": "textarea", "value": {"text": [text]}}], {}


def signals_text(case: HardCase) -> str:
    """The case's signals in one line, strongest first."""
    ordered = sorted(case.signals, key=lambda signal: -signal.weight)
    return "; ".join(f"{s.name} (+{s.weight:g}){f': {s.detail}' if s.detail else ''}" for s in ordered)


def task_payload(case: HardCase, labels: list[str], size: ImageSize | None, model_version: str) -> dict[str, Any]:
    """The task to import for `case` (data and the model's answer as a prediction). `size` is the image's, from
    the log or read from the store; without it no box can be placed."""
    task = case_task(case)
    results, origin = _prediction_result(case, task, labels, size)
    data = {
        IMAGE: case.log.images[0].uri,
        "case_id": case.case_id,
        "task": task,
        "priority": case.priority,
        "score": case.score,
        "signals": signals_text(case),
        "prompt": case.log.prompt[:MAX_PROMPT_CHARS] or "(no prompt)",
        "tenant": case.log.tenant,
        "model": case.log.model or "",
        "model_output": (case.log.output_text or "")[:MAX_PROMPT_CHARS],
        "review_problem": "",
        "vlmflow": {
            "origin_labels": origin,
            "width": size.width if size else None,
            "height": size.height if size else None,
        },
    }
    payload: dict[str, Any] = {"data": data}
    if results:
        payload["predictions"] = [{"model_version": model_version, "result": results}]
    return payload


def problem_text(message: str) -> str:
    """What the task's `review_problem` shows after the bridge refused an annotation."""
    return f"Not accepted: {message}. Fix it and submit again (Update)."


# -- back: annotation → answer ---------------------------------------------------------------------------------


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _RectangleValue(_Loose):
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0
    rectanglelabels: list[str] = []


class _ChoicesValue(_Loose):
    choices: list[str]


class _TextValue(_Loose):
    text: list[str]


class _Result(_Loose):
    id: str | None = None
    from_name: str
    type: str
    value: dict[str, Any]
    original_width: int | None = Field(default=None, ge=1)
    original_height: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class ReviewedAnswer:
    """What a reviewer's annotation says: the verdict on the model's answer and the corrected answer."""

    verdict: Verdict
    answer: dict[str, Any]


def _parse(model: type[_Loose], value: Any, what: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        where, message = first_error(exc, top=what)
        raise InvalidAnnotation(f"{what}: {where} {message}".strip()) from None


def _single_choice(results: list[_Result], name: str) -> str | None:
    values = [_parse(_ChoicesValue, r.value, name).choices for r in results if r.from_name == name]
    chosen = [choice for value in values for choice in value]
    if len(chosen) > 1:
        raise InvalidAnnotation(f"{name}: pick one, not {len(chosen)}")
    return chosen[0] if chosen else None


def _text(results: list[_Result], name: str) -> str:
    texts = [t for r in results if r.from_name == name for t in _parse(_TextValue, r.value, name).text]
    text = "\n".join(texts).strip()
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidAnnotation(f"{name}: {len(text)} characters, limit {MAX_TEXT_CHARS}")
    return text


def _edge(value: float, limit: float, tolerance: float, what: str, region: str) -> float:
    if value < -tolerance or value > limit + tolerance:
        raise InvalidAnnotation(f"region {region}: box {what} {value:.1f} px is outside the image (0 to {limit} px)")
    return min(limit, max(0.0, value))


def _region_box(result: _Result, size: ImageSize, tolerance_px: float) -> list[float]:
    region = result.id or "?"
    value = _parse(_RectangleValue, result.value, f"region {region}")
    if abs(value.rotation) > 1e-6:
        raise InvalidAnnotation(f"region {region}: rotated boxes are not supported; draw it upright")
    if not all(math.isfinite(v) for v in (value.x, value.y, value.width, value.height)):
        raise InvalidAnnotation(f"region {region}: box coordinates are not finite numbers")
    if value.width <= 0 or value.height <= 0:
        raise InvalidAnnotation(f"region {region}: box has no area")
    x1, y1, x2, y2 = percent_to_xyxy(value.model_dump(), size)
    return [
        round(_edge(x1, size.width, tolerance_px, "left", region), 1),
        round(_edge(y1, size.height, tolerance_px, "top", region), 1),
        round(_edge(x2, size.width, tolerance_px, "right", region), 1),
        round(_edge(y2, size.height, tolerance_px, "bottom", region), 1),
    ]


def _region_label(result: _Result, labels: list[str], origin_labels: dict[str, str]) -> str:
    region = result.id or "?"
    chosen = _parse(_RectangleValue, result.value, f"region {region}").rectanglelabels
    if len(chosen) != 1:
        raise InvalidAnnotation(f"region {region}: give the box exactly one label, not {len(chosen)}")
    label = chosen[0].strip().lower()
    if label not in labels:
        raise InvalidAnnotation(f"region {region}: label {chosen[0][:60]!r} is not one of {', '.join(labels)}")
    if label == OTHER_LABEL:
        if result.id in origin_labels:
            return origin_labels[result.id]
        raise InvalidAnnotation(f"region {region}: labelled {OTHER_LABEL!r} with no model label to keep; pick a label")
    return label


def _boxes(
    results: list[_Result], labels: list[str], origin_labels: dict[str, str], size: ImageSize, tolerance_px: float
) -> list[tuple[list[float], str]]:
    regions = [r for r in results if r.from_name == LABEL]
    if len(regions) > MAX_REGIONS:
        raise InvalidAnnotation(f"{len(regions)} boxes, limit {MAX_REGIONS}")
    for region in regions:
        if region.type != "rectanglelabels":
            raise InvalidAnnotation(f"region {region.id or '?'}: a {region.type[:40]} region; draw boxes only")
    return [(_region_box(r, size, tolerance_px), _region_label(r, labels, origin_labels)) for r in regions]


def _size_of(results: list[_Result], size: ImageSize | None) -> ImageSize:
    """The case's image size, else the one Label Studio measured when the reviewer drew."""
    if size is not None:
        return size
    for result in results:
        if result.original_width and result.original_height:
            return ImageSize(result.original_width, result.original_height)
    raise InvalidAnnotation("the image size is unknown (the case has none and the boxes carry none)")


def _no_constants(name: str) -> Any:
    raise InvalidAnnotation(f"{ANSWER}: {name} is not JSON")


def _extract_json(text: str) -> dict[str, Any]:
    if not text:
        raise InvalidAnnotation(f"{ANSWER}: empty; write the answer as a JSON object")
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise InvalidAnnotation(f"{ANSWER}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise InvalidAnnotation(f"{ANSWER}: nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidAnnotation(f"{ANSWER}: a JSON {type(value).__name__}, not an object")
    return value


def annotation_answer(
    task: Task,
    results: Any,
    *,
    labels: list[str],
    origin_labels: dict[str, str],
    size: ImageSize | None,
    tolerance_px: float,
) -> ReviewedAnswer:
    """The reviewer's answer in vlmflow's convention (`bbox_xyxy`), validated against the task's schema.

    `results` is the annotation's `result` list as Label Studio returns it; `labels` the project's labels
    (`project_labels`). Raises `InvalidAnnotation` naming the first problem."""
    if not isinstance(results, list):
        raise InvalidAnnotation("the annotation has no result list")
    parsed = [_parse(_Result, item, "result") for item in results]
    chosen = _single_choice(parsed, VERDICT)
    verdict = next((known for known in VERDICTS if known == chosen), None)
    if verdict is None:
        raise InvalidAnnotation(f"{VERDICT}: pick one of {', '.join(VERDICTS)}")
    comment = _text(parsed, COMMENT)
    answer: dict[str, Any]
    if verdict == "should refuse":
        code = _single_choice(parsed, REFUSAL_CODE) or "other"
        answer = {"refusal": {"code": code, "message": (comment or DEFAULT_REFUSAL_MESSAGE)[:500]}}
    elif task in BOX_TASKS:
        boxes = _boxes(parsed, labels, origin_labels, _size_of(parsed, size), tolerance_px)
        if task == "detect":
            answer = {"objects": [{"label": label, "bbox_xyxy": box} for box, label in boxes]}
        elif len(boxes) != 1:
            raise InvalidAnnotation(f"a ground answer is one box, not {len(boxes)}")
        else:
            answer = {"bbox_xyxy": boxes[0][0], "label": boxes[0][1]}
    elif task == "caption":
        caption = _text(parsed, ANSWER)
        if not caption:
            raise InvalidAnnotation(f"{ANSWER}: the caption is empty")
        answer = {"caption": caption}
    else:
        answer = _extract_json(_text(parsed, ANSWER))
    try:
        validate_answer(task, answer, EXTRACT_SCHEMA if task == "extract" else None)
    except InvalidAnswer as exc:
        raise InvalidAnnotation(str(exc)) from None
    return ReviewedAnswer(verdict, answer)
