# Sourced by build_book.sh and run_tests.sh: create or update the project's virtual environment .venv
# and activate it. Reinstalls only when requirements.txt or pyproject.toml changed (a stamp in .venv
# holds their hash). Python: $PYTHON, default python3 (>= 3.11, as the pinned numpy/jax need).
# shellcheck shell=bash

ntk_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ntk_venv="$ntk_root/.venv"
ntk_stamp="$ntk_venv/.ntk-book-requirements.sha256"
ntk_want=$(cat "$ntk_root/requirements.txt" "$ntk_root/pyproject.toml" | sha256sum | cut -d' ' -f1)

if [ ! -x "$ntk_venv/bin/python" ]; then
    echo "==> creating $ntk_venv"
    "${PYTHON:-python3}" -m venv "$ntk_venv"
fi
if [ "$(cat "$ntk_stamp" 2>/dev/null)" != "$ntk_want" ]; then
    echo "==> installing requirements.txt and ntklib (editable) into .venv"
    "$ntk_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ntk_root/requirements.txt"
    "$ntk_venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ntk_root"
    echo "$ntk_want" > "$ntk_stamp"
else
    echo "==> .venv is up to date with requirements.txt and pyproject.toml"
fi
# shellcheck disable=SC1091
. "$ntk_venv/bin/activate"
export PYTHONHASHSEED=0
