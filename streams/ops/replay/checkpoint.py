"""A replay's checkpoint: how far it has confirmably got, in a JSON file under `state_dir/replays/<id>.json`.

The file is replaced atomically (write a temporary file, fsync, rename), so a crash leaves the old checkpoint or
the new one, never a torn one. What it says is true when written: replay.py writes it only after the producer
flushed every record it counts.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import first_error
from schemas.settings import Settings
from streams.ops.replay.plan import ReplayError, ReplayPlan, check_replay_id


class ReplayCounts(BaseModel):
    """Records by what became of them, summed over every run of one replay."""

    model_config = ConfigDict(extra="forbid")

    scanned: int = 0
    """Records read from the source ranges."""
    outside_window: int = 0
    """Timestamp outside `[from, to)`."""
    filtered_out: int = 0
    """In the window, but the filter did not match (this includes values it could not read)."""
    unreadable: int = Field(default=0, validation_alias=AliasChoices("unreadable", "not_json"))
    """Of `filtered_out`: values the filter could not read (not UTF-8 JSON, nested too deeply, an integer over
    Python's digit limit), skipped and reported. (Checkpoints before this name called it `not_json`.)"""
    sent: int = 0
    """Sent to the destination (in a dry run: would have been sent)."""
    already_delivered: int = 0
    """Found at the destination on resume, sent by a run that stopped before its checkpoint: not sent again."""


class ReplayCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: ReplayPlan
    next_offsets: dict[int, int]
    """source partition -> the first offset whose fate is not yet confirmed (everything before it was sent and
    acknowledged, or deliberately skipped)."""
    destination_marks: dict[int, int]
    """destination partition -> an offset at or after which every record this replay sent since the checkpoint
    must lie (its acknowledged end at the checkpoint, or the partition's end when the replay began). A resume
    reads from here to find records that arrived after the checkpoint."""
    counts: ReplayCounts = ReplayCounts()
    done: bool = False
    updated_at: datetime

    @property
    def remaining(self) -> int:
        return sum(max(0, r.end - self.next_offsets[p]) for p, r in self.plan.ranges.items())


def checkpoint_path(settings: Settings, replay_id: str) -> Path:
    return settings.state_dir / "replays" / f"{check_replay_id(replay_id)}.json"


def save_checkpoint(settings: Settings, checkpoint: ReplayCheckpoint) -> Path:
    path = checkpoint_path(settings, checkpoint.plan.replay_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(checkpoint.model_dump_json(indent=2))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return path


def load_checkpoint(settings: Settings, replay_id: str) -> ReplayCheckpoint:
    path = checkpoint_path(settings, replay_id)
    try:
        return ReplayCheckpoint.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReplayError(f"no replay {replay_id!r}: {path} does not exist") from None
    except ValidationError as exc:
        raise ReplayError(f"checkpoint {path} is not readable: {': '.join(first_error(exc))}") from None
