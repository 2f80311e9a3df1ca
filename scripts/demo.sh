#!/usr/bin/env bash
# Fresh machine -> the main job on the embedded cascade: edit a shapes-world clip, write
# out/demo/{original,edit,side_by_side}.mp4 and side_by_side.png, print the analyzer's verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
. .venv/bin/activate
dreamix demo -o out/demo "$@"
# This script's activation ends with it; say how to get `dreamix` in the user's own shell.
echo "dreamix is installed in .venv: run '. .venv/bin/activate' (or call .venv/bin/dreamix) to use it"
