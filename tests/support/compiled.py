"""The compiled build of vlmflow (setup.py, `VLMFLOW_COMPILE=1`), installed into a directory of its own: the
benchmark runs it, and a test holds its screening equal to the sources'. Put the directory first on PYTHONPATH to
run it: the editable install of the checkout stays pure Python."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def compiled_sources() -> list[str]:
    """The modules setup.py compiles (its `COMPILED`), as paths relative to the repository."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(target, ast.Name) and target.id == "COMPILED" for target in targets):
                assert node.value is not None
                return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no COMPILED list")


SOURCES = ("pyproject.toml", "setup.py", "README.md", "schemas", "streams", "vlmflow", "workers")
"""What the build reads, as the Dockerfile's `source` stage copies it."""


def build_compiled(target: Path) -> Path:
    """Install the compiled build of this checkout into `target` (no dependencies: they come from the running
    environment) and return it. About a minute: mypyc type-checks and gcc compiles. Built from a copy of the
    sources beside `target`, so that the build's own files stay out of the checkout (and two builds apart)."""
    source = target.with_name(f"{target.name}-source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    env = {**os.environ, "VLMFLOW_COMPILE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)]
    result = subprocess.run(command, env=env, cwd=source, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the compiled build failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return target
