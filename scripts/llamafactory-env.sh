#!/usr/bin/env bash
# Build the LLaMA-Factory environment in VENV_DIR (default: <repo>/.venv-llamafactory), in which the tests check
# that `vlmflow dataset export` output loads with LLaMA-Factory's own argument parsing and dataset loading.
#
#   scripts/llamafactory-env.sh [VENV_DIR]
#
# LLaMA-Factory's pins (torch, transformers<=5.6, datasets<=4.0, peft 0.18, trl<=0.24) clash with the vLLM engine
# environment, hence an environment of its own. Steps, each recorded in VENV_DIR/.llamafactory-env-stamp and
# skipped on the next run once done:
#   1. venv          a virtual environment with a current pip
#   2. torch         torch==2.14.1 + torchvision==0.29.1: transformers 5 loads Qwen2-VL's video processor (part of
#                    every Qwen2-VL processor) only with a working torchvision, and PyPI's torchvision does not load
#                    beside the CPU-only torch. These CUDA builds run on CPU; pip's configuration on this kind of
#                    machine finds them and their nvidia-* wheels on local disk, so nothing large is downloaded.
#   3. torchaudio    torchaudio==2.11.0 --no-deps: llamafactory.data imports it at module level (audio inputs
#                    only); PyPI's newest torchaudio pins torch==2.11.0, and it loads beside 2.14.1.
#   4. llamafactory  llamafactory==0.9.5 --no-deps, then its Requires-Dist minus what data loading does not use
#                    (the web UI and API servers, ModelScope, hf-transfer, PyAV) and minus torch*; redone when
#                    that list changes. pip then names the left-out ones as "not installed": that is expected.
# PYTHON picks the interpreter (default: python3, 3.11 or newer: llamafactory 0.9.5 requires it).
set -Eeuo pipefail

LLAMAFACTORY_VERSION=0.9.5
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
TORCHAUDIO_VERSION=2.11.0
SKIPPED_REQUIREMENTS="torch torchvision torchaudio gradio fastapi uvicorn sse-starlette modelscope hf-transfer av"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(realpath -m "${1:-$REPO/.venv-llamafactory}")
ENV_NAME=llamafactory-env

pip_install() { nice -n 10 "$PY" -m pip install --timeout 120 --retries 5 --progress-bar off --quiet "$@"; }
# shellcheck source=scripts/env-steps.sh
source "$REPO/scripts/env-steps.sh"

install_torch() {
    pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$VENV/constraints.txt"
    "$PY" -c 'import torch, torchvision; print("[llamafactory-env]   torch", torch.__version__, "torchvision", torchvision.__version__)'
}

install_torchaudio() {
    pip_install --no-deps "torchaudio==$TORCHAUDIO_VERSION"
    "$PY" -c 'import torchaudio; print("[llamafactory-env]   torchaudio", torchaudio.__version__)'
}

install_llamafactory() {
    pip_install --no-deps "llamafactory==$LLAMAFACTORY_VERSION"
    requirements_of llamafactory "$SKIPPED_REQUIREMENTS" >"$VENV/llamafactory-requirements.txt"
    # Pillow reads the images; LLaMA-Factory leaves it to its optional extras.
    pip_install -r "$VENV/llamafactory-requirements.txt" pillow -c "$VENV/constraints.txt"
    "$PY" -c 'import llamafactory, transformers, datasets
from llamafactory.data import get_dataset
from llamafactory.hparams import get_train_args
print("[llamafactory-env]   llamafactory", llamafactory.__version__, "transformers", transformers.__version__, "datasets", datasets.__version__)'
}

log "repo $REPO, env $VENV"
started=$SECONDS
run_step venv make_venv 11
run_step "torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION" install_torch
run_step "torchaudio==$TORCHAUDIO_VERSION" install_torchaudio
run_step "llamafactory==$LLAMAFACTORY_VERSION without $SKIPPED_REQUIREMENTS" install_llamafactory
log "ready in $((SECONDS - started)) s: $VENV/bin/python"
