#!/usr/bin/env bash
# Build the ntk-book into _build/html, offline, executing every chapter (README: the build command).
# Sets up .venv on first use. Warnings are errors (-W -n); all pages are rebuilt (--all) so none are hidden.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_venv.sh
python scripts/prepare_build.py
jupyter-book build . -W -n --keep-going --all "$@"
