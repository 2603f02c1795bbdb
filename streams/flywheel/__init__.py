"""The flywheel: raw request logs → normalized, screened, deduplicated logs → hard cases → golden records.

`app` is the Faust app that holds every agent (normalize, mine, enqueue, golden) and is the only module here that
does I/O with Kafka; the other modules are pure functions over pydantic models (plus the Redis adapter of
`dedupe` and the snapshot writer of `golden`), each named after its concept.
"""

from streams.flywheel.dedupe import SeenStore, Sighting, content_hash
from streams.flywheel.golden import GoldenError, golden_record, read_golden, snapshot
from streams.flywheel.mining import hard_case
from streams.flywheel.normalize import normalize
from streams.flywheel.pii import redact_log, redact_text
from streams.flywheel.rules import RulesError, RuleSet, load_rules
from streams.flywheel.screen import ScreenConfig, rejection, screen

__all__ = [
    "GoldenError",
    "RuleSet",
    "RulesError",
    "ScreenConfig",
    "SeenStore",
    "Sighting",
    "content_hash",
    "golden_record",
    "hard_case",
    "load_rules",
    "normalize",
    "read_golden",
    "redact_log",
    "redact_text",
    "rejection",
    "screen",
    "snapshot",
]
