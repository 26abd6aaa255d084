"""The AnyTLS client (``twistd anytls-client``): to come.

It will reuse :mod:`anytls_twisted.protocol` (frames, padding writer, addresses, UDP-over-TCP
and the session machine with the client's rules) and the shared TLS, endpoint, log and metrics
modules; only the local SOCKS5/HTTP listeners and the session pool are its own.
"""
