#!/usr/bin/env bash
# Development quick start: install into .venv, then run the server on 127.0.0.1:${ANYTLS_PORT}
# and a stock sing-box client whose SOCKS5/HTTP proxy on 127.0.0.1:${SOCKS_PORT} tunnels
# through it. Ctrl-C stops both. (scripts/dev-verify.sh checks the same setup and exits.)
#
# Environment: ANYTLS_PASSWORD (default: generated once and kept in .cache/dev/password),
# ANYTLS_PORT (8443), SOCKS_PORT (1080), SINGBOX_VERSION (1.14.4).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/dev-lib.sh

ANYTLS_PORT=${ANYTLS_PORT:-8443}
SOCKS_PORT=${SOCKS_PORT:-1080}
DEV=.cache/dev
mkdir -p "$DEV" && chmod 700 "$DEV"

dev_install always
dev_password "$DEV/password"

client_pid=""
stop() {
    trap - EXIT
    trap '' INT TERM  # a second Ctrl-C must not cut the cleanup short
    dev_stop_pid "$client_pid" 5
    dev_stop_pid "$server_pid" 10
    echo "stopped"
}
trap stop INT TERM EXIT

dev_server_args "$ANYTLS_PORT" "$DEV/password" "$DEV/state"
dev_start_server
dev_wait_port "$ANYTLS_PORT" "$server_pid" 30 "the server"

# A client config from the server's own --print-client-config: it trusts the generated
# certificate by its public-key pin.
dev_client_config "$DEV/client.json" "$SOCKS_PORT"
"$(dev_singbox)" run -c "$DEV/client.json" &
client_pid=$!

cat <<MSG

anytls-twisted is listening on 127.0.0.1:${ANYTLS_PORT}; a sing-box client proxies SOCKS5/HTTP on 127.0.0.1:${SOCKS_PORT}.
Password: ${DEV}/password   Client config: ${DEV}/client.json
Try it (any HTTP server on loopback will do, e.g. python3 -m http.server 8000 --bind 127.0.0.1):
    curl -x socks5h://127.0.0.1:${SOCKS_PORT} http://127.0.0.1:8000/
or, on a machine with internet access:
    curl -x socks5h://127.0.0.1:${SOCKS_PORT} https://example.com/
Ctrl-C stops both.
MSG
wait -n "$server_pid" "$client_pid" || true
