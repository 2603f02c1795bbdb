"""Prometheus's `/metrics` over HTTP for a registry of one process (a worker's or a flywheel member's), shared so
that both serve and stop it the same way."""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


@dataclass(frozen=True)
class MetricsServer:
    """A running `/metrics` endpoint; `port` is the one it listens on (the free one picked for port 0)."""

    port: int
    server: WSGIServer
    thread: Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, port: int) -> MetricsServer:
    """Expose `registry` on 0.0.0.0:`port` (0: a free port, reported in the result)."""
    server, thread = start_http_server(port, registry=registry)
    return MetricsServer(server.server_address[1], server, thread)
