"""Build hook: with `VLMFLOW_COMPILE=1`, the screening core is compiled to C extensions by mypyc.

`screen` runs for every raw log the flywheel reads; compiled, it costs about 1.6× less CPU per record
(bench/bench_streams.py prints both figures). The compiled modules are built from the very sources, so they behave
as the Python ones do (tests/integration/test_compiled_screen.py holds their outputs equal). Everything else is
metadata in pyproject.toml.

Off by default: an editable install would put the extensions beside the sources, where they would hide later edits
of them until the next install; and it needs a C compiler and the Python headers. The app image compiles
(Dockerfile), as does the benchmark (into a directory of its own). `streams.flywheel.screening.compiled()` says
which build a process runs, and `vlmflow streams` logs it when it starts.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "schemas/boxes.py",
    "streams/flywheel/jsontext.py",
    "streams/flywheel/mining.py",
    "streams/flywheel/model_output.py",
    "streams/flywheel/normalize.py",
    "streams/flywheel/pii.py",
    "streams/flywheel/screen.py",
    "streams/flywheel/timeparse.py",
]
"""The modules screening spends its time in: `screen` and what it calls, and mining. Not `outputs` (murmur2), whose
32-bit arithmetic compiled to slower big-integer operations."""


def _extensions() -> list:
    if os.environ.get("VLMFLOW_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    # NOTE: the build environment holds mypy but not the runtime dependencies (pydantic, redis...): their types
    # are Any there, so "type: ignore" comments that matter with them installed look unused.
    return mypycify(["--no-warn-unused-ignores", *COMPILED], opt_level="3")


setup(ext_modules=_extensions())
