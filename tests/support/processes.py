"""Child processes in tests: stopped the way an orchestrator stops them (SIGTERM, a grace period, then SIGKILL)."""

from __future__ import annotations

import signal
import subprocess


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
