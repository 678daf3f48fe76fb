#!/usr/bin/env bash
# The ntk-book test command (README; .ci/run calls it). On a fresh machine it sets everything up itself.
#
#   1. Debian `chromium` for the math-rendering test (apt-get, only when missing), and .venv
#   2. ruff check .
#   3. python scripts/check_sync.py       (every chapters/*.ipynb in sync with its .md)
#   4. jupyter-book build . -W -n --keep-going --all   (execution forced by _config.yml)
#   5. one pytest run: ntklib unit tests and tests/test_book.py (with the Chromium test, NTK_BOOK_REQUIRE_BUILD=1)
#      plus nbval on every chapter notebook, on 2 workers.
#
# Stages 2-4 keep going after a failure so one run reports everything; their results are recorded and
# tests/test_book.py::test_earlier_stages_passed turns a failed stage into a failed test, so pytest's
# closing summary line, printed last, covers the whole run. The exit status is non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"
export NTK_BOOK_STAGES="$PWD/_build/test-stages"
rm -rf "$NTK_BOOK_STAGES" && mkdir -p "$NTK_BOOK_STAGES"
declare -a summary=()

stage() {  # stage NAME COMMAND...: run, time and record a stage without stopping the run
    local name=$1 rc=0 start=$SECONDS
    shift
    echo "==> [$name] $*"
    "$@" || rc=$?
    echo "$rc $((SECONDS - start))" > "$NTK_BOOK_STAGES/$name"
    summary+=("$(printf '%-12s %-6s %4ss' "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" "$((SECONDS - start))")")
}

start=$SECONDS
if ! command -v chromium >/dev/null 2>&1; then
    echo "==> installing Debian chromium (needed by the math-rendering test)"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
. scripts/ensure_venv.sh
summary+=("$(printf '%-12s %-6s %4ss' setup ok "$((SECONDS - start))")")

stage ruff ruff check .
stage check_sync python scripts/check_sync.py
stage build ./build_book.sh

echo "==> stages before pytest:"
printf '    %s\n' "${summary[@]}"
echo "==> [pytest] unit tests, book tests (Chromium), nbval on chapters/*.ipynb"
shopt -s nullglob
notebooks=(chapters/[0-9][0-9]_*.ipynb)
NTK_BOOK_REQUIRE_BUILD=1 exec python -m pytest -n 2 --dist loadfile -ra --durations=5 tests "${notebooks[@]}" \
    --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
