#!/usr/bin/env bash
# Fresh machine -> everything the tests need (Python packages, Chromium for the web page) -> the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=ray,test scripts/setup_env.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
    >/dev/null 2>&1 || echo "note: could not install Chromium; the web-page test will be skipped"
fi
. .venv/bin/activate
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
# Two workers, one test file each at a time (module fixtures stay shared): the multi-node and Ray tests spend
# much of their time waiting on node starts and health checks, which the other worker fills. DREAMIX_TEST_WORKERS=0
# runs in one process.
exec python -m pytest -q -n "${DREAMIX_TEST_WORKERS:-2}" --dist loadfile "$@"
