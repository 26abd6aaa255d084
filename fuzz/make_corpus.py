"""Write the seed corpora in ``corpus/NAME/`` from the protocol document's test vectors
(anytls-protocol.md section 14) and the formats' documented examples.

Run it from this folder (``python make_corpus.py``) after changing a harness's input layout;
the files are small and committed. Each seed starts with the byte its harness reads first
(a mode, see the harness's docstring).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from anytls_twisted.protocol.padding import DEFAULT_SCHEME_BYTES  # noqa: E402


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("\n", " "))


PREAMBLE = hexbytes(
    "2f 9a cb 02 fa a1 21 bb 2a 36 21 95 1f 57 b4 c6 90 65 53 37 ed ee 2e 5a c3 50 be 2b"
    " 3b e8 8e a8"
)
V2 = PREAMBLE + b"\x00\x00"
V3 = PREAMBLE + b"\x00\x1e" + bytes(30)
V4 = b"\x04\x00\x00\x00\x00\x00\x4a" + (
    b"v=2\nclient=sing-anytls/0.0.11\npadding-md5=75cff2ad89aadf5e257059ee571ebe11"
)
V5 = hexbytes("0a 00 00 00 00 00 03 76 3d 32")
V6 = hexbytes("01 00 00 00 01 00 00")
V7 = hexbytes("02 00 00 00 01 00 0f 03 0b") + b"example.com" + b"\x00\x50"
V8 = hexbytes("02 00 00 00 01 00 07 01 7f 00 00 01 1f 90")
V9 = hexbytes("02 00 00 00 01 00 13 04") + bytes(15) + b"\x01\x01\xbb"
V10 = hexbytes("07 00 00 00 01 00 00")
V11 = hexbytes("03 00 00 00 01 00 00 08 00 00 00 00 00 00 09 00 00 00 00 00 00")
V12 = b"\x05\x00\x00\x00\x00\x00\x20client did not send its settings"
V13 = b"\x06\x00\x00\x00\x00\x00\x89" + DEFAULT_SCHEME_BYTES
V15 = V6.replace(b"\x01\x00\x00", b"\x02\x00\x00", 1) + (
    b"\x02\x00\x00\x00\x02\x00\x1b\x03\x17sp.v2.udp-over-tcp.arpa\x00\x00"
)
V16 = hexbytes("01 01 08 08 08 08 00 35 00 04") + b"ping"
V17 = hexbytes("00 01 08 08 08 08 00 35 00 08 08 08 08 00 35 00 04") + b"ping"
V18 = hexbytes("00 00 00 00 00 00 05 00 00 00 00 00")
UOT_V6 = hexbytes("01 20 01 48 60 48 60 00 00 00 00 00 00 00 00 88 88 00 35 00 04") + b"ping"
UOT_DOMAIN = b"\x02\x0adns.google\x00\x35\x00\x04ping"
FIRST_FLIGHT = V4 + V6 + V7.replace(b"\x00\x50", b"\x01\xbb")

SERVER_INBOUND = {
    "type": "anytls",
    "tag": "anytls-in",
    "listen": "::",
    "listen_port": 8443,
    "users": [{"name": "alice", "password": "PASS"}],
    "padding_scheme": DEFAULT_SCHEME_BYTES.decode().split("\n"),
    "tls": {
        "enabled": True,
        "server_name": "example.com",
        "certificate_path": "cert.pem",
        "key_path": "key.pem",
        "alpn": ["h2", "http/1.1"],
    },
}
CLIENT_OUTBOUND = {
    "type": "anytls",
    "tag": "proxy",
    "server": "example.com",
    "server_port": 443,
    "password": "PASS",
    "idle_session_check_interval": "30s",
    "idle_session_timeout": "1m30s",
    "min_idle_session": 2,
    "tls": {
        "enabled": True,
        "server_name": "example.com",
        "insecure": False,
        "alpn": ["h2"],
        "utls": {"enabled": True, "fingerprint": "chrome"},
    },
}
V2RAY = {
    "outbounds": [
        {
            "protocol": "anytls",
            "settings": {
                "servers": [
                    {"address": "a.example", "port": 443, "password": "PASS"},
                    {"address": "2001:db8::1", "port": 8443, "password": "PASS"},
                ],
                "idle_session_check_interval": 30,
                "idle_session_timeout": 30,
                "min_idle_session": 5,
            },
            "streamSettings": {
                "security": "tls",
                "tlsSettings": {"serverName": "a.example", "allowInsecure": False, "alpn": ["h2"]},
            },
        }
    ]
}
URI = b"anytls://PASS@example.com:443/?sni=example.com&insecure=0&alpn=h2,http/1.1&fp=chrome#home"


def j(document: object) -> bytes:
    return json.dumps(document, indent=1).encode()


SEEDS = {
    "codec": {
        "first-flight": b"\x00" + FIRST_FLIGHT,
        "server-replies": b"\x00" + V5 + V10 + V10[:4] + b"\x02\x00\x34" + b"x" * 52 + V11,
        "alert-scheme-waste": b"\x00" + V12 + V13 + V18,
        "addresses": b"\x00" + V7 + V8 + V9 + V15,
        "frames": b"\x01" + bytes(range(64)),
        "large": b"\x02" + bytes(range(255, 0, -1)),
    },
    "session": {
        "v3-first-flight": b"\x00\x03" + V3 + FIRST_FLIGHT + V8 + V11,
        "v2-preamble": b"\x00\x01" + V2 + V4 + V6 + V9,
        "syn-before-settings": b"\x00\x02" + V3 + V6 + V4,
        "valid-preamble": b"\x01\x02\x00\x1e" + V4.replace(b"v=2", b"v=1") + V6 + V7 + V11,
        "uot": b"\x01\x04\x00\x00" + V4 + V15 + V16 + V18 + V12,
    },
    "address": {
        "domain": b"\x00\x03\x0bexample.com\x00\x50",
        "ipv4": b"\x00\x01\x7f\x00\x00\x01\x1f\x90",
        "ipv6": b"\x00\x04" + bytes(15) + b"\x01\x01\xbb",
        "uot-ipv6": UOT_V6[:19].rjust(20, b"\x00"),
        "uot-domain": b"\x00" + UOT_DOMAIN[:14],
        "host-port": b"\x80\x00example.com:443",
        "host-ipv6": b"\x80\x01[2001:db8::1]:8443",
    },
    "uot": {
        "v2-connect": b"\x00" + V16 + b"\x00\x04pong",
        "v2-non-connect": b"\x00" + V17 + UOT_V6 + UOT_DOMAIN,
        "v1": b"\x01" + V17[8:] + UOT_V6 + UOT_DOMAIN,
    },
    "padding": {
        "default": DEFAULT_SCHEME_BYTES,
        "small": b"stop=3\n0=10-20\n1=5-5,c,300-400\n2=70000-70010",
    },
    "server_config": {
        "inbound": j(SERVER_INBOUND),
        "whole-config": j({"log": {}, "inbounds": [SERVER_INBOUND]}),
        "plain": b'{"type": "anytls", "listen_port": 443, "users": [{"password": "x"}]}',
    },
    "client_config": {
        "uri": b"\x00" + URI,
        "uri-ipv6": b"\x00anytls://p%40ss@[2001:db8::1]:8443?insecure=1",
        "uri-file": b"\x01# servers\n" + URI + b"\nanytls://PASS@192.0.2.1\n",
        "sing-box": b"\x01" + j(CLIENT_OUTBOUND),
        "sing-box-whole": b"\x01" + j({"outbounds": [{"type": "direct"}, CLIENT_OUTBOUND]}),
        "v2ray": b"\x01" + j(V2RAY),
        "durations": b"\x01"
        + j(dict(CLIENT_OUTBOUND, idle_session_timeout="1000000s", min_idle_session=0)),
    },
    "socks": {
        "socks5-connect": b"\x00\x05\x01\x00\x05\x01\x00\x03\x0bexample.com\x01\xbbGET /",
        "socks5-auth": b"\x01\x05\x02\x00\x02\x01\x01u\x01p\x05\x03\x00\x01" + bytes(6),
        "socks5-ipv6": b"\x10\x05\x01\x00\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50",
        "socks4": b"\x00\x04\x01\x00\x50\x7f\x00\x00\x01user\x00hello",
        "socks4a": b"\x00\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00",
        "udp-datagram": b"\x02\x00\x00\x00\x01\x08\x08\x08\x08\x00\x35ping",
    },
    "httpproxy": {
        "connect": b"\x0cCONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03",
        "connect-auth": b"\x0eCONNECT [2001:db8::1]:443 HTTP/1.1\r\n"
        b"Proxy-Authorization: Basic dTpw\r\n\r\n",
        "forward": b"\x0cGET http://example.com/a?b HTTP/1.1\r\nHost: example.com\r\n"
        b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nUpgrade: websocket\r\n"
        b"Content-Length: 4\r\n\r\nbody",
        "response": b"\x0dHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok",
        "response-101": b"\x01HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\n\n\x81\x00",
    },
}


def main() -> None:
    for name, seeds in SEEDS.items():
        folder = HERE / "corpus" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for label, data in seeds.items():
            (folder / label).write_bytes(data)
    check = hashlib.sha256(b"PASS").digest()
    assert PREAMBLE == check, "V1 does not match sha256('PASS')"


if __name__ == "__main__":
    main()
