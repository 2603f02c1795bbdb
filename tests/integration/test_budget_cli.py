"""`vlmflow budget` as a user runs it: a subprocess against the real Redis, and engine metrics served over HTTP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from schemas.connections import cancel_and_wait
from schemas.settings import Settings
from tests.integration.test_budget import client, settled, unique_pool
from workers.budget import Lease, TokenBudget

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


@asynccontextmanager
async def held(budget: TokenBudget, cost: int) -> AsyncIterator[Lease]:
    """A lease kept alive (renewed every second) while the command-line subprocesses run, however slowly."""
    lease = await budget.try_reserve(cost, "busy")
    assert lease is not None

    async def renew() -> None:
        nonlocal lease
        while True:
            await asyncio.sleep(1.0)
            lease = await budget.renew(lease)

    renewing = asyncio.create_task(renew())
    try:
        yield lease
    finally:
        await cancel_and_wait(renewing)
        await budget.release(lease)


async def test_set_status_of_every_pool_and_a_plan_corrected_from_engine_metrics(
    stack_settings: Settings, engines: str, tmp_path: Path
) -> None:
    pool, other, url = unique_pool(), unique_pool(), stack_settings.redis.url
    env = {**os.environ, "VLMFLOW_REDIS__URL": url, "VLMFLOW_BUDGET__POOL": pool, "VLMFLOW_BUDGET__LEASE_TTL_S": "5"}

    def cli(*args: str) -> Awaitable[subprocess.CompletedProcess[str]]:
        return asyncio.to_thread(vlmflow, env, tmp_path, *args)

    done = await cli("budget", "set", "800")
    assert done.returncode == 0, done.stderr
    assert f"pool {pool}: capacity 800 vision tokens" in done.stdout
    assert (await cli("budget", "set", "300", "--pool", other)).returncode == 0

    redis = client(url)
    await settled(redis, 5)
    budget = TokenBudget(redis, pool, capacity=800, lease_ttl_s=5)
    async with held(budget, 400):
        status = await cli("budget", "status")
        rows = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()[1:]}
        assert rows[pool][:3] == ["800", "400", "50%"], status.stdout + status.stderr
        assert rows[other][:3] == ["300", "0", "0%"], status.stdout

        metrics = [f"--metrics={engines}/engine-0/metrics", f"--metrics={engines}/engine-1/metrics"]
        plan = await cli("budget", "plan", *metrics, "--samples=2", "--interval=0.1", "--apply")
        assert plan.returncode == 0, plan.stderr
    # 400 tokens leased at a mean KV usage of 40%: 0.9 x 400 / 0.4 = 900
    assert "capacity            900" in plan.stdout and f"applied to pool '{pool}'" in plan.stdout
    assert (await budget.state()).capacity == 900
    await redis.aclose()

    wrong = vlmflow(env, tmp_path, "budget", "plan", f"--metrics={engines}/other/metrics", "--samples=1")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"vlmflow: error: {engines}/other/metrics has no vllm:kv_cache_usage_perc; is it a vLLM engine's /metrics?"
    ]
