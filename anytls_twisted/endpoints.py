"""Endpoint strings (``--port``, ``--metrics``, what we hand Twisted): the one parser.

The syntax is Twisted's (``twisted.internet.endpoints._tokenize``, ``_parse`` and
``quoteStringArgument``): ``:`` separates arguments, a backslash makes the next character
literal, and the first unescaped ``=`` of an argument splits it into a keyword and its value
(later ones belong to the value). An argument without ``=`` is positional; the first positional
one names the endpoint type, wherever it stands. ``haproxy:tcp:443:backlog=5`` is the
``haproxy`` type with the positional arguments ``tcp`` and ``443`` and the keyword ``backlog``:
Twisted's ``haproxy:`` parser joins all of them back into the endpoint it wraps.

:class:`EndpointString` holds a parsed string; its :meth:`~EndpointString.format` gives the
string back with the escaping Twisted expects, positional arguments first.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import attr

#: The type of Twisted's PROXY protocol wrapper, ``haproxy:ENDPOINT``.
HAPROXY = "haproxy"

Keyword = Tuple[str, str]


def quote(argument: str) -> str:
    """An argument escaped as Twisted's ``quoteStringArgument`` does it: a backslash before
    every backslash and colon. Enough for a keyword's value, where ``=`` is literal."""
    return argument.replace("\\", "\\\\").replace(":", "\\:")


def _quote_name(argument: str) -> str:
    """A positional argument or a keyword escaped: also ``=``, which would start a value."""
    return quote(argument).replace("=", "\\=")


def _split(text: str) -> List[Tuple[str, Optional[str]]]:
    """Per argument, ``(text, None)`` if positional or ``(keyword, value)``, unescaped."""
    arguments: List[Tuple[str, Optional[str]]] = []
    keyword: Optional[str] = None  # set at the argument's first unescaped "="
    current: List[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError(
                    "the endpoint string ends with a lone backslash (a backslash makes the "
                    "next character literal; write \\\\ for one)"
                )
            current.append(escaped)
        elif char == ":":
            value = "".join(current)
            arguments.append((value, None) if keyword is None else (keyword, value))
            keyword, current = None, []
        elif char == "=" and keyword is None:
            keyword, current = "".join(current), []
        else:
            current.append(char)
    value = "".join(current)
    arguments.append((value, None) if keyword is None else (keyword, value))
    return arguments


@attr.frozen
class EndpointString:
    """A parsed endpoint string: its type, positional arguments and keyword arguments.

    ``kwargs`` keeps every keyword in the order given, repeats included; as in Twisted, the
    last of a repeated keyword is the one that counts (:meth:`keyword`).
    """

    kind: str
    args: Tuple[str, ...] = ()
    kwargs: Tuple[Keyword, ...] = ()

    @classmethod
    def parse(cls, text: str) -> EndpointString:
        """Parse ``text`` as Twisted does; ``ValueError`` (one line) if it ends in a lone
        backslash or has no positional argument to name its type."""
        args: List[str] = []
        kwargs: List[Keyword] = []
        for name, value in _split(text):
            if value is None:
                args.append(name)
            else:
                kwargs.append((name, value))
        if not args:
            raise ValueError(
                "the endpoint string names no endpoint type: every argument in it is key=value"
            )
        return cls(args[0], tuple(args[1:]), tuple(kwargs))

    def format(self) -> str:
        """The endpoint string: type, positional arguments, then ``keyword=value`` pairs,
        escaped so that :meth:`parse` and Twisted read them back unchanged."""
        parts = [_quote_name(self.kind), *(_quote_name(arg) for arg in self.args)]
        parts += [f"{_quote_name(name)}={quote(value)}" for name, value in self.kwargs]
        return ":".join(parts)

    def __str__(self) -> str:
        return self.format()

    def keyword(self, name: str) -> Optional[str]:
        """The value of keyword ``name`` (the last one if repeated), or None."""
        found = None
        for key, value in self.kwargs:
            if key == name:
                found = value
        return found

    def with_keyword(self, name: str, value: str) -> EndpointString:
        """Keyword ``name`` set to ``value``: in place of the first one given (repeats are
        dropped), or added at the end."""
        kwargs: List[Keyword] = []
        replaced = False
        for key, old in self.kwargs:
            if key != name:
                kwargs.append((key, old))
            elif not replaced:
                kwargs.append((name, value))
                replaced = True
        if not replaced:
            kwargs.append((name, value))
        return attr.evolve(self, kwargs=tuple(kwargs))

    def without_keywords(self, *names: str) -> EndpointString:
        """Every keyword named in ``names`` removed."""
        return attr.evolve(self, kwargs=tuple(kw for kw in self.kwargs if kw[0] not in names))

    def argument(self, index: int, name: str) -> Optional[str]:
        """A parameter that the type's parser takes either as positional argument ``index``
        (0 is the one after the type) or as keyword ``name``, as Twisted's ``tcp:`` takes
        ``port``, ``interface`` and ``backlog``; None if given neither way."""
        if index < len(self.args):
            return self.args[index]
        return self.keyword(name)

    def with_argument(self, index: int, name: str, value: str) -> EndpointString:
        """That parameter set to ``value``, where it was given (as keyword if nowhere)."""
        if index < len(self.args):
            args = self.args[:index] + (value,) + self.args[index + 1 :]
            return attr.evolve(self, args=args)
        return self.with_keyword(name, value)

    def unwrap(self, wrapper: str = HAPROXY) -> Optional[EndpointString]:
        """The endpoint inside a ``wrapper:`` prefix, which gets all the other arguments
        (``haproxy:tcp:443:backlog=5`` -> ``tcp:443:backlog=5``); None if not so wrapped."""
        if self.kind != wrapper or not self.args:
            return None
        return EndpointString(self.args[0], self.args[1:], self.kwargs)

    def innermost(self, wrapper: str = HAPROXY) -> EndpointString:
        """The endpoint under every ``wrapper:`` prefix (itself if it has none)."""
        endpoint = self
        inner = endpoint.unwrap(wrapper)
        while inner is not None:
            endpoint, inner = inner, inner.unwrap(wrapper)
        return endpoint

    def wrap(self, wrapper: str = HAPROXY) -> EndpointString:
        """This endpoint under a ``wrapper:`` prefix; the inverse of :meth:`unwrap`."""
        return EndpointString(wrapper, (self.kind, *self.args), self.kwargs)


def parse(text: str) -> EndpointString:
    """:meth:`EndpointString.parse`."""
    return EndpointString.parse(text)
