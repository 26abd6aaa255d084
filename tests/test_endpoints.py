"""The one endpoint-string parser: Twisted's syntax both ways, and its helpers."""

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import _parse, quoteStringArgument
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted import clientconfig, tls
from anytls_twisted.endpoints import EndpointString, parse, quote
from anytls_twisted.server import workers
from anytls_twisted.server.configfile import FileSettings
from anytls_twisted.server.tap import Options

# Arguments made mostly of the characters the syntax gives a meaning to.
_TEXT = st.text(alphabet=st.sampled_from(":=\\ab1é"), max_size=8) | st.text(max_size=8)
# Twisted wants its keywords in ASCII (they become Python keyword arguments).
_ASCII = st.text(alphabet=st.sampled_from(":=\\ab1"), max_size=8) | st.text(
    alphabet=st.characters(max_codepoint=127), max_size=8
)


def endpoint_strings(keywords=_TEXT):
    return st.builds(
        EndpointString,
        _TEXT,
        st.lists(_TEXT, max_size=4).map(tuple),
        st.lists(st.tuples(keywords, _TEXT), max_size=4).map(tuple),
    )


def assert_one_line_errors(case, function, cases):
    """``function(argument)`` raises a one-line ValueError containing ``fragment``, for each
    ``(argument, fragment)`` in ``cases``."""
    for argument, fragment in cases:
        e = case.assertRaises(ValueError, function, argument)
        case.assertIn(fragment, str(e), argument)
        case.assertNotIn("\n", str(e), argument)


def twisted_reading(endpoint: EndpointString):
    """What Twisted's ``_parse`` returns for a string meaning ``endpoint``."""
    return [endpoint.kind, *endpoint.args], dict(endpoint.kwargs)


class SyntaxTests(SynchronousTestCase):
    @settings(deadline=None, max_examples=300)
    @given(endpoint_strings())
    def test_round_trip(self, endpoint):
        """Whatever the arguments hold, formatting then parsing gives them back."""
        self.assertEqual(parse(endpoint.format()), endpoint)
        self.assertEqual(str(endpoint), endpoint.format())

    @settings(deadline=None, max_examples=300)
    @given(endpoint_strings(keywords=_ASCII))
    def test_twisted_reads_the_format(self, endpoint):
        self.assertEqual(_parse(endpoint.format()), twisted_reading(endpoint))

    @settings(deadline=None, max_examples=500)
    @given(st.text(alphabet=st.sampled_from(":=\\ab"), max_size=12))
    def test_parses_as_twisted(self, text):
        """parse reads a string as Twisted does, and format keeps that meaning; where Twisted
        finds no type or fails (a lone backslash), parse says so in one line."""
        try:
            expected = _parse(text)
        except RuntimeError:  # StopIteration from the trailing backslash
            e = self.assertRaises(ValueError, parse, text)
            self.assertIn("lone backslash", str(e))
            return
        if not expected[0]:
            e = self.assertRaises(ValueError, parse, text)
            self.assertIn("names no endpoint type", str(e))
            return
        endpoint = parse(text)
        self.assertEqual(twisted_reading(endpoint), expected)
        self.assertEqual(_parse(endpoint.format()), expected)

    @given(st.text(max_size=12))
    def test_quote_is_twisteds(self, text):
        self.assertEqual(quote(text), quoteStringArgument(text))

    def test_examples(self):
        for text, kind, args, kwargs in [
            ("tcp:8443", "tcp", ("8443",), ()),
            (r"tcp:443:interface=\:\:1", "tcp", ("443",), (("interface", "::1"),)),
            (
                "haproxy:tcp:443:backlog=5",
                "haproxy",
                ("tcp", "443"),
                (("backlog", "5"),),
            ),
            # The type is the first positional argument, wherever it stands.
            (
                r"certKey=C\:\\c.pem:unix:/a\:b.sock",
                "unix",
                ("/a:b.sock",),
                (("certKey", "C:\\c.pem"),),
            ),
            ("unix:/x:mode=a=b", "unix", ("/x",), (("mode", "a=b"),)),
            (r"unix:a\=b", "unix", ("a=b",), ()),
            ("ssl:", "ssl", ("",), ()),
            ("", "", (), ()),
            ("x:k=1:k=2", "x", (), (("k", "1"), ("k", "2"))),
        ]:
            self.assertEqual(parse(text), EndpointString(kind, args, kwargs), text)

    def test_format_escapes(self):
        self.assertEqual(
            EndpointString("unix", ("/a:b=c\\d",), (("k=x", "v:=\\"),)).format(),
            r"unix:/a\:b\=c\\d:k\=x=v\:=\\",
        )
        self.assertEqual(
            EndpointString("tcp", ("1",), (("interface", "::1"),)).format(),
            r"tcp:1:interface=\:\:1",
        )

    def test_errors_are_one_line(self):
        assert_one_line_errors(
            self,
            parse,
            [
                ("ssl:443\\", "lone backslash"),
                ("a=b", "names no endpoint type"),
                ("a=b:c=d", "names no endpoint type"),
            ],
        )


class HelperTests(SynchronousTestCase):
    def test_keyword(self):
        endpoint = parse("tcp:1:backlog=5:interface=a:backlog=7")
        self.assertEqual(endpoint.keyword("backlog"), "7")  # the last counts, as in Twisted
        self.assertEqual(endpoint.keyword("interface"), "a")
        self.assertIsNone(endpoint.keyword("port"))
        self.assertIsNone(parse("tcp:backlog").keyword("backlog"))  # positional

    def test_with_keyword(self):
        endpoint = parse("tcp:1:backlog=5:interface=a:backlog=7")
        self.assertEqual(str(endpoint.with_keyword("backlog", "9")), "tcp:1:backlog=9:interface=a")
        self.assertEqual(
            str(endpoint.with_keyword("mode", "a:b")),
            r"tcp:1:backlog=5:interface=a:backlog=7:mode=a\:b",
        )
        self.assertEqual(str(parse("tcp:1").with_keyword("backlog", "9")), "tcp:1:backlog=9")

    def test_without_keywords(self):
        endpoint = parse("tls:unix:/a:privateKey=k:mode=660:certKey=c:privateKey=l")
        self.assertEqual(
            endpoint.without_keywords("privateKey", "certKey"), parse("tls:unix:/a:mode=660")
        )
        self.assertEqual(endpoint.without_keywords(), endpoint)

    def test_argument(self):
        """A parameter given by position (after the type) or by keyword."""
        self.assertEqual(parse("tcp:8443").argument(0, "port"), "8443")
        self.assertEqual(parse("tcp:port=8443").argument(0, "port"), "8443")
        self.assertEqual(parse("tcp:8443::7").argument(2, "backlog"), "7")
        self.assertEqual(parse("tcp:8443:interface=x").argument(1, "interface"), "x")
        self.assertIsNone(parse("tcp:8443").argument(1, "interface"))
        self.assertIsNone(parse("tcp").argument(0, "port"))

    def test_with_argument(self):
        self.assertEqual(
            str(parse("tcp:1:interface=x").with_argument(0, "port", "2")), "tcp:2:interface=x"
        )
        self.assertEqual(
            str(parse("tcp:port=1:interface=x").with_argument(0, "port", "2")),
            "tcp:port=2:interface=x",
        )
        self.assertEqual(str(parse("tcp").with_argument(0, "port", "2")), "tcp:port=2")

    def test_unwrap_and_wrap(self):
        wrapped = parse("haproxy:tcp:443:backlog=5")
        inner = wrapped.unwrap()
        self.assertEqual(inner, parse("tcp:443:backlog=5"))
        self.assertEqual(inner.wrap(), wrapped)
        self.assertEqual(parse("tls:unix:/a").unwrap("tls"), parse("unix:/a"))
        self.assertIsNone(parse("tcp:443").unwrap())
        self.assertIsNone(parse("haproxy").unwrap())
        self.assertIsNone(parse("haproxy:backlog=5").unwrap())

    def test_innermost(self):
        self.assertEqual(parse("haproxy:haproxy:tcp:1:k=v").innermost(), parse("tcp:1:k=v"))
        self.assertEqual(parse("tcp:1").innermost(), parse("tcp:1"))
        self.assertEqual(parse("haproxy").innermost(), parse("haproxy"))


class CallerTests(SynchronousTestCase):
    """Every place that reads or writes endpoint strings escapes as Twisted does."""

    def test_parse_tcp(self):
        t = workers.parse_tcp(r"haproxy:tcp:8443:interface=\:\:1:backlog=9")
        self.assertEqual(
            (t.host, t.port, t.backlog, t.family, t.haproxy),
            ("::1", 8443, 9, socket.AF_INET6, True),
        )
        t = workers.parse_tcp("tcp6:port=1")
        self.assertEqual((t.host, t.port, t.family, t.haproxy), ("::", 1, socket.AF_INET6, False))
        assert_one_line_errors(
            self,
            workers.parse_tcp,
            [
                ("tcp:1:backlog=x", "backlog 'x' is not a number"),
                ("tcp:1\\", "lone backslash"),
                ("tcp:1:127.0.0.1", "unexpected '127.0.0.1'"),
                ("tcp:interface=a", "no port number"),
            ],
        )

    def test_metrics_for(self):
        self.assertEqual(
            workers.metrics_for(r"tcp6:9095:interface=\:\:1", 1), r"tcp6:9096:interface=\:\:1"
        )
        self.assertEqual(
            workers.metrics_for("tcp:interface=a:port=9095", 2), "tcp:interface=a:port=9097"
        )
        assert_one_line_errors(
            self,
            lambda description: workers.metrics_for(description, 1),
            [
                (description, "with --workers give a tcp:PORT endpoint")
                for description in ["tcp:9095abc", "tcp:interface=a", "haproxy:tcp:1", "tcp:1\\"]
            ],
        )

    def test_listen_address(self):
        self.assertEqual(
            clientconfig.listen_address(r"haproxy:haproxy:tcp:443:interface=a\\b"), ("a\\b", 443)
        )
        self.assertEqual(clientconfig.listen_address("tcp:1\\"), (None, None))

    def test_config_file_listen_round_trips(self):
        """A config file's listen address reaches the listening endpoint unchanged, whatever
        characters it holds."""
        for listen in ["::1", "fe80::1%eth0", "a\\b", "a=b"]:
            settings = FileSettings("f.json", listen=listen, listen_port=8443)
            spec = tls.parse_port(settings.port_description())
            self.assertEqual(
                parse(spec.endpoint), EndpointString("tcp", ("8443",), (("interface", listen),))
            )

    def test_listen_endpoint_positional_backlog(self):
        """A backlog given by position (tcp:PORT:INTERFACE:BACKLOG) is not given twice."""
        self.assertEqual(tls.listen_endpoint("tcp:8443::7"), "tcp:8443::7")


class PortOptionErrorTests(SynchronousTestCase):
    """A bad ``--port`` is one line that names the option and what is wrong."""

    def assertUsageError(self, port, message):
        options = Options()
        e = self.assertRaises(
            usage.UsageError,
            options.parseOptions,
            ["--state-dir", self.mktemp(), "--password", "x", "--port", port],
        )
        self.assertEqual(str(e), message)

    def test_ssl_port_not_a_number(self):
        self.assertUsageError(
            "ssl:abc", "--port ssl:abc: ssl port must be a number from 0 to 65535, got 'abc'"
        )

    def test_no_port_number(self):
        self.assertUsageError("tcp:", "--port tcp:: a tcp port needs a port number, e.g. tcp:8443")
        self.assertUsageError(
            "haproxy:tcp6", "--port haproxy:tcp6: a tcp6 port needs a port number, e.g. tcp6:8443"
        )
        self.assertUsageError("ssl:", "--port ssl:: an ssl port needs a port number, e.g. ssl:8443")

    def test_tcp_port_not_a_number(self):
        self.assertUsageError(
            "tcp:port=https",
            "--port tcp:port=https: tcp port must be a number from 0 to 65535, got 'https'",
        )
