"""Screen raw records and print what `encode_outcome` makes of each: the probe that holds the compiled build equal to
the sources (tests/integration/test_compiled_screen.py).

    PYTHONPATH=BUILD python tests/support/screen_outputs.py INPUTS

INPUTS holds one raw record a line, base64 (an empty line is a tombstone). Prints, per config and record, one line:
the outcome's bytes in base64 (the rejection time blanked), or `error <type>` when screening raised. Run by path,
not with `-m`: the checkout must not come first on `sys.path`, so that PYTHONPATH decides which build is imported.
"""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

from schemas.logs import Lineage
from schemas.settings import StreamsSettings
from schemas.topics import Topic
from streams.flywheel.screen import ScreenConfig, encode_outcome, screen
from streams.flywheel.screening import build_name

_REJECTED_AT = re.compile(rb'"rejected_at":"[^"]*"')


def configs() -> list[ScreenConfig]:
    """Redaction on and off, without and with label synonyms."""
    default = ScreenConfig.from_settings(StreamsSettings())
    synonyms = {"cat": "feline", "Dog": "canine", " person ": "human"}
    return [
        default,
        ScreenConfig(rules=default.rules, synonyms=default.synonyms, redact=False),
        ScreenConfig(rules=default.rules, synonyms=synonyms, redact=True),
    ]


def main() -> None:
    lines = Path(sys.argv[1]).read_text().split("\n")[:-1]
    records = [base64.b64decode(line) if line else None for line in lines]
    lineage = Lineage(topic=Topic.LOGS_RAW, partition=0, offset=0)
    out = [build_name()]
    for config in configs():
        for raw in records:
            try:
                _, value = encode_outcome(screen(raw, lineage=lineage, config=config), raw, config)
            except Exception as exc:  # the probe reports which error; the test compares them
                out.append(f"error {type(exc).__name__}")
                continue
            out.append(base64.b64encode(_REJECTED_AT.sub(b'"rejected_at":""', value)).decode())
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
