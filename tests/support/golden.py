"""The golden agent in a child process of its own (`tests/support/golden_app.py`), and reading what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.cases import GoldenRecord
from schemas.settings import Settings
from schemas.topics import Topic
from tests.support.flywheel_worker import worker_env
from tests.support.ops_data import read_topic
from tests.support.processes import child_process

GOLDEN_APP = Path(__file__).with_name("golden_app.py")


def review_env(settings: Settings, queue_name: str) -> dict[str, str]:
    """`flywheel_worker.worker_env` with a Faust app and review queue of this test's own, and quick snapshots."""
    streams = settings.streams.model_copy(update={"app_id": f"golden-{queue_name}", "review_queue": queue_name})
    return {
        **worker_env(settings.model_copy(update={"streams": streams})),
        "VLMFLOW_STREAMS__GOLDEN_SNAPSHOT_INTERVAL_S": "3",
    }


@contextmanager
def golden_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with child_process([sys.executable, str(GOLDEN_APP)], {**os.environ, **env}, log_path) as process:
        yield process


def golden_records(
    settings: Settings, want: int, worker: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 90
) -> list[GoldenRecord]:
    """The records on vlm.golden once there are `want` of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [GoldenRecord.model_validate_json(r.value) for r in read_topic(settings, Topic.GOLDEN)]
        if len(records) >= want:
            return records
        problem = "the golden worker died" if worker.poll() is not None else None
        if problem is None and time.monotonic() > deadline:
            problem = f"{len(records)} golden records, want {want}"
        assert problem is None, f"{problem}:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)
