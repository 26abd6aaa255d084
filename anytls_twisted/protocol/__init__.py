"""The AnyTLS protocol core, shared by the server and the client.

Everything here is pure: bytes and events in, frames and actions out. Nothing imports Twisted
or touches a socket, so it is tested without a reactor and type-checked strictly.
"""
