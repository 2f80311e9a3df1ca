#!/usr/bin/env bash
# Create .venv (once) and install the project; EXTRAS selects optional groups (e.g. "ray,test").
# Quiet when it works (one line at the end); a failed step stops here and prints that step's output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=$(mktemp "${TMPDIR:-/tmp}/dreamix-setup.XXXXXX")
trap 'rm -f "$LOG"' EXIT

# pip and setuptools print warnings even on success (the editable-install notice, local index
# locations); keep their output, and show it only when the step fails.
quietly() {
  local status=0
  "$@" >"$LOG" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    echo "setup_env.sh: failed (exit $status): $*" >&2
    cat "$LOG" >&2
    exit "$status"
  fi
}

if [ ! -x .venv/bin/python ]; then
  quietly "$PY" -m venv .venv
fi
. .venv/bin/activate
quietly python -m pip install -q --upgrade pip
# torch first, pinned: the CPU build on this machine's disk (a range would pull a multi-GB CUDA build).
quietly python -m pip install -q torch==2.13.0
quietly python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
python -c "import dreamix_ray, torch; print('dreamix_ray ready, torch', torch.__version__)"
