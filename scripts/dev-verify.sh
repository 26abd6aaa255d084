#!/usr/bin/env bash
# End-to-end check of a development checkout on loopback: start the server (from the working
# tree) and a stock sing-box client made from the server's own --print-client-config, then
#   TCP: curl through the client's SOCKS5 port fetches a generated file from a local
#        "python -m http.server"; the bytes must match (cmp and sha256);
#   UDP: a SOCKS5 UDP ASSOCIATE client sends datagrams to a local UDP echo; each must come
#        back unchanged from the echo's address.
# Stops everything and exits non-zero on any failure. Every wait is bounded.
#
# Environment: ANYTLS_PASSWORD (default: generated for this run), SINGBOX_VERSION (1.14.4),
# KEEP=1 keeps the work directory (logs, configs) for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/dev-lib.sh

dev_install
WORK=$(mktemp -d "${TMPDIR:-/tmp}/anytls-dev-verify.XXXXXX")
client_pid=""; http_pid=""
finish() {
    local status=$?
    trap - EXIT
    trap '' INT TERM  # a second Ctrl-C must not cut the cleanup short
    dev_stop_pid "$client_pid" 5
    dev_stop_pid "$http_pid" 5
    dev_stop_pid "$server_pid" 10
    if [ "$status" -ne 0 ]; then
        for log in server client http; do
            [ -s "$WORK/$log.log" ] && { echo "--- last lines of the $log log ($WORK/$log.log) ---"; tail -n 15 "$WORK/$log.log"; }
        done
        echo "dev-verify: FAILED" >&2
    else
        echo "dev-verify: OK"
    fi
    if [ "${KEEP:-}" = 1 ] || [ "$status" -ne 0 ]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT TERM

step() { printf '==> %s\n' "$*"; }

ANYTLS_PORT=$(dev_free_port); SOCKS_PORT=$(dev_free_port); HTTP_PORT=$(dev_free_port)
dev_password "$WORK/password"
dev_server_args "$ANYTLS_PORT" "$WORK/password" "$WORK/state"

step "server on 127.0.0.1:$ANYTLS_PORT"
dev_start_server "$WORK/server.log"
dev_wait_port "$ANYTLS_PORT" "$server_pid" 30 "the server"

step "sing-box $("$(dev_singbox)" version | head -n 1 | awk '{print $3}') client, SOCKS5 on 127.0.0.1:$SOCKS_PORT"
dev_client_config "$WORK/client.json" "$SOCKS_PORT" info
"$(dev_singbox)" run -c "$WORK/client.json" > "$WORK/client.log" 2>&1 &
client_pid=$!
dev_wait_port "$SOCKS_PORT" "$client_pid" 30 "the sing-box client"

step "TCP: curl through SOCKS5 from http.server on 127.0.0.1:$HTTP_PORT"
mkdir -p "$WORK/www"
head -c $((3 * 1024 * 1024 + 12345)) /dev/urandom > "$WORK/www/blob.bin"
"$PY" -m http.server "$HTTP_PORT" --bind 127.0.0.1 --directory "$WORK/www" > "$WORK/http.log" 2>&1 &
http_pid=$!
dev_wait_port "$HTTP_PORT" "$http_pid" 15 "the HTTP server"
curl --silent --show-error --fail --max-time 60 \
    --proxy "socks5h://127.0.0.1:$SOCKS_PORT" \
    --output "$WORK/got.bin" "http://127.0.0.1:$HTTP_PORT/blob.bin"
cmp "$WORK/www/blob.bin" "$WORK/got.bin"
want=$(sha256sum < "$WORK/www/blob.bin" | cut -d' ' -f1)
got=$(sha256sum < "$WORK/got.bin" | cut -d' ' -f1)
[ "$want" = "$got" ] || { echo "sha256 differs: sent $want, got $got" >&2; exit 1; }
echo "    $(stat -c %s "$WORK/got.bin") bytes, sha256 $got: identical"

step "UDP: SOCKS5 UDP ASSOCIATE to a UDP echo on 127.0.0.1"
"$PY" - "$SOCKS_PORT" <<'PY'
import ipaddress, os, socket, struct, sys, threading

socks_port = int(sys.argv[1])
SIZES = [4, 64, 512, 1200, 1472, 4000, 8000]  # sing-box's SOCKS relay truncates past ~8 KiB
TRIES, PER_TRY = 4, 2.0

echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
echo.bind(("127.0.0.1", 0))
echo.settimeout(0.2)
stop = threading.Event()

def serve():
    while not stop.is_set():
        try:
            data, peer = echo.recvfrom(65535)
        except socket.timeout:
            continue
        echo.sendto(data, peer)

threading.Thread(target=serve, daemon=True).start()
echo_addr = echo.getsockname()

def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            sys.exit("the SOCKS server closed the control connection")
        data += chunk
    return data

control = socket.create_connection(("127.0.0.1", socks_port), timeout=10)
control.sendall(b"\x05\x01\x00")
if recv_exact(control, 2) != b"\x05\x00":
    sys.exit("SOCKS5 greeting refused")
control.sendall(b"\x05\x03\x00\x01" + bytes(4) + bytes(2))  # UDP ASSOCIATE, 0.0.0.0:0
reply = recv_exact(control, 4)
if reply[1] != 0:
    sys.exit(f"UDP ASSOCIATE failed with reply code {reply[1]}")
if reply[3] == 1:
    relay_host = str(ipaddress.IPv4Address(recv_exact(control, 4)))
elif reply[3] == 4:
    relay_host = str(ipaddress.IPv6Address(recv_exact(control, 16)))
else:
    relay_host = recv_exact(control, recv_exact(control, 1)[0]).decode()
relay_port = struct.unpack(">H", recv_exact(control, 2))[0]
if relay_host in ("0.0.0.0", "::"):
    relay_host = "127.0.0.1"

client = socket.socket(socket.AF_INET6 if ":" in relay_host else socket.AF_INET, socket.SOCK_DGRAM)
client.settimeout(PER_TRY)
header = b"\x00\x00\x00\x01" + socket.inet_aton(echo_addr[0]) + struct.pack(">H", echo_addr[1])
resent = 0
for index, size in enumerate(SIZES):
    payload = struct.pack(">I", index) + os.urandom(size - 4)  # a 4-byte id, then noise
    for attempt in range(TRIES):
        client.sendto(header + payload, (relay_host, relay_port))
        try:
            while True:
                data, _ = client.recvfrom(65535)
                if data[:10] != header:
                    sys.exit(f"datagram {index}: unexpected SOCKS header {data[:10].hex()}")
                if data[10:14] != payload[:4]:
                    continue  # a late copy of an earlier, resent datagram
                if data[10:] != payload:
                    sys.exit(f"datagram {index}: {size} bytes sent, {len(data) - 10} different bytes came back")
                break
        except socket.timeout:
            resent += 1
            continue
        break
    else:
        sys.exit(f"datagram {index} ({size} bytes) never came back after {TRIES} tries")
stop.set()
control.close()
print(f"    {len(SIZES)} datagrams ({', '.join(map(str, SIZES))} bytes) echoed unchanged; {resent} resent")
PY

step "server log"
opened=$(grep -c ' open from ' "$WORK/server.log" || true)
echo "    sessions opened: $opened"
[ "${opened:-0}" -ge 1 ] || { echo "the server logged no session" >&2; exit 1; }
if grep -E 'Traceback|Unhandled' "$WORK/server.log"; then
    echo "the server logged an error" >&2
    exit 1
fi
