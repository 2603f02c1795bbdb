# Sourced by scripts/*-env.sh: a virtual environment built in steps, each recorded in a stamp file and skipped on
# the next run once done, with one clear line when a step fails.
#
# The caller sets ENV_NAME (used in messages and the stamp's name) and VENV, and defines
# `pip_install ARGS...` (its pip options) before calling the functions below.

STAMP=$VENV/.$ENV_NAME-stamp
PY=$VENV/bin/python
CURRENT_STEP=setup
trap 'echo "$ENV_NAME: FAILED in step \"$CURRENT_STEP\" (exit $?); see the output above" >&2' ERR

log() { printf '[%s] %s\n' "$ENV_NAME" "$*"; }

step_done() { [[ -f $STAMP ]] && grep -qxF "$1" "$STAMP"; }

# run_step KEY COMMAND [ARGS...]: run COMMAND unless KEY is in the stamp file, then record KEY.
run_step() {
    local key=$1 started=$SECONDS
    shift
    CURRENT_STEP=$key
    if step_done "$key"; then log "$key: already done"; return; fi
    log "$key: start"
    "$@"
    echo "$key" >>"$STAMP"
    log "$key: done in $((SECONDS - started)) s"
}

# make_venv MINOR: a fresh venv from $PYTHON (default python3), which must be Python 3.MINOR or newer.
make_venv() {
    local python=${PYTHON:-python3} minor=$1
    "$python" -c "import sys; sys.version_info >= (3, $minor) or sys.exit(f'Python 3.$minor+ is required, not {sys.version}')"
    if [[ -e $VENV && ! -f $VENV/pyvenv.cfg && -n $(ls -A "$VENV") ]]; then
        echo "$ENV_NAME: $VENV exists and is not a virtual environment; refusing to overwrite it" >&2
        exit 1
    fi
    "$python" -m venv --clear "$VENV"
    pip_install --quiet --upgrade pip packaging
}

# requirements_of PACKAGE "SKIPPED NAMES": the installed PACKAGE's Requires-Dist without extras-only lines and
# without SKIPPED, one per line, markers dropped.
requirements_of() {
    "$PY" - "$1" "$2" <<'PYTHON'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

package, skipped = sys.argv[1], set(sys.argv[2].split())
for line in requires(package) or []:
    req = Requirement(line)
    if canonicalize_name(req.name) in skipped or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
PYTHON
}
