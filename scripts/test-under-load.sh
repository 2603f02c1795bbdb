#!/usr/bin/env bash
# The whole suite several times in a row on a fresh clone while busy loops keep every core loaded, as `stress --cpu N`
# would (no package needed): the tests' timing must hold on a slow, shared machine.
#   scripts/test-under-load.sh [RUNS] [BUSY] [-- ARGS FOR scripts/test.sh]
#   RUNS  runs of scripts/test.sh in a row, all must pass (default 3)
#   BUSY  busy-loop processes at normal priority for the whole time (default: one per core, `nproc`)
# The clone is of the committed HEAD, in a temporary directory; its first run builds the environments as CI does.
set -euo pipefail
runs=3
busy=$(nproc)
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then runs=$1; shift; fi
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then busy=$1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi

repo=$(cd "$(dirname "$0")/.." && pwd)
clone="$(mktemp -d)/vlmflow"
git clone --quiet "$repo" "$clone"

hogs=()
stop_hogs() {
    for pid in "${hogs[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
trap stop_hogs EXIT
for _ in $(seq "$busy"); do
    python3 -c 'while True: pass' &
    hogs+=("$!")
done

for run in $(seq "$runs"); do
    echo "== run $run of $runs on $clone, $busy busy loops"
    started=$SECONDS
    if ! (cd "$clone" && scripts/test.sh "$@"); then
        echo "== run $run of $runs FAILED after $((SECONDS - started)) s"
        exit 1
    fi
    echo "== run $run of $runs passed in $((SECONDS - started)) s"
done
echo "== all $runs runs passed under load"
