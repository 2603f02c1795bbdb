"""The compiled build (setup.py, `VLMFLOW_COMPILE=1`) against the sources it is compiled from: every module setup.py
names is an extension there, and screening as a screening process does it (screen, encode, mine, hash) gives the
very same records for every raw one, valid or hostile (generated logs of every format, mutated ones, cut JSON, odd
values), under each of three settings. mypyc checks declared types at run
time where Python does not, so a difference would show here first."""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import subprocess
import sys
from collections import Counter
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pytest

from tests.support.compiled import REPO, build_compiled, compiled_sources
from tests.support.flywheel_data import mixed_raw_logs

pytestmark = pytest.mark.slow

PROBE = REPO / "tests" / "support" / "screen_outputs.py"
_NESTED: Any = 1
for _ in range(40):
    _NESTED = [_NESTED]
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1.5, 1e300, 2**70, -(2**63), "", "  42 ", "nan", [], {}, [1, 2],
    {"a": 1}, "a" * 3000, "canary@example.org +1 415 555 0101 990000000001", "s3://b/k.png", "data:image/png;base64,AA",
    "http://h/b/k?X-Amz-Signature=1&sig=2", "\u00e9\u4e2d\U0001f600", "<|box_start|>(1,2),(3,4)<|box_end|>", _NESTED,
]  # fmt: skip
CUTS = ["", '"', "}", "x", "\\u0000", "\\ud800", "NaN", "1e999", "123456789012345678901234"]


def _mutated(rng: random.Random, value: Any, depth: int = 0) -> None:
    """Replace, drop or descend into one item of `value`, in place."""
    if isinstance(value, dict) and value:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.3:
            value[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif roll < 0.4:
            del value[key]
        elif depth < 6:
            _mutated(rng, value[key], depth + 1)
    elif isinstance(value, list) and value:
        index = rng.randrange(len(value))
        if rng.random() < 0.3:
            value[index] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif depth < 6:
            _mutated(rng, value[index], depth + 1)


def raw_records() -> list[bytes | None]:
    """Generated logs as they are, then mutated (1-3 changes each), then cut or spliced as text."""
    rng = random.Random(17)
    planned = [log.value for log in mixed_raw_logs(3_000, seed=11)]
    objects = [json.loads(value) for value in planned if value.startswith(b'{"')][:2_000]
    records: list[bytes | None] = [*planned, None, b"", b"null", b"[]", b"{}", b'"x"', b"\xff\xfe", b"{" * 5_000]
    for value in objects:
        for _ in range(rng.randint(1, 3)):
            _mutated(rng, value)
        text = json.dumps(value)
        records.append(text.encode())
        at = rng.randrange(len(text))
        records.append((text[:at] + rng.choice(CUTS) + text[at + 1 :]).encode("utf-8", "surrogatepass"))
    return records


def _probe(build: Path, inputs: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(build)}
    result = subprocess.run([sys.executable, str(PROBE), str(inputs)], env=env, cwd="/", capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def compiled_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_compiled(tmp_path_factory.mktemp("compiled"))


def test_every_module_setup_py_names_is_compiled(compiled_build: Path) -> None:
    sources = compiled_sources()
    assert "streams/flywheel/screen.py" in sources
    for source in sources:
        stem = compiled_build / source.removesuffix(".py")
        assert any(Path(f"{stem}{suffix}").is_file() for suffix in EXTENSION_SUFFIXES), f"{source} not compiled"


def test_compiled_screening_gives_the_same_bytes_as_the_sources(compiled_build: Path, tmp_path: Path) -> None:
    records = raw_records()
    inputs = tmp_path / "raw.b64"
    inputs.write_text("".join((base64.b64encode(raw).decode() if raw is not None else "") + "\n" for raw in records))
    compiled, sources = _probe(compiled_build, inputs), _probe(REPO, inputs)
    assert compiled[0] == "compiled (mypyc)" and sources[0].startswith("pure Python")
    assert len(compiled) == len(sources) == 1 + 3 * len(records)
    differing = [index for index, (a, b) in enumerate(zip(compiled[1:], sources[1:], strict=True)) if a != b]
    if differing:
        index = differing[0]
        record = records[index % len(records)]
        pytest.fail(f"{len(differing)} records differ; the first, of {record!r:.200}:\n{compiled[1 + index]:.3000}\n"
                    f"{sources[1 + index]:.3000}")  # fmt: skip
    kinds = Counter(json.loads(line)["kind"] for line in sources[1:])
    cases = sum(json.loads(line)["case"] is not None for line in sources[1:])
    assert kinds["rejected"] > 1_000 and kinds["normalized"] > 1_000 and cases > 100, (kinds, cases)
