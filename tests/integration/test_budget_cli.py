"""`vlmflow budget` as a user runs it: a subprocess against the real Redis, and engine metrics served over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from schemas.settings import Settings
from tests.integration.test_budget import client, settled, unique_pool
from workers.budget import TokenBudget

ENGINE_METRICS = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="tiny-qwen2-vl"}} {usage}
"""


def serve_metrics(bodies: dict[str, str]) -> ThreadingHTTPServer:
    """An HTTP server on a free port answering each path with its body, as vLLM's /metrics does."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies[self.path].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def engines() -> Iterator[str]:
    """Two engines at 50% and 30% KV usage, and a server that is no vLLM engine; yields the base URL."""
    server = serve_metrics(
        {
            "/engine-0/metrics": ENGINE_METRICS.format(usage=0.5),
            "/engine-1/metrics": ENGINE_METRICS.format(usage=0.3),
            "/other/metrics": "# TYPE up gauge\nup 1.0\n",
        }
    )
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def vlmflow(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmflow.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


async def test_set_status_and_a_plan_corrected_from_engine_metrics(
    stack_settings: Settings, engines: str, tmp_path: Path
) -> None:
    pool, url = unique_pool(), stack_settings.redis.url
    env = {
        **os.environ,
        "VLMFLOW_REDIS__URL": url,
        "VLMFLOW_BUDGET__POOL": pool,
        "VLMFLOW_BUDGET__CAPACITY": "1000",
        "VLMFLOW_BUDGET__LEASE_TTL_S": "5",
    }
    done = vlmflow(env, tmp_path, "budget", "set", "800")
    assert done.returncode == 0, done.stderr
    assert "capacity    800 vision tokens" in done.stdout

    redis = client(url)
    await settled(redis, 5)
    budget = TokenBudget(redis, pool, capacity=1000, lease_ttl_s=5)
    lease = await budget.try_reserve(400, "busy")
    assert lease is not None
    status = vlmflow(env, tmp_path, "budget", "status")
    assert "in use      400 (50%) in 1 leases" in status.stdout, status.stdout + status.stderr

    metrics = [f"--metrics={engines}/engine-0/metrics", f"--metrics={engines}/engine-1/metrics"]
    plan = vlmflow(env, tmp_path, "budget", "plan", *metrics, "--samples=2", "--interval=0.1", "--apply")
    assert plan.returncode == 0, plan.stderr
    # 400 tokens leased at a mean KV usage of 40%: 0.9 x 400 / 0.4 = 900
    assert "capacity            900" in plan.stdout and f"applied to pool '{pool}'" in plan.stdout
    assert (await budget.state()).capacity == 900
    await budget.release(lease)
    await redis.aclose()

    wrong = vlmflow(env, tmp_path, "budget", "plan", f"--metrics={engines}/other/metrics", "--samples=1")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"vlmflow: error: {engines}/other/metrics has no vllm:kv_cache_usage_perc; is it a vLLM engine's /metrics?"
    ]
