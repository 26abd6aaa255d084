"""The frame codec against the protocol document's vectors, whole and in arbitrary splits."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol import codec
from anytls_twisted.protocol.codec import Command, Frame, FrameDecoder

from .helpers import unhex

V4 = unhex(
    """04 00 00 00 00 00 4a 76 3d 32 0a 63 6c 69 65 6e 74 3d 73 69 6e 67 2d 61 6e 79 74 6c 73 2f
    30 2e 30 2e 31 31 0a 70 61 64 64 69 6e 67 2d 6d 64 35 3d 37 35 63 66 66 32 61 64 38 39 61
    61 64 66 35 65 32 35 37 30 35 39 65 65 35 37 31 65 62 65 31 31"""
)
V4_DATA = b"v=2\nclient=sing-anytls/0.0.11\npadding-md5=75cff2ad89aadf5e257059ee571ebe11"
V5 = unhex("0a 00 00 00 00 00 03 76 3d 32")
V6 = unhex("01 00 00 00 01 00 00")
V7 = unhex("02 00 00 00 01 00 0f 03 0b 65 78 61 6d 70 6c 65 2e 63 6f 6d 00 50")
V8 = unhex("02 00 00 00 01 00 07 01 7f 00 00 01 1f 90")
V9 = unhex("02 00 00 00 01 00 13 04" + " 00" * 15 + " 01 01 bb")
V10_OK = unhex("07 00 00 00 01 00 00")
V10_ERR_TEXT = b"dial tcp 127.0.0.1:8080: connect: connection refused"
V10_ERR = unhex("07 00 00 00 01 00 34") + V10_ERR_TEXT
V11 = [unhex("03 00 00 00 01 00 00"), unhex("08 00 00 00 00 00 00"), unhex("09 00 00 00 00 00 00")]
V12 = unhex("05 00 00 00 00 00 20") + b"client did not send its settings"
V18 = unhex("00 00 00 00 00 00 05 00 00 00 00 00")

VECTORS = [
    (V4, Frame(Command.SETTINGS, 0, V4_DATA)),
    (V5, Frame(Command.SERVER_SETTINGS, 0, b"v=2")),
    (V6, Frame(Command.SYN, 1)),
    (V7, Frame(Command.PSH, 1, b"\x03\x0bexample.com\x00\x50")),
    (V8, Frame(Command.PSH, 1, b"\x01\x7f\x00\x00\x01\x1f\x90")),
    (V9, Frame(Command.PSH, 1, b"\x04" + bytes(15) + b"\x01\x01\xbb")),
    (V10_OK, Frame(Command.SYNACK, 1)),
    (V10_ERR, Frame(Command.SYNACK, 1, V10_ERR_TEXT)),
    (V11[0], Frame(Command.FIN, 1)),
    (V11[1], Frame(Command.HEART_REQUEST, 0)),
    (V11[2], Frame(Command.HEART_RESPONSE, 0)),
    (V12, Frame(Command.ALERT, 0, b"client did not send its settings")),
    (V18, Frame(Command.WASTE, 0, bytes(5))),
]
STREAM = b"".join(wire for wire, _ in VECTORS)
FRAMES = [frame for _, frame in VECTORS]


class VectorTests(SynchronousTestCase):
    def test_encode(self):
        """Each vector frame encodes to the document's bytes exactly."""
        for wire, frame in VECTORS:
            self.assertEqual(codec.encode_frame(frame.cmd, frame.sid, frame.data), wire)

    def test_decode(self):
        """Each vector decodes to its frame, and nothing is left over."""
        for wire, frame in VECTORS:
            decoder = FrameDecoder()
            self.assertEqual(decoder.feed(wire), [frame])
            self.assertEqual(decoder.pending, 0)

    def test_byte_at_a_time(self):
        """Feeding every vector one byte at a time yields the same frames in order."""
        decoder = FrameDecoder()
        out = []
        for i in range(len(STREAM)):
            out.extend(decoder.feed(STREAM[i : i + 1]))
        self.assertEqual(out, FRAMES)

    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
    def test_random_splits(self, cuts):
        """Any split of the byte stream decodes to the same frames."""
        decoder = FrameDecoder()
        out = []
        points = sorted(set(cuts))
        for start, stop in zip([0] + points, points + [len(STREAM)]):
            out.extend(decoder.feed(STREAM[start:stop]))
        self.assertEqual(out, FRAMES)

    def test_unknown_command_keeps_sync(self):
        """An unknown command with data is returned whole; the next frame still decodes."""
        wire = codec.encode_frame(200, 3, b"xyz") + V6
        self.assertEqual(FrameDecoder().feed(wire), [Frame(200, 3, b"xyz"), Frame(Command.SYN, 1)])

    def test_partial_frame_held(self):
        """A header whose data has not all arrived is held, not returned."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(V8[:10]), [])
        self.assertEqual(decoder.pending, 10)
        self.assertEqual(decoder.feed(V8[10:]), [FRAMES[4]])

    @settings(deadline=None, max_examples=60)
    @given(
        st.lists(st.integers(min_value=0, max_value=codec.MAX_DATA), min_size=1, max_size=6),
        st.lists(
            st.integers(min_value=1, max_value=40000).map(lambda n: n if n > 20 else n * 997),
            min_size=1,
            max_size=30,
        ),
    )
    def test_large_frames_in_record_sized_pieces(self, sizes, pieces):
        """Frames of up to 65535 bytes fed in pieces (as TLS records deliver them) decode to
        the same frames, with ``bytes`` payloads, and the held bytes never exceed one frame."""
        frames = [Frame(Command.PSH, i + 1, bytes([i % 256]) * n) for i, n in enumerate(sizes)]
        wire = b"".join(codec.encode_frame(*f) for f in frames)
        decoder = FrameDecoder()
        out, pos, turn, decoded = [], 0, 0, 0
        while pos < len(wire):
            step = pieces[turn % len(pieces)]
            chunk = wire[pos : pos + step]
            got = decoder.feed(chunk)
            out.extend(got)
            decoded += sum(len(f.data) + codec.HEADER_SIZE for f in got)
            pos += len(chunk)
            turn += 1
            self.assertLessEqual(decoder.pending, codec.HEADER_SIZE + codec.MAX_DATA)
            self.assertEqual(decoded + decoder.pending, pos)
        self.assertEqual(out, frames)
        self.assertTrue(all(type(f.data) is bytes for f in out))
        self.assertEqual(decoder.pending, 0)


class DataFrameTests(SynchronousTestCase):
    def test_split_at_65535(self):
        """Data is cut into PSH frames of at most 65535 bytes that reassemble exactly."""
        data = bytes(range(256)) * 600  # 153600 bytes
        frames = FrameDecoder().feed(b"".join(codec.data_frames(9, data)))
        self.assertEqual([len(f.data) for f in frames], [65535, 65535, 22530])
        self.assertTrue(all(f.cmd == Command.PSH and f.sid == 9 for f in frames))
        self.assertEqual(b"".join(f.data for f in frames), data)

    def test_no_data_no_frame(self):
        """Nothing to send is no frame at all (an empty PSH is not sent)."""
        self.assertEqual(codec.data_frames(1, b""), [])

    def test_65536_byte_read(self):
        """A full 65536-byte reactor read becomes two frames, never a wrapped length."""
        frames = FrameDecoder().feed(b"".join(codec.data_frames(1, b"a" * 65536)))
        self.assertEqual([len(f.data) for f in frames], [65535, 1])

    def test_encode_refuses_oversize(self):
        self.assertRaises(ValueError, codec.encode_frame, Command.PSH, 1, b"a" * 65536)


class SettingsTests(SynchronousTestCase):
    def test_any_key_order(self):
        """Keys parse in any order; lines without '=' are skipped; the first '=' splits."""
        parsed = codec.parse_settings(b"padding-md5=x\nnoise\nv=2\nclient=a=b")
        self.assertEqual(parsed, {"padding-md5": "x", "v": "2", "client": "a=b"})

    def test_repeated_key_last_wins(self):
        self.assertEqual(codec.parse_settings(b"v=1\nv=2"), {"v": "2"})

    def test_format(self):
        self.assertEqual(codec.format_settings({"v": 2}), b"v=2")
