"""Hard-case mining: explainable signals over one normalized log, weighted from config, summed into a score.

A log whose score reaches the threshold becomes a `HardCase`; its `priority` is the score in hundredths, so the
correction queue serves cases in score order (a corrected, unparseable answer before a merely slow one).

Signals (their weights live in `settings.streams.mining.weights`):

- `unparseable_output`: there was an answer and it is no JSON object or array (or the worker said `output_invalid`)
- `schema_violation`: the answer parsed, but a box or label in it could not be read
- `refusal`: the model refused a task it is meant to answer (`mining.capabilities`)
- `negative_feedback`: thumbs down
- `correction`: the user supplied the right answer
- `box_outside_image`: a box reaches past the image edge (beyond `box_tolerance_px`) or is inverted
- `low_confidence`: a `confidence` or `score` in the answer is below `mining.low_confidence`
- `retry`: the same request (tenant, images, prompt) was asked before
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from schemas.boxes import is_finite
from schemas.cases import HardCase, Signal
from schemas.logs import NormalizedLog
from schemas.settings import MiningSettings

CONFIDENCE_KEYS = ("confidence", "score")


def signals(log: NormalizedLog, config: MiningSettings) -> list[Signal]:
    """Every signal that fires for `log` and has a weight above zero, in a fixed order."""
    found: list[tuple[str, str]] = []
    if log.output is None and (log.output_error or log.error_code == "output_invalid"):
        found.append(("unparseable_output", log.output_error or "output_invalid"))
    elif log.output is not None and log.output_error:
        found.append(("schema_violation", log.output_error))
    refusal = _refusal_code(log.output)
    if refusal is not None and log.task in config.capabilities:
        found.append(("refusal", f"refused {log.task!r} with code {refusal!r}"))
    if log.feedback == "negative":
        found.append(("negative_feedback", "thumbs down"))
    if log.correction is not None:
        found.append(("correction", "the user gave the right answer"))
    outside, lowest = _boxes_outside_and_lowest_confidence(log, config.box_tolerance_px)
    if outside:
        found.append(("box_outside_image", f"{outside} box(es) outside the image or inverted"))
    if lowest is not None and lowest < config.low_confidence:
        found.append(("low_confidence", f"lowest confidence {lowest:g}"))
    if log.attempt > 0:
        found.append(("retry", f"{log.attempt} earlier tr{'y' if log.attempt == 1 else 'ies'} of the same request"))
    return [
        Signal(name=name, weight=config.weights[name], detail=detail[:300])
        for name, detail in found
        if config.weights.get(name, 0) > 0
    ]


def score(found: list[Signal]) -> float:
    return round(sum(signal.weight for signal in found), 3)


def priority(case_score: float) -> int:
    """The queue's ordering key: the score in hundredths (higher first)."""
    return max(0, round(case_score * 100))


def hard_case(log: NormalizedLog, config: MiningSettings, *, threshold: float) -> HardCase | None:
    """The hard case for `log` when its score reaches `threshold`; None otherwise."""
    found = signals(log, config)
    total = score(found)
    if not found or total < threshold:
        return None
    return HardCase(
        case_id=f"case-{log.log_id}", log_id=log.log_id, score=total, priority=priority(total), signals=found, log=log
    )


def _refusal_code(output: Any) -> str | None:
    if not isinstance(output, dict) or "refusal" not in output:
        return None
    refusal = output["refusal"]
    code = refusal.get("code") if isinstance(refusal, dict) else None
    return str(code) if code is not None else "unspecified"


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    """Every object in an answer, outermost first (answers are depth-limited by normalization)."""
    pending = [value]
    while pending:
        current = pending.pop()
        if isinstance(current, dict):
            yield current
            pending.extend(current.values())
        elif isinstance(current, list):
            pending.extend(current)


def _boxes_outside_and_lowest_confidence(log: NormalizedLog, tolerance: float) -> tuple[int, float | None]:
    """How many boxes reach past the image (when its size is known) or are inverted, and the lowest confidence in
    the answer: one walk over its objects for both."""
    size = log.images[0] if log.images else None
    width, height = (size.width, size.height) if size is not None else (None, None)
    count = 0
    lowest: float | None = None
    for item in _objects(log.output):
        box = item.get("bbox_xyxy")
        if (
            width is not None
            and height is not None
            and isinstance(box, list)
            and len(box) == 4
            and all(_is_number(value) for value in box)
        ):
            x1, y1, x2, y2 = box
            inside = -tolerance <= x1 < x2 <= width + tolerance and -tolerance <= y1 < y2 <= height + tolerance
            count += not inside
        for key in CONFIDENCE_KEYS:
            value = item.get(key)
            if value is not None and _is_number(value) and (lowest is None or value < lowest):
                lowest = float(value)
    return count, lowest


def _is_number(value: Any) -> bool:
    """A finite number a float can hold: an int beyond a float's range (JSON numbers have any number of digits)
    is not one here, rather than an `OverflowError`."""
    return isinstance(value, int | float) and not isinstance(value, bool) and is_finite(value)
