"""All configuration in one place. Environment variables use the prefix `VLMFLOW_` and `__` between levels,
e.g. `VLMFLOW_KAFKA__BOOTSTRAP_SERVERS=broker:9092`. Defaults point at the local stack (`vlmflow dev up`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

LOCAL_KAFKA_PORT = 19092
LOCAL_S3_PORT = 18333
LOCAL_REDIS_PORT = 16379
LOCAL_LABELSTUDIO_PORT = 18080
LOCAL_LABELSTUDIO_WEBHOOK_PORT = 18081

SECRETS_DIR_ENV = "VLMFLOW_SECRETS_DIR"
"""Names the directory of secret files (e.g. /run/secrets); read when this module is imported."""

ModelFamily = Literal["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
EngineKind = Literal["vllm", "instant", "sim"]


def _default_redis_url() -> str:
    # NOTE: REDIS_URL is the common convention; the local stack reuses that server when it answers.
    return os.environ.get("REDIS_URL", f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(_Section):
    bootstrap_servers: str = f"127.0.0.1:{LOCAL_KAFKA_PORT}"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    client_id: str = "vlmflow"
    session_timeout_ms: Annotated[int, Field(ge=1000)] = 10_000
    """Apache Kafka's default is 45 s; the local broker waits half a session timeout before a group forms."""
    request_timeout_ms: Annotated[int, Field(ge=1000)] = 15_000
    replication_factor: Annotated[int, Field(ge=1)] = 1
    """For `topics create`: 1 on the local broker, 3 on a production cluster."""

    def client_options(self) -> dict[str, object]:
        """Connection options in the spelling kafka-python and aiokafka share."""
        options: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_cafile"] = str(self.ssl_cafile) if self.ssl_cafile else None
            options["ssl_certfile"] = str(self.ssl_certfile) if self.ssl_certfile else None
            options["ssl_keyfile"] = str(self.ssl_keyfile) if self.ssl_keyfile else None
        return options


class RedisSettings(_Section):
    url: str = Field(default_factory=_default_redis_url)


class S3Settings(_Section):
    endpoint: str = f"127.0.0.1:{LOCAL_S3_PORT}"
    """host:port, as the MinIO client takes it."""
    secure: bool = False
    region: str | None = None
    access_key: str = "vlmflow"
    secret_key: SecretStr = SecretStr("vlmflow-local-secret")
    image_buckets: list[str] = ["vlm-images"]
    """Buckets workers may read images from; any other s3:// URI is `bucket_forbidden`."""
    dataset_bucket: str = "vlm-datasets"
    """Golden snapshots and dataset exports."""

    def client_kwargs(self) -> dict[str, object]:
        """Arguments of `minio.Minio` (the client works against MinIO in production and SeaweedFS locally)."""
        return {
            "endpoint": self.endpoint,
            "access_key": self.access_key,
            "secret_key": self.secret_key.get_secret_value(),
            "secure": self.secure,
            "region": self.region,
        }


class ModelSettings(_Section):
    family: ModelFamily = "qwen2-vl"
    path: Path = Path(".vlmflow/models/tiny-qwen2-vl")
    """A checkpoint directory; the local default is the tiny random model `vlmflow model tiny` writes."""
    name: str = "tiny-qwen2-vl"
    min_pixels: int | None = None
    """None means the family's shipped default. The engine and the token estimator both read these two."""
    max_pixels: int | None = 1_003_520
    """Qwen2-VL ships 12,845,056 (16,384 tokens per image); 1,003,520 px caps an image at 1,280 tokens."""


class SimSettings(_Section):
    """The simulated H100 (`engine.kind=sim`, workers/engines/sim.py): a benchmark instrument, never a default."""

    time_scale: Annotated[float, Field(gt=0)] = 1.0
    """Wall-clock seconds per simulated second: above 1 the simulated GPU runs slower than an H100 would, so that
    a small machine can feed it (the benchmark reports figures in simulated time)."""
    stats_path: Path | None = None
    """Where the engine writes its counters (steps, preemptions, simulated and CPU seconds) as JSON on close."""
    calibration_path: Path | None = None
    """A JSON object of measured hardware figures (`python bench/gpu/calibrate.py` prints one) replacing the
    first-principles ones of workers/engines/sim.py; None: first principles only."""


class EngineSettings(_Section):
    kind: EngineKind = "vllm"
    """`vllm`; `instant` (no model, for benchmarks of the loop); `sim` (a simulated H100, for the GPU benchmark)."""
    device: Literal["cpu", "cuda"] = "cpu"
    device_index: Annotated[int, Field(ge=0)] = 0
    """This worker's GPU on its machine; with the host it names the worker's budget pool (one pool per GPU)."""
    load_format: Literal["auto", "dummy"] = "dummy"
    """`dummy` gives random weights (the tiny local model); production loads the mounted checkpoint (`auto`)."""
    dtype: str = "auto"
    max_model_len: Annotated[int, Field(ge=1)] = 8_192
    """The engine's context; at start it must hold the largest job the settings allow (workers/limits.py): the
    defaults' 4 images x 1,282 tokens + 108 template + 1,024 prompt + 1,024 output = 7,284 tokens."""
    max_prompt_tokens: Annotated[int, Field(ge=1)] = 1_024
    """Room every job has for its prompt text (task instruction + the job's own prompt, at most one token per
    UTF-8 byte); a job with a longer text gets `too_many_tokens`."""
    max_output_tokens: Annotated[int, Field(ge=1)] = 1_024
    """The most output tokens a job may ask for (`max_output_tokens` of the job); more gets `too_many_tokens`."""
    max_num_batched_tokens: Annotated[int, Field(ge=1)] | None = None
    """Tokens per engine step (and vision tokens the encoder takes per step); None: 8,192 on CUDA, vLLM's
    default on CPU. Why 8,192: workers/limits.py."""
    gpu_memory_utilization: float = 0.90
    kv_cache_memory_bytes: int | None = None
    """KV cache size; None: `gpu_memory_utilization` decides on CUDA, and 256 MiB is used on CPU."""
    limit_images_per_prompt: Annotated[int, Field(ge=1)] = 4
    max_num_seqs: Annotated[int, Field(ge=1)] | None = None
    """Sequences the engine runs at once; None: derived from the KV cache (workers/limits.py)."""
    cudagraph_mm_encoder: bool = True
    """Encoder CUDA graphs, used only where the installed vLLM has the option and the device is CUDA."""
    python: Path | None = None
    """The interpreter of the engine environment, for tools that start a worker (the demo, the tests)."""
    sim: SimSettings = Field(default_factory=SimSettings)


class BudgetSettings(_Section):
    pool: str | None = None
    """The budget pool of this worker's engine; None: one pool per GPU, `<node>:gpu<engine.device_index>`."""
    node: str | None = None
    """The machine's part of a per-GPU pool name; None: the host name."""
    capacity: Annotated[int, Field(ge=1)] | None = None
    """Vision tokens the pool lends at once; None: from the engine's KV cache at start (workers/capacity.py). A
    number above the engine's figure is kept, with a warning in the log: the engine may then have to preempt."""
    lease_ttl_s: Annotated[float, Field(gt=0)] = 30.0
    wait_timeout_s: Annotated[float, Field(gt=0)] = 120.0


class WorkerSettings(_Section):
    group_id: str = "vlmflow-workers"
    max_in_flight: Annotated[int, Field(ge=1)] | None = None
    """A safety bound on jobs held at once (loading, waiting for the budget, in the engine, publishing); the budget
    is the real limit. None: the engine's `max_num_seqs` and a quarter more (16 for an engine without a KV cache)."""
    max_message_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    max_inline_image_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    max_image_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    """Decompression-bomb limit: images with more pixels are refused before decoding."""
    max_image_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024 * 1024
    """Largest encoded image fetched from S3 or an allow-listed URL."""
    url_allow_list: list[str] = []
    """Hosts from which plain http(s) image URLs may be fetched, each `host` (its scheme's port 80 or 443 only) or
    `host:port`; empty means none. Every redirect hop is checked against it too."""
    image_threads: Annotated[int, Field(ge=1)] = 4
    """Threads that decode and resize images off the event loop (Pillow releases the GIL while it works)."""
    image_pixel_budget: Annotated[int, Field(ge=1)] = 120_000_000
    """Decoded source pixels held at once across the images being prepared (3-4 bytes each); an image waits until
    it fits, one larger than the budget until it is alone."""
    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_backoff_s: Annotated[float, Field(ge=0)] = 2.0
    idempotency_ttl_s: Annotated[int, Field(ge=60)] = 7 * 24 * 3600
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 30.0
    """On SIGTERM, how long in-flight jobs may run on before they are handed back (redelivered elsewhere)."""
    metrics_port: int = 9464
    reply_to_prefixes: list[Annotated[str, Field(min_length=1)]] = ["reply."]
    """A job's `reply_to` must start with one of these (and be no vlmflow topic), so a job cannot make the worker
    write to `__consumer_offsets`, a Faust changelog or another system's topic; empty: `reply_to` is refused."""


class MiningSettings(_Section):
    """Hard-case mining: each signal's weight adds to a log's score (a weight of 0 turns the signal off)."""

    weights: dict[str, Annotated[float, Field(ge=0)]] = {
        "unparseable_output": 1.0,
        "schema_violation": 1.0,
        "refusal": 1.0,
        "negative_feedback": 1.0,
        "correction": 1.5,
        "box_outside_image": 0.7,
        "low_confidence": 0.5,
        "retry": 0.5,
    }
    """Missing names weigh 0. The default threshold (1.0) is met by any one strong signal, or two weak ones."""
    low_confidence: Annotated[float, Field(ge=0, le=1)] = 0.3
    """A `confidence` or `score` in the output below this fires `low_confidence`."""
    box_tolerance_px: Annotated[float, Field(ge=0)] = 1.0
    """How far a box may reach past the image edge before `box_outside_image` fires."""
    capabilities: list[str] = ["detect", "ground", "caption", "extract"]
    """Tasks the model is meant to answer: a refusal of one of these fires `refusal`."""


class StreamsSettings(_Section):
    app_id: str = "vlmflow-flywheel"
    rules_path: Path | None = None
    """YAML filter rules; None means the built-in defaults."""
    label_synonyms: dict[str, str] = {}
    redact_pii: bool = True
    hard_case_threshold: float = 1.0
    review_queue: str = "corrections"
    """Name of the correction queue in Redis (its keys carry the hash tag `{review:<name>}`)."""
    review_lease_s: Annotated[float, Field(gt=0)] = 900.0
    """How long a claimed case stays with its reviewer before it returns to the queue."""
    golden_snapshot_interval_s: Annotated[float, Field(gt=0)] = 3600.0
    """How often the streams leader writes the golden set to the dataset bucket (golden/snapshots/)."""
    mining: MiningSettings = Field(default_factory=MiningSettings)
    dedupe_ttl_s: Annotated[int, Field(ge=60)] = 7 * 24 * 3600
    """How long a content hash is remembered in Redis: a repeat within this window is rejected as `duplicate`."""
    retry_window_s: Annotated[int, Field(ge=60)] = 24 * 3600
    """How long tries of the same request (tenant, images, prompt) are counted towards `attempt`."""
    progress_interval_s: Annotated[float, Field(gt=0)] = 30.0
    """How often the worker logs its counts (normalized, rejected by code, hard cases)."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9465
    """Prometheus metrics of `vlmflow streams` (0 picks a free port, logged at start)."""
    screen_processes: Annotated[int, Field(ge=0)] | None = None
    """Worker processes that screen raw logs (CPU-bound) for each `vlmflow streams`. None (the default): one per
    CPU the member may use (its CPU affinity, capped by a cgroup CPU limit), at most 4, none on a single CPU; 0
    screens in the stage's own process. Set it lower when several members share a host's CPUs (docs/flywheel.md)."""


class LabelStudioSettings(_Section):
    """Label Studio, the review surface (`vlmflow review ls`), and its bridge to the correction queue."""

    url: str = f"http://127.0.0.1:{LOCAL_LABELSTUDIO_PORT}"
    token: SecretStr = SecretStr("vlmflow-local-labelstudio-token")
    """An API token: a legacy token, or a personal access token (a JWT, exchanged for 5-minute access tokens)."""
    username: str = "admin@vlmflow.local"
    password: SecretStr = SecretStr("vlmflow-local-admin")
    """The admin `vlmflow dev up --with label-studio` creates; production creates its own (docs/runbook.md)."""
    webhook_secret: SecretStr = SecretStr("vlmflow-local-webhook-secret")
    """Label Studio sends it in a header with every webhook; a call without it is refused."""
    webhook_listen: str = f"127.0.0.1:{LOCAL_LABELSTUDIO_WEBHOOK_PORT}"
    """host:port the bridge's webhook receiver binds."""
    webhook_url: str | None = None
    """The receiver's address as Label Studio reaches it; None: http://<webhook_listen>/webhook."""
    labels: list[str] = ["person", "car", "cat", "dog"]
    """The box labels of the detect and ground projects; `other` is added (a model's unlisted label keeps it)."""
    project_prefix: str = "vlmflow"
    """Projects are titled `<prefix> <task>`, one per task type."""
    reviewer: str = "labelstudio"
    """The name the bridge claims cases under in the correction queue."""
    max_open_tasks: Annotated[int, Field(ge=1)] = 50
    """Cases held open in Label Studio at once; more stay in the queue for the CLI and later."""
    poll_interval_s: Annotated[float, Field(gt=0)] = 10.0
    """The poll that catches what webhooks missed (Label Studio sends each once, without retry)."""
    s3_endpoint: str | None = None
    """An S3 endpoint URL for Label Studio's storages; None: Label Studio's own `LABEL_STUDIO_S3_ENDPOINT` (it
    refuses private addresses given through its API; `dev up` and compose set the variable)."""
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    """Read-only credentials of the image buckets for Label Studio; None: the `s3` section's."""
    presign: bool = False
    """False: Label Studio streams the image bytes; True: the browser fetches presigned URLs (the store needs CORS)."""
    executable: Path | None = None
    """The `label-studio` command for `vlmflow dev up --with label-studio`; None: .venv-labelstudio's, then PATH."""


class Settings(BaseSettings):
    """Every option of vlmflow. Env: `VLMFLOW_<SECTION>__<FIELD>`; a `.env` file in the working directory works too."""

    model_config = SettingsConfigDict(
        env_prefix="VLMFLOW_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        secrets_dir=os.environ.get(SECRETS_DIR_ENV),
    )

    state_dir: Path = Path(".vlmflow")
    """Where the local stack keeps its data, logs and process ids."""
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    streams: StreamsSettings = Field(default_factory=StreamsSettings)
    labelstudio: LabelStudioSettings = Field(default_factory=LabelStudioSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Secret files are named like the variables, nested fields included (`vlmflow_kafka__sasl_password`),
        as a compose `secrets:` mount or a Kubernetes secret volume lays them out; the environment wins."""
        return init_settings, env_settings, dotenv_settings, NestedSecretsSettingsSource(file_secret_settings)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (used by the command line and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]


REDACTED = "***"
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:@/\s]*):[^@/\s]*@")
_PASSWORD_PARAMETER = re.compile(r"(?P<head>[?&;](?:password|passwd|secret|token)=)[^&#\s]*", re.IGNORECASE)


def _secrets(model: BaseModel) -> Iterator[str]:
    """Every secret value in `model`: its `SecretStr` fields, and passwords inside URL fields, at any depth."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            yield value.get_secret_value()
        elif isinstance(value, BaseModel):
            yield from _secrets(value)
        elif isinstance(value, str) and "://" in value:
            password = _URL_PASSWORD.search(value)
            if password:
                written = password.group(0)[len(password.group("head")) + 1 : -1]
                yield from (written, unquote(written))


def redact(text: str, settings: Settings | None = None) -> str:
    """`text` with every secret replaced by `***`, so that it may go to a terminal or a log line: the password of
    any URL in it (`redis://:pw@host` → `redis://:***@host`), `password=` and like query parameters, and every
    secret value of `settings` (S3 and SASL secrets, tokens, the Redis URL's password) wherever it appears."""
    text = _URL_PASSWORD.sub(lambda match: f"{match.group('head')}:{REDACTED}@", text)
    text = _PASSWORD_PARAMETER.sub(lambda match: f"{match.group('head')}{REDACTED}", text)
    if settings is not None:
        for secret in sorted({value for value in _secrets(settings) if value}, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
    return text
