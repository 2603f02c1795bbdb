"""Label Studio labeling configs, one per task type, generated from the task's vocabulary.

Every config shows the case's prompt, signals and the bridge's last problem with the reviewer's annotation, asks
for a verdict on the model's answer (`correct`, `wrong`, `should refuse`; required) and a refusal code when it
should refuse, then shows the image with the answer, and a free comment (a refusal's message). The answer:

| task              | control                                                              |
| ----------------- | -------------------------------------------------------------------- |
| `detect`/`ground` | `RectangleLabels` named `label` with the configured labels plus `other` |
| `caption`         | `TextArea` named `answer`                                             |
| `extract`         | `TextArea` named `answer` holding the JSON, validated on return       |

Labels are compared trimmed and lowercased, as normalized logs carry them; the configured spelling is what the
config shows. The XML is built with ElementTree, so a label or prompt cannot break out of its attribute.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from typing import Literal, get_args

from schemas.jobs import Task
from schemas.tasks import REFUSAL_CODES

Verdict = Literal["correct", "wrong", "should refuse"]
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
OTHER_LABEL = "other"
"""The label a model's box gets when its label is not configured; its original label travels in the task data."""

IMAGE = "image"
"""Names of the config's tags; task data and annotation results refer to them."""
LABEL = "label"
ANSWER = "answer"
VERDICT = "verdict"
REFUSAL_CODE = "refusal_code"
COMMENT = "comment"

BOX_TASKS: frozenset[str] = frozenset({"detect", "ground"})
TEXT_TASKS: frozenset[str] = frozenset({"caption", "extract"})


def project_labels(configured: list[str]) -> list[str]:
    """The labels a box project offers: the configured ones, trimmed, lowercased, without repeats, then `other`."""
    labels: list[str] = []
    for label in configured:
        key = label.strip().lower()
        if key and key != OTHER_LABEL and key not in labels:
            labels.append(key)
    return [*labels, OTHER_LABEL]


def project_title(prefix: str, task: str) -> str:
    """One project per task type, found again by this title."""
    return f"{prefix} {task}"


def labeling_config(task: Task, labels: list[str]) -> str:
    """The labeling config XML of `task`'s project; `labels` as `project_labels` returns them."""
    view = ElementTree.Element("View")
    ElementTree.SubElement(view, "Header", value="$prompt", size="5")
    ElementTree.SubElement(view, "Text", name="signals", value="$signals")
    ElementTree.SubElement(view, "Text", name="review_problem", value="$review_problem")
    verdicts = ElementTree.SubElement(
        view, "Choices", name=VERDICT, toName=IMAGE, choice="single", required="true", showInline="true"
    )
    for verdict in VERDICTS:
        ElementTree.SubElement(verdicts, "Choice", value=verdict)
    refusal = ElementTree.SubElement(
        view, "View", visibleWhen="choice-selected", whenTagName=VERDICT, whenChoiceValue="should refuse"
    )
    codes = ElementTree.SubElement(refusal, "Choices", name=REFUSAL_CODE, toName=IMAGE, choice="single")
    for code in REFUSAL_CODES:
        ElementTree.SubElement(codes, "Choice", value=code)
    ElementTree.SubElement(view, "Image", name=IMAGE, value="$image", zoom="true", zoomControl="true")
    if task in BOX_TASKS:
        rectangles = ElementTree.SubElement(view, "RectangleLabels", name=LABEL, toName=IMAGE, canRotate="false")
        for label in labels:
            ElementTree.SubElement(rectangles, "Label", value=label)
    else:
        hint = "the caption" if task == "caption" else "the answer as JSON"
        ElementTree.SubElement(
            view, "TextArea", name=ANSWER, toName=IMAGE, rows="8" if task == "extract" else "3",
            maxSubmissions="1", editable="true", placeholder=hint,
        )  # fmt: skip
    ElementTree.SubElement(
        view, "TextArea", name=COMMENT, toName=IMAGE, rows="2", maxSubmissions="1", editable="true",
        placeholder="comment; when it should refuse, the refusal's message",
    )  # fmt: skip
    return ElementTree.tostring(view, encoding="unicode")
