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
# One process by default. DREAMIX_TEST_WORKERS=2: two workers, one test file each at a time (module fixtures stay
# shared), which fill each other's waits on node starts on a quiet machine but ran 1.7x slower on a loaded CI host
# (two Ray clusters at once on 2 cores).
exec python -m pytest -q -n "${DREAMIX_TEST_WORKERS:-0}" --dist loadfile "$@"
