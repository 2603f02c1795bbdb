"""Image URLs over real HTTP, loopback servers only: every redirect hop is checked against the allow-list (host and
port) before anything connects to it, so an allow-listed host cannot point the worker at another service."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from schemas.settings import Settings, load_settings
from workers.images import MAX_REDIRECTS, ImageError, load_image


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """A loopback HTTP server that serves a PNG at /image.png, redirects as its `routes` say and logs each path."""

    def __init__(self, routes: dict[str, str] | None = None):
        self.routes = routes or {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path in server.routes:
                    self.send_response(302)
                    self.send_header("Location", server.routes[self.path])
                    self.end_headers()
                elif self.path.startswith("/chain/"):
                    left = int(self.path.removeprefix("/chain/"))
                    self.send_response(302)
                    self.send_header("Location", f"/chain/{left - 1}" if left > 0 else "/image.png")
                    self.end_headers()
                elif self.path == "/image.png":
                    body = png_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def servers() -> Iterator[tuple[Server, Server]]:
    """`allowed` (in the allow-list) and `internal` (another service on the same host, not in it)."""
    internal = Server()
    allowed = Server()
    allowed.routes = {
        "/same-host": "/image.png",
        "/other-port": internal.url("/image.png"),
        "/metadata": "http://169.254.169.254/latest/meta-data/",
        "/user-info": f"http://x@127.0.0.1:{allowed.port}/image.png",
        "/to-ftp": "ftp://127.0.0.1/image.png",
    }
    for server in (allowed, internal):
        server.thread.start()
    try:
        yield allowed, internal
    finally:
        for server in (allowed, internal):
            server.httpd.shutdown()
            server.httpd.server_close()


def url_settings(server: Server) -> Settings:
    """127.0.0.1 on its HTTP port (where nothing listens here) and on the `allowed` server's port."""
    return load_settings(worker={"url_allow_list": ["127.0.0.1", f"127.0.0.1:{server.port}"]})


def load_code(uri: str, settings: Settings) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(uri, settings, store=None)  # type: ignore[arg-type]
    return caught.value.code


def test_an_allow_listed_url_and_a_redirect_on_the_same_host_load(servers: tuple[Server, Server]) -> None:
    allowed, _ = servers
    settings = url_settings(allowed)
    assert load_image(allowed.url("/image.png"), settings, store=None).size == (64, 48)  # type: ignore[arg-type]
    assert load_image(allowed.url("/same-host"), settings, store=None).size == (64, 48)  # type: ignore[arg-type]
    assert load_image(allowed.url(f"/chain/{MAX_REDIRECTS - 1}"), settings, store=None).size == (64, 48)  # type: ignore[arg-type]


def test_a_redirect_to_another_port_is_refused_before_connecting(servers: tuple[Server, Server]) -> None:
    allowed, internal = servers
    assert load_code(allowed.url("/other-port"), url_settings(allowed)) == "url_forbidden"
    assert internal.requests == [], "the service behind the redirect was never contacted"


@pytest.mark.parametrize(
    ("path", "code"),
    [("/metadata", "url_forbidden"), ("/to-ftp", "url_forbidden"), ("/user-info", "invalid_image_uri")],
)
def test_a_redirect_to_an_address_outside_the_allow_list_is_refused(
    servers: tuple[Server, Server], path: str, code: str
) -> None:
    """169.254.169.254 (cloud metadata) is refused by the allow-list before any connection is attempted."""
    allowed, _ = servers
    assert load_code(allowed.url(path), url_settings(allowed)) == code


def test_a_redirect_chain_is_bounded(servers: tuple[Server, Server]) -> None:
    allowed, _ = servers
    assert load_code(allowed.url(f"/chain/{MAX_REDIRECTS + 3}"), url_settings(allowed)) == "image_fetch_failed"
    assert len(allowed.requests) == MAX_REDIRECTS + 1


def test_a_bare_host_entry_allows_only_the_schemes_own_port(servers: tuple[Server, Server]) -> None:
    allowed, _ = servers
    settings = load_settings(worker={"url_allow_list": ["127.0.0.1"]})
    assert load_code(allowed.url("/image.png"), settings) == "url_forbidden"
    assert allowed.requests == []
