"""anytls-twisted: an AnyTLS proxy, server and client, on Twisted.

The package is laid out by who uses the code:

* :mod:`anytls_twisted.protocol`: the pure protocol core, no Twisted and no I/O: frames,
  authentication, padding, addresses, UDP-over-TCP and the session machine. Both sides use it.
* :mod:`anytls_twisted.server`: the server's Twisted shells (session, streams, UDP, dialer,
  service, reload, workers) and its ``twistd anytls`` plugin.
* :mod:`anytls_twisted.client`: the client side.
* Modules at this level are operations both sides share: endpoints, TLS, certificates, logs,
  metrics and client-config export.

docs/architecture.md draws the layers.
"""

from ._version import __version__

__all__ = ["__version__"]
