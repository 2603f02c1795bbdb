"""The flywheel: raw request logs → normalized, screened, deduplicated logs → hard cases → golden records.

`app` is the Faust worker (`vlmflow streams`) that holds the raw-log stage (`stage`) and the golden agent; those two
and the ledger's scan are the modules doing I/O with Kafka. The other modules are pure functions over pydantic
models (plus the Redis adapters of `dedupe`, `ledger` and `golden`, and the snapshot writer of `golden`), each
named after its concept.
"""

from streams.flywheel.dedupe import SeenStore, Sighting, content_hash
from streams.flywheel.golden import GoldenError, decide, golden_record, read_golden, snapshot
from streams.flywheel.mining import hard_case
from streams.flywheel.normalize import normalize
from streams.flywheel.pii import redact_log, redact_text
from streams.flywheel.rules import RulesError, RuleSet, load_rules
from streams.flywheel.screen import ScreenConfig, encode_outcome, rejection, screen

__all__ = [
    "GoldenError",
    "RuleSet",
    "RulesError",
    "ScreenConfig",
    "SeenStore",
    "Sighting",
    "content_hash",
    "decide",
    "encode_outcome",
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
