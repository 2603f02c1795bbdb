"""A worker as a child process, for the demo, the tests and the benchmarks.

vLLM lives in its own environment (scripts/engine-env.sh), so a worker with the vLLM engine runs under that
environment's Python; the instant engine runs under any. The child gets the parent's settings through
`VLMFLOW_*` variables, one JSON value per section.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from schemas.errors import VlmflowError
from schemas.settings import EngineKind, Settings
from workers.worker import READY_LINE

ENGINE_VENV_PYTHON = Path(".venv-engine/bin/python")


class WorkerStartError(VlmflowError):
    """The worker process exited or did not become ready in time; the message holds its last log lines."""


def engine_python(settings: Settings) -> Path | None:
    """The interpreter of the engine environment: `engine.python`, else `.venv-engine/bin/python` when present."""
    if settings.engine.python is not None:
        return settings.engine.python
    repo_venv = Path(__file__).resolve().parent.parent / ENGINE_VENV_PYTHON
    return repo_venv if repo_venv.exists() else None


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot pass {type(value).__name__} to a child process")


def settings_env(settings: Settings) -> dict[str, str]:
    """`VLMFLOW_*` variables that give a child process exactly these settings (secrets included)."""
    env = {}
    for name, value in settings.model_dump().items():
        env[f"VLMFLOW_{name.upper()}"] = json.dumps(value, default=_plain) if isinstance(value, dict) else str(value)
    return env


class WorkerProcess:
    """`vlmflow worker` in a child process of its own session, logging to `log_path`."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *,
        engine: EngineKind = "instant",
        python: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.settings = settings
        self.log_path = log_path
        self.engine = engine
        self.python = python or Path(sys.executable)
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self._ready_lines_before = 0  # ready lines already in the log (a log shared with earlier workers)

    def start(self) -> WorkerProcess:
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        argv = [str(self.python), "-m", "vlmflow.cli", "worker", "--engine", self.engine]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._ready_lines_before = self._ready_lines()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _ready_lines(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(READY_LINE)
        except FileNotFoundError:
            return 0

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until this worker printed its ready line."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while self._ready_lines() <= self._ready_lines_before:
            if self.process.poll() is not None:
                raise WorkerStartError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise WorkerStartError(f"worker not ready within {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL if it has not exited in `timeout_s`. Returns the worker's exit status."""
        assert self.process is not None, "start() first"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        status = self.process.poll()
        self.kill()
        return -signal.SIGKILL if status is None else status

    def kill(self) -> None:
        """SIGKILL the worker and whatever is left of its session (vLLM's engine-core process included)."""
        assert self.process is not None, "start() first"
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
