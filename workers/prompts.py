"""The text of each task's prompt. The answer's shape is enforced by the task schema; the prompt says what to
look for and how boxes are written, since the model cannot see the schema's key names' meaning."""

from __future__ import annotations

from schemas.jobs import ImageJob
from schemas.tasks import BoxField

BOX_CONVENTIONS: dict[BoxField, str] = {
    "box_1000": "on a 0-1000 grid over the image, [x1, y1, x2, y2] from the top-left to the bottom-right corner",
    "bbox_2d": "in pixels of the image as you see it, [x1, y1, x2, y2] from the top-left to the bottom-right corner",
    "bbox_xyxy": "in pixels of the original image, [x1, y1, x2, y2] from the top-left to the bottom-right corner",
}
REFUSE = "If the image does not allow an answer, refuse with a refusal code and a short reason instead of guessing."


class MissingPrompt(ValueError):
    """A task that needs the job's prompt (`ground`: the element to find) got none."""


def task_prompt(job: ImageJob, box_field: BoxField) -> str:
    """The user text for `job`: the task's instruction, then the job's own prompt where the task takes one."""
    boxes = f'Write each box as "{box_field}" {BOX_CONVENTIONS[box_field]}.'
    extra = f"\n{job.prompt}" if job.prompt else ""
    if job.task == "detect":
        return f"Detect the objects in the image and label each one. {boxes} {REFUSE}{extra}"
    if job.task == "ground":
        if not job.prompt:
            raise MissingPrompt("task 'ground' needs a prompt that names the element to find")
        return f"Find this element in the image and give its box: {job.prompt}\n{boxes} {REFUSE}"
    if job.task == "caption":
        return f"Describe the image in one or two sentences. {REFUSE}{extra}"
    return f"Extract from the image the information the answer's JSON fields ask for. {REFUSE}{extra}"
