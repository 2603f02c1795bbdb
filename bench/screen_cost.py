"""CPU time of `streams.flywheel.screen.screen` per raw log, in this process, one thread.

    python bench/screen_cost.py MESSAGES_FILE [--passes 5]

MESSAGES_FILE holds one raw log a line, base64. Prints one JSON line: `{"us_per_record": ..., "records": ...,
"compiled": ...}`, the best of `--passes` passes (thread CPU time, so that other processes on a shared machine count
for little); `compiled` says whether `screen` came from an extension (the mypyc build) or from its source.
`bench.bench_streams` runs it on this checkout and, with `--baseline-tree`, on another one (an earlier commit) with
the same messages, so the two figures come from the same run.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

from schemas.logs import Lineage
from schemas.settings import StreamsSettings
from schemas.topics import Topic
from streams.flywheel.screen import ScreenConfig, screen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("messages", type=Path)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    values = [base64.b64decode(line) for line in args.messages.read_text().splitlines()]
    config = ScreenConfig.from_settings(StreamsSettings())
    lineage = Lineage(topic=Topic.LOGS_RAW, partition=0, offset=0)
    best = float("inf")
    for _ in range(args.passes):
        started = time.thread_time()
        for value in values:
            screen(value, lineage=lineage, config=config)
        best = min(best, (time.thread_time() - started) / len(values) * 1e6)
    # NOTE: `streams.flywheel.screening.compiled` asks the same, but a baseline tree (an earlier commit) lacks it.
    compiled = not str(sys.modules[screen.__module__].__file__).endswith(".py")
    print(json.dumps({"us_per_record": round(best, 1), "records": len(values), "compiled": compiled}))


if __name__ == "__main__":
    main()
