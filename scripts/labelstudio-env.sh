#!/usr/bin/env bash
# Build the Label Studio environment in VENV_DIR (default: <repo>/.venv-labelstudio): the review surface that
# `vlmflow dev up --with label-studio` and the Label Studio tests start as a child process.
#
#   scripts/labelstudio-env.sh [VENV_DIR]
#
# Label Studio pins Django, DRF, boto3 and a hundred more packages of its own, so it gets an environment of its
# own; vlmflow's bridge talks to it over HTTP only and runs in the project's .venv. Steps, each recorded in
# VENV_DIR/.labelstudio-env-stamp and skipped on the next run once done:
#   1. venv          a virtual environment with a current pip
#   2. label-studio  label-studio==1.23.2 (about 2.5 min and 1 GB), then an import of it
#   3. database      an empty, migrated SQLite database in VENV_DIR/label-studio-template: Label Studio migrates
#                    a new data dir at its first start (30 s on a quiet machine, over 3 min on a loaded 2-core
#                    one); `vlmflow dev up --with label-studio` and the tests copy this one into a new data dir
# PYTHON picks the interpreter (default: python3, 3.10 or newer).
set -Eeuo pipefail

LABEL_STUDIO_VERSION=1.23.2

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(realpath -m "${1:-$REPO/.venv-labelstudio}")
ENV_NAME=labelstudio-env

pip_install() { nice -n 10 "$PY" -m pip install --timeout 120 --retries 5 --progress-bar off --quiet "$@"; }
# shellcheck source=scripts/env-steps.sh
source "$REPO/scripts/env-steps.sh"

install_label_studio() {
    pip_install "label-studio==$LABEL_STUDIO_VERSION"
    "$PY" -c 'import label_studio; print("[labelstudio-env]   label-studio", label_studio.__version__)'
}

migrate_template() {
    rm -rf "$VENV/label-studio-template"
    # The two steps `label-studio start` takes before serving (its command line has no "migrate and exit").
    LABEL_STUDIO_BASE_DATA_DIR="$VENV/label-studio-template" LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false \
        SENTRY_DSN= nice -n 10 "$PY" -c 'from label_studio.server import _apply_database_migrations, _setup_env
_setup_env()
_apply_database_migrations()' >"$VENV/label-studio-template.log" 2>&1
    test -s "$VENV/label-studio-template/label_studio.sqlite3"
}

log "repo $REPO, env $VENV"
started=$SECONDS
run_step venv make_venv 10
run_step "label-studio==$LABEL_STUDIO_VERSION" install_label_studio
run_step "database template of $LABEL_STUDIO_VERSION" migrate_template
log "ready in $((SECONDS - started)) s: $VENV/bin/label-studio"
