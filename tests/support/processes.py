"""Child processes in tests: stopped the way an orchestrator stops them (SIGTERM, a grace period, then SIGKILL)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int | None:
    """SIGTERM `process` if it still runs, wait up to `timeout_s`, then SIGKILL; returns its exit status, or None
    when it had to be killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None
    return process.returncode


@contextmanager
def child_process(
    args: list[str], env: Mapping[str, str], log_path: Path, *, stop_timeout_s: float | None = 30.0
) -> Iterator[subprocess.Popen[bytes]]:
    """`args` as a child process in a session of its own, its output appended to `log_path`. On exit it is stopped
    with `stop_process` (`stop_timeout_s` of grace), or killed at once when `stop_timeout_s` is None."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            if stop_timeout_s is None:
                _kill(process)
            else:
                stop_process(process, stop_timeout_s)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
