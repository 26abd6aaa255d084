"""Auth preamble, user table and padding schemes against the protocol document."""

from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol.auth import PreambleReader, UserTable, encode_preamble, password_digest
from anytls_twisted.protocol.padding import (
    DEFAULT_SCHEME,
    DEFAULT_SCHEME_BYTES,
    PaddingScheme,
    PaddingSchemeError,
)

from .helpers import unhex

V1 = unhex(
    "2f 9a cb 02 fa a1 21 bb 2a 36 21 95 1f 57 b4 c6 90 65 53 37 ed ee 2e 5a c3 50 be 2b 3b e8 8e a8"
)
V13_DATA = unhex(
    """73 74 6f 70 3d 38 0a 30 3d 33 30 2d 33 30 0a 31 3d 31 30 30 2d 34 30 30 0a 32 3d 34 30 30
    2d 35 30 30 2c 63 2c 35 30 30 2d 31 30 30 30 2c 63 2c 35 30 30 2d 31 30 30 30 2c 63 2c 35 30
    30 2d 31 30 30 30 2c 63 2c 35 30 30 2d 31 30 30 30 0a 33 3d 39 2d 39 2c 35 30 30 2d 31 30 30
    30 0a 34 3d 35 30 30 2d 31 30 30 30 0a 35 3d 35 30 30 2d 31 30 30 30 0a 36 3d 35 30 30 2d 31
    30 30 30 0a 37 3d 35 30 30 2d 31 30 30 30"""
)


class PreambleTests(SynchronousTestCase):
    def test_vectors(self):
        """V1 digest, V2 (no padding) and V3 (stock 30-byte padding) preambles."""
        self.assertEqual(password_digest("PASS"), V1)
        self.assertEqual(encode_preamble("PASS"), V1 + b"\x00\x00")
        self.assertEqual(encode_preamble("PASS", 30), V1 + b"\x00\x1e" + bytes(30))

    def test_byte_at_a_time_with_trailing_bytes(self):
        """The preamble is collected across reads; bytes after it are handed back."""
        wire = encode_preamble("PASS", 30) + b"frames"
        reader = PreambleReader()
        results = [reader.feed(wire[i : i + 1]) for i in range(64)]
        self.assertEqual(results[:-1], [None] * 63)
        self.assertEqual(results[-1], (V1, b""))

    def test_rest_in_same_read(self):
        self.assertEqual(PreambleReader().feed(encode_preamble("PASS", 3) + b"xyz"), (V1, b"xyz"))


class UserTableTests(SynchronousTestCase):
    def test_lookup(self):
        """A digest maps to its user; unknown digests and near misses map to nothing."""
        table = UserTable([("alice", "PASS"), ("bob", "hunter2")])
        self.assertEqual(table.lookup(V1), "alice")
        self.assertEqual(table.lookup(password_digest("hunter2")), "bob")
        self.assertIsNone(table.lookup(password_digest("pass")))
        self.assertIsNone(table.lookup(V1[:-1] + bytes([V1[-1] ^ 1])))
        self.assertIsNone(table.lookup(b""))

    def test_same_password_later_user_wins(self):
        self.assertEqual(UserTable([("a", "x"), ("b", "x")]).lookup(password_digest("x")), "b")

    def test_empty_refused(self):
        self.assertRaises(ValueError, UserTable, [])


class PaddingTests(SynchronousTestCase):
    def test_default_bytes_and_md5(self):
        """The default scheme is the document's 137 bytes with md5 75cff2ad..."""
        self.assertEqual(DEFAULT_SCHEME_BYTES, V13_DATA)
        self.assertEqual(DEFAULT_SCHEME.md5, "75cff2ad89aadf5e257059ee571ebe11")
        self.assertEqual(DEFAULT_SCHEME.stop, 8)
        self.assertEqual(DEFAULT_SCHEME.plans[0], ((30, 30),))

    def test_invalid(self):
        """Schemes a client would reject are refused with a reason."""
        for raw, why in [
            (b"0=30-30", "stop"),
            (b"stop=8\r\n0=30-30", "CR"),
            (b"stop=x", "stop"),
            (b"stop=2\n1=10-", "range"),
            (b"stop=2\n1=0-10", "range"),
            (b"stop=2\nfoo=1-2", "unknown key"),
            (b"\xff", "UTF-8"),
        ]:
            e = self.assertRaises(PaddingSchemeError, PaddingScheme.parse, raw)
            self.assertIn(why, str(e))

    def test_numbers_as_clients_read_them(self):
        """Found by fuzz/padding.py: Python's int() takes " 8", "8_0" and non-ASCII digits,
        which the Go clients' strconv refuses (so they would reject the scheme we send, or
        read another plan). Numbers are ASCII digits with an optional sign, within 64 bits,
        ``stop`` within 32; packets are named in canonical decimal, as clients look them up."""
        for raw, why in [
            (b"stop= 8", "stop"),
            (b"stop=8\t", "stop"),
            (b"stop=8_0", "stop"),
            ("stop=\u0668".encode(), "stop"),
            (b"stop=4294967296", "stop"),
            (b"stop=2\n01=10-20", "unknown key"),
            (b"stop=2\n+1=10-20", "unknown key"),
            (b"stop=2\n 1=10-20", "unknown key"),
            (b"stop=2\n1=10-2 ", "range"),
            (b"stop=2\n1=1_0-20", "range"),
            (b"stop=2\n1=10-9223372036854775808", "range"),
        ]:
            e = self.assertRaises(PaddingSchemeError, PaddingScheme.parse, raw)
            self.assertIn(why, str(e), raw)
        scheme = PaddingScheme.parse(b"stop=+2\n1=+10-9223372036854775807")
        self.assertEqual(scheme.stop, 2)
        self.assertEqual(scheme.plans[1], ((10, 9223372036854775807),))

    def test_custom_keeps_exact_bytes(self):
        """A file's exact bytes (trailing newline included) are what is hashed and sent."""
        scheme = PaddingScheme.parse(b"stop=3\n0=10-20\n1=100-200,c,300-400\n")
        self.assertEqual(scheme.raw, b"stop=3\n0=10-20\n1=100-200,c,300-400\n")
        self.assertEqual(scheme.plans[1], ((100, 200), (-1, -1), (300, 400)))
        self.assertNotEqual(scheme.md5, DEFAULT_SCHEME.md5)
