"""The AnyTLS server: thin Twisted shells around :mod:`anytls_twisted.protocol`.

``twistd anytls`` (:mod:`.tap`) builds an :class:`~.service.AnyTLSService` from frozen
settings; sessions feed the protocol core's session machine and relay streams to origins.
"""
