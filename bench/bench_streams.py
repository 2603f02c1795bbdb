"""Benchmark: the flywheel worker (`vlmflow streams`) against Quix Streams applying the same `screen` per record,
over the same raw messages, in the same run, on a broker and Redis of its own; and the CPU cost of `screen`.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[dev,bench]'   # Quix: pins pydantic<2.14
    python -m bench.bench_streams [--count 20000] [--rounds 3] [--seed 3] [--baseline-tree DIR]

Both arms read the same `--count` mixed raw logs (every source format, broken logs, rule violations, duplicates,
PII) from offset 0 of vlm.logs.raw, each in a child process of its own, alternating round by round:

- Quix Streams (`bench.quix_screen`): screen each record and write its encoded outcome, keyed by log id, to one of
  two topics; nothing else.
- the flywheel worker: screen, and also dedupe and count tries in Redis, mine hard cases, queue them in Redis, keep
  the exactly-once ledger, write hard cases too, and run the golden agent beside.

Both arms run the compiled build that production images run (setup.py, `VLMFLOW_COMPILE=1`), installed first into
a directory of the run's own (about a minute) and put first on PYTHONPATH; `--pure` runs the checkout as it is.

An arm's throughput is messages / the time between its first and its last output record of the round (producer
timestamps), so process start and group joins are not counted. Prints each round, the median ratio agents ÷ Quix,
and the CPU µs per record of `screen` (`bench/screen_cost.py`: one thread, best of 5 passes, three turns per build
taken in alternation), compiled and in pure Python; with `--baseline-tree` also that of another checkout (e.g.
`git archive ceba6c7 | tar -x -C /tmp/before`) on the same messages, and the ratios.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from schemas.settings import Settings, load_settings
from schemas.topics import TOPICS, Topic, TopicSpec
from tests.support.compiled import build_compiled
from tests.support.flywheel_data import PlannedLog, mixed_raw_logs
from tests.support.flywheel_worker import Records, produce, read_topics, streams_worker
from vlmflow.kafka_admin import create_topics
from vlmflow.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]
QUIX_OUT = ("bench.quix.normalized", "bench.quix.rejected")
AGENT_OUT = (Topic.LOGS_NORMALIZED, Topic.LOGS_REJECTED)
WAIT_S = 600.0
COST_TURNS = 3
"""Turns of `bench/screen_cost.py` per build."""
_COUNTS = re.compile(r"flywheel: normalized (\d+), rejected (\d+)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rate(found: Records, topics: tuple[str, ...], since_ms: int, count: int) -> float:
    """Messages per second between the first and the last output record written since `since_ms`."""
    stamps = [record.timestamp for name in topics for record in found[name] if record.timestamp >= since_ms]
    assert len(stamps) >= count, f"{len(stamps)} outputs on {topics}, expected {count}"
    return count / (max(1, max(stamps) - min(stamps)) / 1000)


def _outputs(settings: Settings, topics: tuple[str, ...], since_ms: int, count: int) -> Records:
    def written(found: Records) -> bool:
        return sum(1 for name in topics for record in found[name] if record.timestamp >= since_ms) >= count

    return read_topics(settings, list(topics), written, 120)


def quix_round(settings: Settings, count: int, log_path: Path) -> float:
    since_ms = int(time.time() * 1000)
    command = [sys.executable, str(REPO / "bench" / "quix_screen.py"), "--bootstrap", settings.kafka.bootstrap_servers,
               "--group", f"bench-quix-{uuid.uuid4().hex[:8]}", "--count", str(count),
               "--normalized", QUIX_OUT[0], "--rejected", QUIX_OUT[1]]  # fmt: skip
    with log_path.open("wb") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=WAIT_S)
    assert result.returncode == 0, log_path.read_text()[-3000:]
    _check_build(log_path)
    return _rate(_outputs(settings, QUIX_OUT, since_ms, count), QUIX_OUT, since_ms, count)


def agents_round(settings: Settings, count: int, log_path: Path) -> float:
    """`vlmflow streams` with an app id of its own (a fresh group, ledger and dedupe state), until its progress
    line counts `count` screened messages (read from its log, so the wait costs the worker no CPU)."""
    unique = uuid.uuid4().hex[:8]
    streams = settings.streams.model_copy(update={"app_id": f"bench-{unique}", "review_queue": f"bench-{unique}"})
    settings = settings.model_copy(update={"streams": streams})
    since_ms = int(time.time() * 1000)
    with streams_worker(settings, log_path) as worker:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and worker.poll() is None:
            found = _COUNTS.findall(log_path.read_text())
            if found and sum(map(int, found[-1])) >= count:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the streams worker did not finish; see {log_path}")
    _check_build(log_path)
    return _rate(_outputs(settings, AGENT_OUT, since_ms, count), AGENT_OUT, since_ms, count)


def _check_build(log_path: Path) -> None:
    """An arm's log names the screening build it ran (`build_name`): the one this run asked for."""
    expected = "pure Python" if os.environ.get("PYTHONPATH") is None else "compiled (mypyc)"
    assert expected in log_path.read_text(), f"{log_path} does not say it screened {expected}"


def screen_cost_us(messages: Path, tree: Path, *, compiled: bool = False) -> float:
    """CPU µs per record of `screen` as the checkout (or build) at `tree` has it, on the messages in `messages`;
    `compiled`: whether that is the compiled build (checked)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    script = REPO / "bench" / "screen_cost.py"
    output = subprocess.run([sys.executable, str(script), str(messages)], env=env, cwd=tree, check=True,
                            capture_output=True, text=True, timeout=WAIT_S).stdout  # fmt: skip
    result = json.loads(output.splitlines()[-1])
    assert result["compiled"] == compiled, f"{tree}: expected {'the compiled' if compiled else 'a pure'} build"
    return float(result["us_per_record"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout whose `screen` is measured too")
    parser.add_argument("--pure", action="store_true", help="run the checkout in pure Python, not compiled")
    args = parser.parse_args()
    baseline = args.baseline_tree.resolve() if args.baseline_tree is not None else None
    os.environ.pop("PYTHONPATH", None)

    with tempfile.TemporaryDirectory(prefix="bench-streams-") as state:
        build = REPO
        if not args.pure:
            print("building the compiled screening (mypyc, about a minute)", flush=True)
            build = build_compiled(Path(state) / "compiled")
            # NOTE: inherited by every child: the Quix arm, the streams worker and its screening processes. They
            # start in the state directory: `python -m` puts the working directory first on `sys.path`, where the
            # checkout's sources would come before the build.
            os.environ["PYTHONPATH"] = str(build)
            os.chdir(state)
        settings = load_settings(
            state_dir=state,
            kafka={"bootstrap_servers": f"127.0.0.1:{_free_port()}", "session_timeout_ms": 6000},
            redis={"url": f"redis://127.0.0.1:{_free_port()}/0"},
            streams={"progress_interval_s": 1},
        )
        stack = LocalStack(settings, only=("kafka", "redis"))
        stack.up()
        try:
            create_topics(settings)
            create_topics(settings, [TopicSpec(name, "log_id", None, TOPICS[AGENT_OUT[i]].partitions)
                                     for i, name in enumerate(QUIX_OUT)])  # fmt: skip
            logs = mixed_raw_logs(args.count, seed=args.seed)
            produce(settings, logs)
            print(f"messages: {args.count} mixed raw logs (seed {args.seed}), {os.cpu_count()} CPUs, screening "
                  f"{'pure Python' if args.pure else 'compiled'}", flush=True)  # fmt: skip
            ratios = []
            for round_number in range(1, args.rounds + 1):
                quix = quix_round(settings, args.count, Path(state) / f"quix-{round_number}.log")
                agents = agents_round(settings, args.count, Path(state) / f"streams-{round_number}.log")
                ratios.append(agents / quix)
                print(f"round {round_number}: Quix Streams + screen {quix:7.0f} msg/s, vlmflow streams "
                      f"{agents:7.0f} msg/s, agents ÷ Quix {agents / quix:.2f}", flush=True)  # fmt: skip
            print(f"agents ÷ Quix (median of {args.rounds} rounds): {statistics.median(ratios):.2f}")
            messages = Path(state) / "messages.b64"
            messages.write_text("".join(base64.b64encode(log.value).decode() + "\n" for log in _sample(logs)))
            trees = {"this checkout, compiled": (build, True)} if build != REPO else {}
            trees["this checkout, pure Python"] = (REPO, False)
            if baseline is not None:
                trees[str(baseline)] = (baseline, False)
            costs = dict.fromkeys(trees, math.inf)
            # NOTE: the builds take turns, and each keeps its best pass: a busy spell of a shared machine then
            # weighs on one try of each rather than on one build.
            for _ in range(COST_TURNS):
                for name, (tree, compiled) in trees.items():
                    costs[name] = min(costs[name], screen_cost_us(messages, tree, compiled=compiled))
            for name, cost in costs.items():
                ratio = (
                    f", {costs[str(baseline)] / cost:.1f}× less"
                    if baseline is not None and name != str(baseline)
                    else ""
                )
                print(f"screen, {name}: {cost:.1f} µs CPU per record{ratio}")
        finally:
            stack.down()


def _sample(logs: list[PlannedLog]) -> list[PlannedLog]:
    """The first 3,000 messages: enough for a stable figure, few enough for five passes."""
    return logs[:3_000]


if __name__ == "__main__":
    main()
