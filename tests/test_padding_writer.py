"""The client's padding writer (anytls-protocol.md section 6.4) against vector V14 and a model."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anytls_twisted.protocol.codec import HEADER_SIZE, Command, Frame, FrameDecoder, encode_frame
from anytls_twisted.protocol.padding import (
    CHECK_MARK,
    DEFAULT_SCHEME,
    PaddingScheme,
    PaddingWriter,
)

from .helpers import unhex
from .test_codec import V4, V6

# V14: Settings (V4) + SYN(1) (V6) + PSH(1, example.com:443), 110 bytes.
V14_PSH = unhex("02 00 00 00 01 00 0f 03 0b 65 78 61 6d 70 6c 65 2e 63 6f 6d 01 bb")
V14_PAYLOAD = unhex(
    """04 00 00 00 00 00 4a 76 3d 32 0a 63 6c 69 65 6e 74 3d 73 69 6e 67 2d 61 6e 79 74 6c 73 2f
    30 2e 30 2e 31 31 0a 70 61 64 64 69 6e 67 2d 6d 64 35 3d 37 35 63 66 66 32 61 64 38 39 61
    61 64 66 35 65 32 35 37 30 35 39 65 65 35 37 31 65 62 65 31 31 01 00 00 00 01 00 00 02 00
    00 00 01 00 0f 03 0b 65 78 61 6d 70 6c 65 2e 63 6f 6d 01 bb"""
)
HEART = encode_frame(Command.HEART_REQUEST, 0)


def waste(data_length):
    return encode_frame(Command.WASTE, 0, bytes(data_length))


class Picks:
    """A ``randrange`` that hands out queued sizes, checking each range it is asked for."""

    def __init__(self, *picks):
        self.picks = list(picks)  # (low, high, value)

    def __call__(self, low, high):
        expected_low, expected_high, value = self.picks.pop(0)
        assert (low, high) == (expected_low, expected_high), (low, high)
        return value


def opened(scheme=DEFAULT_SCHEME, *picks):
    """A writer past packet 1 (Settings + SYN + PSH, cut at 100 bytes and not padded)."""
    writer = PaddingWriter(scheme, Picks((100, 400, 100), *picks))
    writer.write(V4)
    writer.write(V6)
    writer.write(V14_PSH)
    return writer


class VectorTests(SynchronousTestCase):
    def test_v14_padded_to_200(self):
        """If packet 1's size is 200, then the 110 bytes go out with 83 bytes of Waste, at once."""
        writer = PaddingWriter(DEFAULT_SCHEME, Picks((100, 400, 200)))
        self.assertEqual(writer.write(V4), [])
        self.assertEqual(writer.write(V6), [])
        [write] = writer.write(V14_PSH)
        self.assertEqual(V4 + V6 + V14_PSH, V14_PAYLOAD)
        self.assertEqual(write, V14_PAYLOAD + unhex("00 00 00 00 00 00 53") + bytes(83))
        self.assertEqual(len(write), 200)
        self.assertEqual(writer.packets, 1)

    def test_v14_split_at_105(self):
        """If packet 1's size is 105, then the PSH is cut inside the domain name, unpadded."""
        writer = PaddingWriter(DEFAULT_SCHEME, Picks((100, 400, 105)))
        writer.write(V4)
        writer.write(V6)
        first, second = writer.write(V14_PSH)
        self.assertEqual(first, V14_PAYLOAD[:105])
        self.assertEqual(first[-5:], unhex("6d 70 6c 65 2e"))
        self.assertEqual(second, unhex("63 6f 6d 01 bb"))

    def test_packet_0_is_not_the_writers(self):
        """The plan for packet 0 (the auth preamble) is never used by the writer."""
        scheme = PaddingScheme.parse(b"stop=3\n0=30-30\n1=50-50")
        self.assertEqual(
            [len(w) for w in PaddingWriter(scheme, buffering=False).write(HEART)], [50]
        )


class PlanTests(SynchronousTestCase):
    def test_pad_too_small_for_waste(self):
        """If the size leaves 7 bytes or fewer, then the payload goes out alone, unpadded."""
        scheme = PaddingScheme.parse(b"stop=5\n1=20-20\n2=21-21\n3=22-22")
        writer = PaddingWriter(scheme, buffering=False)
        frame = encode_frame(Command.PSH, 1, bytes(7))  # 14 bytes
        self.assertEqual(writer.write(frame), [frame])  # pad = 20 - 14 - 7 < 0
        self.assertEqual(writer.write(frame), [frame])  # pad = 0
        self.assertEqual(writer.write(frame), [frame + waste(1)])  # pad = 1

    def test_standalone_waste(self):
        """If the payload is used up before a size, then that size is all Waste: L + 7 bytes.

        Packet 3 of the default scheme, ``9-9,500-1000``, with a 7-byte heartbeat: the frame
        goes out alone (9 leaves no room for Waste), then a Waste frame with 600 data bytes.
        """
        writer = opened(DEFAULT_SCHEME, (400, 500, 450), (500, 1000, 600))
        writer.write(encode_frame(Command.PSH, 1, bytes(100)))  # packet 2
        self.assertEqual(writer.write(HEART), [HEART, waste(600)])
        self.assertEqual(writer.packets, 3)

    def test_check_mark_stops_when_payload_is_used_up(self):
        """If the payload fits the first slot, then the check mark ends packet 2's plan."""
        writer = opened(DEFAULT_SCHEME, (400, 500, 450))
        writes = writer.write(encode_frame(Command.PSH, 1, bytes(50)))
        self.assertEqual(writes, [encode_frame(Command.PSH, 1, bytes(50)) + waste(450 - 57 - 7)])

    def test_check_mark_continues_while_payload_is_left(self):
        """If payload is left at a check mark, then the next slot is used, and so on."""
        picks = [(400, 500, 450), (500, 1000, 600), (500, 1000, 700)]
        writer = opened(DEFAULT_SCHEME, *picks)
        frame = encode_frame(Command.PSH, 1, bytes(1200 - HEADER_SIZE))
        writes = writer.write(frame)
        self.assertEqual([len(w) for w in writes], [450, 600, 700])
        self.assertEqual(b"".join(writes)[:1200], frame)
        self.assertEqual(writes[2][150:], waste(700 - 150 - 7))

    def test_beyond_the_plan_unpadded(self):
        """If the payload outlasts every slot, then the rest goes out as one unpadded write."""
        picks = [(400, 500, 400)] + [(500, 1000, 500)] * 4
        writer = opened(DEFAULT_SCHEME, *picks)
        frame = encode_frame(Command.PSH, 1, bytes(5000 - HEADER_SIZE))
        writes = writer.write(frame)
        self.assertEqual([len(w) for w in writes], [400, 500, 500, 500, 500, 2600])
        self.assertEqual(b"".join(writes), frame)

    def test_packet_without_plan(self):
        """If a packet below ``stop`` has no entry, then it is written unchanged."""
        scheme = PaddingScheme.parse(b"stop=4\n2=50-50")
        writer = PaddingWriter(scheme, buffering=False)
        self.assertEqual(writer.write(HEART), [HEART])
        self.assertEqual(writer.write(HEART), [HEART + waste(50 - 14)])
        self.assertEqual(writer.write(HEART), [HEART])
        self.assertEqual(writer.packets, 3)

    def test_range_is_half_open(self):
        """Sizes are drawn from [low, high): ``randrange(low, high)``, never ``high``."""
        asked = []

        def randrange(low, high):
            asked.append((low, high))
            return high - 1

        writer = PaddingWriter(DEFAULT_SCHEME, randrange)
        writer.write(V4)
        writer.write(V6)
        [write] = writer.write(V14_PSH)
        self.assertEqual(asked, [(100, 400)])
        self.assertEqual(len(write), 399)

    def test_default_randomness(self):
        """Without a ``randrange``, packet 1 of the default scheme still lands in [100, 400)."""
        writer = PaddingWriter(DEFAULT_SCHEME)
        writer.write(V4 + V6)
        writes = writer.write(V14_PSH)
        self.assertEqual(b"".join(writes)[:110], V14_PAYLOAD)
        self.assertTrue(100 <= len(writes[0]) < 400, len(writes[0]))

    def test_huge_waste_is_split_into_frames(self):
        """A size past 64 KiB still gives exactly that many bytes, as several Waste frames."""
        for size in [65542, 65543, 65548, 65549, 200000]:
            scheme = PaddingScheme.parse(b"stop=2\n1=%d-%d" % (size, size))
            [write] = PaddingWriter(scheme, buffering=False).write(HEART)
            self.assertEqual(len(write), size)
            frames = FrameDecoder().feed(write)
            self.assertEqual(frames[0], Frame(Command.HEART_REQUEST, 0))
            self.assertEqual({f.cmd for f in frames[1:]}, {Command.WASTE})
            self.assertEqual(set(b"".join(f.data for f in frames[1:])), {0})


class StopTests(SynchronousTestCase):
    def test_nothing_padded_from_stop_on(self):
        """Packets 1..7 of the default scheme are padded; packet 8 and later pass through."""
        writer = PaddingWriter(DEFAULT_SCHEME, random.Random(1).randrange, buffering=False)
        for packet in range(1, 8):
            writes = writer.write(HEART)
            self.assertNotEqual(writes, [HEART])
            self.assertEqual(writer.packets, packet)
        self.assertTrue(writer.padding)
        for _ in range(3):
            self.assertEqual(writer.write(HEART), [HEART])
        self.assertFalse(writer.padding)
        self.assertEqual(writer.packets, 8)

    def test_stop_zero(self):
        """``stop=0``: nothing is padded, not even packet 1."""
        writer = PaddingWriter(PaddingScheme.parse(b"stop=0\n1=500-500"))
        writer.write(V4 + V6)
        self.assertEqual(writer.write(V14_PSH), [V14_PAYLOAD])
        self.assertFalse(writer.padding)


class BufferingTests(SynchronousTestCase):
    def test_held_until_the_write_after_the_first_syn(self):
        """Settings and the SYN are held; the next write flushes them with it as packet 1."""
        writer = PaddingWriter(DEFAULT_SCHEME, Picks((100, 400, 105)))
        self.assertEqual(writer.write(V4), [])
        self.assertTrue(writer.buffering)
        self.assertEqual(writer.write(HEART), [])  # anything before the SYN is held too
        self.assertEqual(writer.write(V6), [])
        self.assertFalse(writer.buffering)
        self.assertEqual(writer.packets, 0)
        writes = writer.write(V14_PSH)
        self.assertEqual(b"".join(writes), V4 + HEART + V6 + V14_PSH)
        self.assertEqual(writer.packets, 1)

    def test_syn_and_psh_in_one_write(self):
        """If the SYN and the PSH come together, then they flush at once, with what was held."""
        writer = PaddingWriter(DEFAULT_SCHEME, Picks((100, 400, 200)))
        writer.write(V4)
        [write] = writer.write(V6 + V14_PSH)
        self.assertEqual(write[:110], V14_PAYLOAD)

    def test_one_write_with_everything(self):
        writer = PaddingWriter(DEFAULT_SCHEME, Picks((100, 400, 105)))
        self.assertEqual(writer.write(V14_PAYLOAD), [V14_PAYLOAD[:105], V14_PAYLOAD[105:]])

    def test_only_the_first_syn_counts(self):
        """After packet 1, a SYN (stream 2) is written like any frame: no buffering."""
        writer = opened(DEFAULT_SCHEME, (400, 500, 400))
        syn2 = encode_frame(Command.SYN, 2)
        self.assertEqual(writer.write(syn2), [syn2 + waste(400 - 7 - 7)])

    def test_syn_data_is_skipped(self):
        """A SYN is found by walking headers, so bytes inside data never look like one."""
        writer = PaddingWriter(DEFAULT_SCHEME, Picks((100, 400, 300)))
        decoy = encode_frame(Command.SETTINGS, 0, V6)  # a SYN inside Settings data
        self.assertEqual(writer.write(decoy), [])
        self.assertTrue(writer.buffering)

    def test_flush(self):
        """``flush`` ends buffering: what is held becomes packet 1; with nothing held, no write."""
        writer = PaddingWriter(DEFAULT_SCHEME, Picks((100, 400, 150)))
        writer.write(V4)
        [write] = writer.flush()
        self.assertEqual(write, V4 + waste(150 - 81 - 7))
        self.assertEqual(writer.flush(), [])
        self.assertEqual(writer.packets, 1)

    def test_not_buffering(self):
        writer = PaddingWriter(DEFAULT_SCHEME, Picks((100, 400, 150)), buffering=False)
        self.assertEqual(writer.write(V4), [V4 + waste(150 - 81 - 7)])


class SchemeUpdateTests(SynchronousTestCase):
    def test_counter_carries_on_into_the_new_plan(self):
        """A new scheme applies from the next packet, whose number follows on."""
        writer = PaddingWriter(DEFAULT_SCHEME, buffering=False, randrange=Picks((100, 400, 100)))
        writer.write(HEART)
        writer.update_scheme(PaddingScheme.parse(b"stop=4\n1=999-999\n2=60-60\n3=70-70"))
        self.assertEqual(writer.write(HEART), [HEART + waste(60 - 14)])
        self.assertEqual(writer.write(HEART), [HEART + waste(70 - 14)])
        self.assertEqual(writer.write(HEART), [HEART])
        self.assertFalse(writer.padding)

    def test_lower_stop_ends_padding(self):
        """If the counter has reached the new ``stop``, then the next packet ends padding."""
        writer = PaddingWriter(DEFAULT_SCHEME, random.Random(2).randrange, buffering=False)
        for _ in range(3):
            writer.write(HEART)
        writer.update_scheme(PaddingScheme.parse(b"stop=2\n4=60-60"))
        self.assertEqual(writer.write(HEART), [HEART])
        self.assertFalse(writer.padding)

    def test_padding_off_stays_off(self):
        """A larger ``stop`` does not turn padding back on once it is off."""
        writer = PaddingWriter(PaddingScheme.parse(b"stop=1"), buffering=False)
        writer.write(HEART)
        writer.update_scheme(PaddingScheme.parse(b"stop=9\n2=60-60"))
        self.assertEqual(writer.write(HEART), [HEART])
        self.assertEqual(writer.packets, 1)


# The property: an independent model of the sizes a plan gives a payload of ``length`` bytes.
def planned_sizes(plan, sizes, length):
    """The write sizes for one packet; ``sizes`` are the plan's non-check sizes, in order."""
    out = []
    sizes = iter(sizes)
    for low, _high in plan:
        if low == CHECK_MARK:
            if length == 0:
                return out
            continue
        size = next(sizes)
        if length == 0:
            out.append(size + HEADER_SIZE)
        elif length <= size:
            out.append(size if size - length > HEADER_SIZE else length)
            length = 0
        else:
            out.append(size)
            length -= size
    return out + [length] if length else out


class Recorder:
    """``randrange`` from a seeded Random; the test reads every size the writer drew."""

    def __init__(self, seed):
        self.random = random.Random(seed)
        self.drawn = []

    def __call__(self, low, high):
        assert low < high
        value = self.random.randrange(low, high)
        self.drawn.append(value)
        return value


size_item = st.one_of(
    st.just("c"),
    st.integers(1, 300).map(lambda a: f"{a}-{a}"),
    st.tuples(st.integers(1, 300), st.integers(1, 300))
    .filter(lambda t: t[0] != t[1])
    .map(lambda t: f"{t[0]}-{t[1]}"),
)
schemes = st.builds(
    lambda stop, plans: PaddingScheme.parse(
        "\n".join([f"stop={stop}"] + [f"{k}={','.join(v)}" for k, v in plans.items()]).encode()
    ),
    st.integers(0, 8),
    st.dictionaries(st.integers(0, 9), st.lists(size_item, min_size=1, max_size=6)),
)
frames = st.builds(
    encode_frame,
    st.sampled_from([c for c in Command if c != Command.WASTE]),
    st.integers(0, 3),
    st.binary(max_size=200),
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(schemes, st.lists(st.lists(frames, min_size=1, max_size=4), max_size=14), st.integers())
    def test_frames_survive_and_sizes_follow_the_plan(self, scheme, writes, seed):
        """Decoding every write gives the input frames back, plus only Waste; while padding is
        on each packet's writes have the model's sizes; after ``stop`` a write is passed on as
        it is."""
        rand = Recorder(seed)
        writer = PaddingWriter(scheme, rand)
        out = []
        pending = 0  # bytes held for the next packet
        packet = 0  # the model's packet counter
        padding = True
        syn_seen = False
        for group in writes:
            data = b"".join(group)
            pending += len(data)
            rand.drawn = []
            result = writer.write(data)
            out += result
            if not syn_seen:
                cmds = [f[0] for f in group]
                syn_seen = Command.SYN in cmds
                if not syn_seen or cmds.index(Command.SYN) == len(cmds) - 1:
                    self.assertEqual(result, [])  # held for packet 1
                    continue
            if not padding:  # off for good: passed on as it is
                self.assertEqual(result, [data])
                continue
            packet += 1
            if packet >= scheme.stop:  # the packet that reaches ``stop``, unpadded
                self.assertEqual([len(w) for w in result], [pending])
                padding = False
            else:
                plan = scheme.plans.get(packet, ())
                drawn = iter(rand.drawn)
                sizes = (low if low == high else next(drawn) for low, high in plan if low > 0)
                self.assertEqual([len(w) for w in result], planned_sizes(plan, sizes, pending))
                self.assertEqual(list(drawn), [])
            self.assertEqual(writer.packets, packet)
            pending = 0
        out += writer.flush()
        decoded = FrameDecoder().feed(b"".join(out))
        inputs = [f for group in writes for f in group]
        self.assertEqual([encode_frame(*f) for f in decoded if f.cmd != Command.WASTE], inputs)
        self.assertTrue(all(set(f.data) <= {0} for f in decoded if f.cmd == Command.WASTE))
