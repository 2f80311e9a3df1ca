#!/usr/bin/env bash
# Create .venv (once) and install the project; EXTRAS selects optional groups (e.g. "ray,test").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned: the CPU build on this machine's disk (a range would pull a multi-GB CUDA build).
python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
if [ -n "${EXTRAS:-}" ]; then
  python -m pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
else
  python -m pip install -q -e . 2>&1 | grep -v "^WARNING: Location" || true
fi
python -c "import dreamix_ray, torch; print('dreamix_ray ready, torch', torch.__version__)"
