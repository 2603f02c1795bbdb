"""Submitting a reviewer's answer: the one place that orders the steps, so a correction is never lost.

A correction is published *before* its case leaves the queue: if the process dies in between, the lease lapses
and the case is served again (at least once; the golden agent adds no version for the same answer twice). The
answer is validated before the claim is touched, so a refused answer leaves the reviewer's lease as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from schemas.cases import Correction, CorrectionSource
from schemas.tasks import InvalidAnswer, JsonSchema, validate_answer
from streams.review.queue import ClaimLost, CorrectionQueue

log = logging.getLogger(__name__)

PUBLISH_GRACE_S = 60.0
"""The claim is renewed to last at least this long before publishing (a renewal never shortens a lease), so it
cannot lapse while the correction is on its way."""

Publish = Callable[[Correction], Awaitable[None]]
"""Sends one correction to `vlm.corrections.done` and returns once the broker acknowledged it."""


async def submit_correction(
    queue: CorrectionQueue,
    publish: Publish,
    *,
    case_id: str,
    token: str,
    answer: Any,
    reviewer: str,
    source: CorrectionSource = "human",
    task: str | None = None,
    output_schema: JsonSchema | None = None,
) -> Correction:
    """Validate `answer` for the claimed case and publish it as a correction, then take the case off the queue.

    Raises `ClaimLost` when the claim is not live, `InvalidAnswer` when the answer does not fit the task.
    """
    # Step 1. The claim is live (read, not renewed: a refused answer must not change the reviewer's lease).
    case = (await queue.held(case_id, token)).case
    # Step 2. The answer fits the task's schema (the reviewer's slip is caught here, not in a training run).
    task = task or case.log.task
    if task is None:
        raise InvalidAnswer(f"case {case_id} names no task; say which with --task")
    if not isinstance(answer, dict):
        raise InvalidAnswer(f"answer to {task!r}: expected a JSON object, got {type(answer).__name__}")
    validate_answer(task, answer, output_schema)
    correction = Correction(
        case_id=case.case_id,
        log_id=case.log_id,
        task=task,
        output=answer,
        source=source,
        reviewer=reviewer,
        case=case,
    )
    # Step 3. The claim outlives the publish: renewed to last at least PUBLISH_GRACE_S.
    await queue.renew(case_id, token, PUBLISH_GRACE_S)
    # Step 4. Published and acknowledged.
    await publish(correction)
    # Step 5. Off the queue. A claim lost only now still has its correction published: the case may be served
    # again, and a second answer becomes the record's next version.
    try:
        await queue.complete(case_id, token)
    except ClaimLost as exc:
        log.warning("correction of %s published, but the claim was lost before completing: %s", case_id, exc)
    return correction
