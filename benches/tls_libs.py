"""CPU per GiB of TLS records, in memory: the standard library's ``ssl`` against the pyOpenSSL
path our transport takes (``tls_transport.BulkTLSProtocol``: ``SSL_write`` per 16 KiB record,
``BIO_read``/``SSL_read`` into scratch buffers through pyOpenSSL's cffi bindings).

    .venv/bin/python benches/tls_libs.py [--mib 512]

A server and a client of each library handshake through memory BIOs (TLS 1.3, an EC P-256
certificate made here), then the server encrypts ``--mib`` MiB in 64 KiB frames, and decrypts
as much from the client in batches of 256 frames (only the server's side is timed). It answers
one question: would a TLS layer on ``ssl`` (which idle memory asks for, docs/performance.md,
"Idle memory") cost CPU per byte? No sockets, no reactor; process CPU time.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import tempfile
import time
from typing import Callable, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from OpenSSL import SSL  # noqa: E402
from OpenSSL._util import ffi, lib  # noqa: E402

from anytls_twisted.certs import ensure_self_signed  # noqa: E402

FRAME = os.urandom(65535 + 7)
BATCH = 256


def _handshake(steps: Callable[[], bool]) -> None:
    for _ in range(20):
        if steps():
            return
    raise RuntimeError("no handshake in 20 rounds")


def stdlib(cert: str, key: str, frames: int) -> tuple:
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = sctx.wrap_bio(si, so, server_side=True)
    client = cctx.wrap_bio(ci, co, server_hostname="localhost")

    def step() -> bool:
        done = 0
        for end in (server, client):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        si.write(co.read())
        ci.write(so.read())
        return done == 2

    _handshake(step)
    started = time.process_time()
    for _ in range(frames):
        server.write(FRAME)
        so.read()
    encrypt = time.process_time() - started
    decrypt, scratch = 0.0, bytearray(32 * 1024)
    for _ in range(frames // BATCH):
        records: List[bytes] = []
        for _ in range(BATCH):
            client.write(FRAME)
            records.append(co.read())
        started = time.process_time()
        for record in records:
            si.write(record)
            while True:
                try:
                    got = server._sslobj.read(len(scratch), scratch)  # type: ignore[attr-defined]
                except ssl.SSLWantReadError:
                    break
                bytes(memoryview(scratch)[:got])
        decrypt += time.process_time() - started
    return encrypt, decrypt, server.cipher()[0]


def pyopenssl(cert: str, key: str, frames: int) -> tuple:
    sctx = SSL.Context(SSL.TLS_METHOD)
    sctx.use_certificate_file(cert)
    sctx.use_privatekey_file(key)
    server = SSL.Connection(sctx, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()

    def step() -> bool:
        done = 0
        for end in (server, client):
            try:
                end.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
        for src, dst in ((client, server), (server, client)):
            try:
                dst.bio_write(src.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
        return done == 2

    _handshake(step)
    out, into = ffi.new("char[]", 128 * 1024), ffi.new("char[]", 32 * 1024)
    started = time.process_time()
    for _ in range(frames):
        view, done, filled = ffi.from_buffer(FRAME), 0, 0
        while done < len(FRAME):
            done += lib.SSL_write(server._ssl, view + done, min(16384, len(FRAME) - done))
            while True:
                got = lib.BIO_read(server._from_ssl, out + filled, 128 * 1024 - filled)
                if got <= 0:
                    break
                filled += got
        bytes(ffi.buffer(out, filled))
    encrypt = time.process_time() - started
    decrypt = 0.0
    for _ in range(frames // BATCH):
        records = []
        for _ in range(BATCH):
            client.sendall(FRAME)
            records.append(client.bio_read(1 << 20))
        started = time.process_time()
        for record in records:
            server.bio_write(record)
            while True:
                got = lib.SSL_read(server._ssl, into, 32 * 1024)
                if got <= 0:
                    break
                ffi.buffer(into, got)[:]
        decrypt += time.process_time() - started
    return encrypt, decrypt, server.get_cipher_name()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB each way (default 512)")
    args = parser.parse_args()
    frames = max(BATCH, args.mib * 1024 * 1024 // len(FRAME) // BATCH * BATCH)
    gib = frames * len(FRAME) / 2**30
    with tempfile.TemporaryDirectory() as state:
        cert, key = ensure_self_signed(state)
        for name, run in (("ssl", stdlib), ("pyOpenSSL", pyopenssl)):
            encrypt, decrypt, cipher = run(cert, key, frames)
            print(
                f"{name:10} {cipher:24} encrypt {encrypt / gib:.3f} s/GiB, "
                f"decrypt {decrypt / gib:.3f} s/GiB ({ssl.OPENSSL_VERSION if name == 'ssl' else SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()})"
            )


if __name__ == "__main__":
    main()
