"""Screen raw records as a screening process does (`screen_record`: screen, encode, mine, hash) and print what came
of each: the probe that holds the compiled build equal to the sources (tests/integration/test_compiled_screen.py).

    PYTHONPATH=BUILD python tests/support/screen_outputs.py INPUTS

INPUTS holds one raw record a line, base64 (an empty line is a tombstone). Prints the build's name, then per
settings and record one line: every field of the `Screened` record as JSON, the encoded outcome and hard case in
base64 with their times blanked (`rejected_at`, `created_at`: the clock's, not the log's). Run by path, not with
`-m`: the checkout must not come first on `sys.path`, so that PYTHONPATH decides which build is imported.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

from schemas.settings import StreamsSettings
from schemas.topics import Topic
from streams.flywheel.screening import RawRecord, Rules, Screened, build_name, screen_record

_TIMES = re.compile(rb'"(\w+_at)":"[^"]*"')


def settings() -> list[StreamsSettings]:
    """Redaction on and off, and label synonyms."""
    synonyms = {"cat": "feline", "Dog": "canine", " person ": "human"}
    return [StreamsSettings(), StreamsSettings(redact_pii=False), StreamsSettings(label_synonyms=synonyms)]


def line(item: Screened) -> str:
    fields = item._asdict()
    for name in ("value", "case"):
        if fields[name] is not None:
            fields[name] = base64.b64encode(_TIMES.sub(rb'"\1":""', fields[name])).decode()
    return json.dumps(fields)


def main() -> None:
    lines = Path(sys.argv[1]).read_text().split("\n")[:-1]
    records = [RawRecord(Topic.LOGS_RAW, 0, offset, base64.b64decode(text) if text else None)
               for offset, text in enumerate(lines)]  # fmt: skip
    out = [build_name()]
    for streams in settings():
        rules = Rules.from_settings(streams)
        out.extend(line(screen_record(record, rules)) for record in records)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
