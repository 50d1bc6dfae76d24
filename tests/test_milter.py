"""The sans-IO milter codec (mailguard.milter): packets, negotiation, steps, answers, modifications."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailguard import filters, milter
from mailguard.milter import (
    MilterProtocolError,
    MilterReply,
    MilterSession,
    Modifications,
    Negotiated,
    PacketReader,
    Progress,
    encode,
)


def optneg(version=6, actions=milter.ACTIONS, protocol=0, lists=b""):
    """The milter's negotiation packet."""
    return encode(b"O", struct.pack("!III", version, actions, protocol) + lists)


def ready(protocol=0, actions=milter.ACTIONS):
    """A session that has negotiated ``protocol`` and ``actions``."""
    session = MilterSession()
    session.negotiate()
    session.receive(optneg(actions=actions, protocol=protocol))
    return session


def feed(session, data, bytewise):
    """Feed ``data`` whole or one byte at a time; return everything that came out."""
    if not bytewise:
        return session.receive(data)
    out = []
    for i in range(len(data)):
        out.extend(session.receive(data[i:i + 1]))
    return out


class PacketTests(SynchronousTestCase):
    """Packets are framed by a 32-bit length counting the command byte."""

    def test_encode(self):
        """encode() writes the length, the command and the data."""
        self.assertEqual(encode(b"H", b"x\0"), b"\0\0\0\x03Hx\0")

    def test_readerWholeAndBytewise(self):
        """The reader gives the same packets whole and byte by byte."""
        data = encode(b"c") + encode(b"h", b"X\0v\0") + encode(b"p")
        whole = PacketReader().feed(data)
        reader = PacketReader()
        pieces = [p for i in range(len(data)) for p in reader.feed(data[i:i + 1])]
        self.assertEqual(whole, [(b"c", b""), (b"h", b"X\0v\0"), (b"p", b"")])
        self.assertEqual(pieces, whole)
        self.assertEqual(reader.pending, 0)

    def test_lengthZero(self):
        """A packet of length 0 (no command byte) is a protocol error."""
        self.assertRaises(MilterProtocolError, PacketReader().feed, b"\0\0\0\0")

    def test_tooLong(self):
        """A packet longer than the limit is refused before it is buffered."""
        reader = PacketReader(limit=100)
        self.assertRaises(MilterProtocolError, reader.feed, struct.pack("!I", 101) + b"b")

    @given(st.lists(st.tuples(st.sampled_from(b"abcdhmpqrsty+-2"), st.binary(max_size=300)), max_size=8),
           st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20))
    @settings(max_examples=200, deadline=None)
    def test_anySegmentation(self, packets, cuts):
        """Any split of a stream of packets gives back the same packets."""
        data = b"".join(encode(bytes([c]), d) for c, d in packets)
        reader = PacketReader()
        out, i, k = [], 0, 0
        while i < len(data):
            n = cuts[k % len(cuts)]
            out.extend(reader.feed(data[i:i + n]))
            i, k = i + n, k + 1
        self.assertEqual(out, [(bytes([c]), d) for c, d in packets])


class MTAPacketTests(SynchronousTestCase):
    """The MTA's packets are exactly those of libmilter's mfdef.h."""

    def test_optneg(self):
        """Option negotiation: version 6, actions, protocol flags."""
        self.assertEqual(milter.optneg_packet(6, 0x1FF, 0x1FFFFF),
                         b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\x1f\xff\xff")

    def test_offered(self):
        """The gateway offers everything but change-sender, and every step flag but RCPT_REJ and MDS."""
        self.assertEqual(milter.ACTIONS, 0x1BF)
        self.assertEqual(milter.PROTOCOL, 0x1FF7FF)

    def test_connect(self):
        """Connect: host name, family, port (16-bit), address."""
        self.assertEqual(milter.connect_packet("[192.0.2.1]", "4", 2525, "192.0.2.1"),
                         encode(b"C", b"[192.0.2.1]\x004\x09\xdd192.0.2.1\0"))
        self.assertEqual(milter.connect_packet("localhost"), encode(b"C", b"localhost\0U"))

    def test_envelope(self):
        """MAIL and RCPT: the address then each ESMTP parameter, NUL-terminated."""
        self.assertEqual(milter.envelope_packet(b"M", b"<a@b>", [b"SIZE=10", b"BODY=8BITMIME"]),
                         encode(b"M", b"<a@b>\0SIZE=10\0BODY=8BITMIME\0"))

    def test_macros(self):
        """Macros: the step's command letter, then name/value pairs."""
        self.assertEqual(milter.macro_packet(b"C", {"j": "gw", "{client_addr}": "192.0.2.1"}),
                         encode(b"D", b"Cj\0gw\0{client_addr}\x00192.0.2.1\0"))
        self.assertEqual(milter.macro_packet(b"C", {}), b"")

    def test_nul(self):
        """A NUL inside a string would cut it short: refused."""
        self.assertRaises(ValueError, milter.header_packet, b"X", b"a\0b")

    def test_bodyPackets(self):
        """A body larger than 65,535 octets goes in pieces of at most 65,535."""
        data = milter.body_packets(b"x" * 70000)
        packets = PacketReader(limit=1 << 20).feed(data)
        self.assertEqual([len(d) for c, d in packets], [65535, 4465])
        self.assertEqual({c for c, d in packets}, {b"B"})


class NegotiationTests(SynchronousTestCase):
    """The milter's negotiation decides which steps are sent and which are answered."""

    def test_negotiated(self):
        """The reply's version, actions, protocol and macro lists are taken."""
        session = MilterSession()
        self.assertEqual(session.negotiate()[4:5], b"O")
        lists = struct.pack("!I", milter.SMFIM_CONNECT) + b"{client_addr} j\0" \
            + struct.pack("!I", milter.SMFIM_EOM) + b"{rcpt_addr},i\0"
        (value,) = feed(session, optneg(protocol=milter.SMFIP_HDR_LEADSPC, lists=lists), True)
        self.assertIsInstance(value, Negotiated)
        self.assertEqual(value.macros, {b"C": ("{client_addr}", "j"), b"E": ("{rcpt_addr}", "i")})
        self.assertEqual(session.protocol, milter.SMFIP_HDR_LEADSPC)
        step = session.connect("h", "4", 1, "192.0.2.1", {"j": "gw", "{client_addr}": "192.0.2.1", "_": "x"})
        self.assertEqual(step.data[:step.data.index(b"C", 5) + 1][5:], b"C")
        self.assertIn(b"{client_addr}\x00192.0.2.1\0", step.data)
        self.assertNotIn(b"_\0", step.data)

    def test_versions(self):
        """Versions 2 to 6 are spoken; others are refused."""
        for version in (1, 7):
            session = MilterSession()
            session.negotiate()
            self.assertRaises(MilterProtocolError, session.receive, optneg(version=version))
        session = MilterSession()
        session.negotiate()
        session.receive(optneg(version=2))
        self.assertEqual(session.version, 2)

    def test_unofferedProtocol(self):
        """A milter asking for a protocol flag the gateway did not offer is refused."""
        session = MilterSession()
        session.negotiate()
        with self.assertRaises(MilterProtocolError) as caught:
            session.receive(optneg(protocol=milter.SMFIP_RCPT_REJ))
        self.assertIn("0x800", str(caught.exception))

    def test_unofferedActionMasked(self):
        """An action the gateway did not offer is masked off, and using it is an error."""
        session = ready(actions=milter.ACTIONS | milter.SMFIF_CHGFROM)
        self.assertFalse(session.actions & milter.SMFIF_CHGFROM)
        session.end_of_message()
        self.assertRaises(MilterProtocolError, session.receive, encode(b"e", b"<x@y>\0"))

    def test_notNegotiation(self):
        """Anything but a negotiation first is an error."""
        session = MilterSession()
        session.negotiate()
        self.assertRaises(MilterProtocolError, session.receive, encode(b"c"))

    def test_short(self):
        """A negotiation shorter than three words is an error."""
        session = MilterSession()
        session.negotiate()
        self.assertRaises(MilterProtocolError, session.receive, encode(b"O", b"\0\0\0\x06"))


class StepTests(SynchronousTestCase):
    """Steps the milter skips send nothing; "no reply" steps await nothing."""

    def test_skippedSteps(self):
        """NOCONNECT, NOHELO, NOMAIL, NORCPT, NODATA, NOHDRS, NOEOH, NOBODY: nothing is sent."""
        session = ready(milter.SMFIP_NOCONNECT | milter.SMFIP_NOHELO | milter.SMFIP_NOMAIL | milter.SMFIP_NORCPT
                        | milter.SMFIP_NODATA | milter.SMFIP_NOHDRS | milter.SMFIP_NOEOH | milter.SMFIP_NOBODY)
        for step in (session.connect("h", None, 0, ""), session.helo(b"x"), session.mail(b"a@b"),
                     session.rcpt(b"c@d"), session.data(), session.header(b"S", b" x"),
                     session.end_of_headers(), session.body(b"x\r\n")):
            self.assertEqual(step, milter.Step(b"", False))
        step = session.end_of_message()
        self.assertEqual((step.data, step.awaits), (encode(b"E"), True))

    def test_noReply(self):
        """NR_* steps are sent but not answered; the next step can follow at once."""
        session = ready(milter.SMFIP_NR_CONN | milter.SMFIP_NR_HELO | milter.SMFIP_NR_MAIL | milter.SMFIP_NR_RCPT
                        | milter.SMFIP_NR_DATA | milter.SMFIP_NR_HDR | milter.SMFIP_NR_EOH | milter.SMFIP_NR_BODY)
        steps = [session.connect("h", None, 0, ""), session.helo(b"x"), session.mail(b"a@b"),
                 session.rcpt(b"c@d"), session.data(), session.header(b"S", b" x"),
                 session.end_of_headers(), session.body(b"x\r\n")]
        self.assertEqual([s.awaits for s in steps], [False] * 8)
        self.assertEqual([PacketReader().feed(s.data)[-1][0] for s in steps], [bytes([c]) for c in b"CHMRTLNB"])
        self.assertRaises(MilterProtocolError, session.receive, encode(b"c"))

    def test_awaits(self):
        """A step awaiting an answer must be answered before the next."""
        session = ready()
        self.assertTrue(session.mail(b"a@b").awaits)
        self.assertRaises(RuntimeError, session.rcpt, b"c@d")
        self.assertEqual(session.receive(encode(b"c")), [MilterReply(b"c")])
        self.assertTrue(session.rcpt(b"c@d").awaits)

    def test_leadingSpace(self):
        """Without HDR_LEADSPC the value loses its leading space; with it the value is sent as it stands."""
        plain = ready().header(b"Subject", b" hi")
        self.assertEqual(PacketReader().feed(plain.data), [(b"L", b"Subject\0hi\0")])
        kept = ready(milter.SMFIP_HDR_LEADSPC).header(b"Subject", b" hi\r\n\tthere")
        self.assertEqual(PacketReader().feed(kept.data), [(b"L", b"Subject\0 hi\r\n\tthere\0")])

    def test_headerNul(self):
        """A NUL in a header value (BDAT allows it) reaches the milter as a space, not as a cut string."""
        step = ready(milter.SMFIP_HDR_LEADSPC).header(b"Subject", b" a\0b")
        self.assertEqual(PacketReader().feed(step.data), [(b"L", b"Subject\0 a b\0")])

    def test_skip(self):
        """After SKIP (answer to a body piece) no more body is sent; SKIP elsewhere is an error."""
        session = ready()
        session.body(b"a\r\n")
        self.assertEqual(session.receive(encode(b"s")), [MilterReply(b"s")])
        self.assertEqual(session.body(b"b\r\n"), milter.Step(b"", False))
        self.assertTrue(session.end_of_message().awaits)
        session = ready()
        session.mail(b"a@b")
        self.assertRaises(MilterProtocolError, session.receive, encode(b"s"))

    def test_bodyTooLarge(self):
        """body() takes at most 65,535 octets at a time."""
        self.assertRaises(ValueError, ready().body, b"x" * 65536)

    def test_abortQuit(self):
        """Abort and quit are single packets that await nothing."""
        session = ready()
        self.assertEqual(session.abort(), encode(b"A"))
        self.assertEqual(session.quit(), encode(b"Q"))


STEP_CALLS = {
    b"C": lambda s: s.connect("h", "4", 25, "192.0.2.1", {"j": "gw"}),
    b"H": lambda s: s.helo(b"client.example"),
    b"M": lambda s: s.mail(b"a@example.org", [b"SIZE=1"], {"i": "Q1", "{mail_addr}": "a@example.org"}),
    b"R": lambda s: s.rcpt(b"b@example.org", [], {"{rcpt_addr}": "b@example.org"}),
    b"T": lambda s: s.data(),
    b"L": lambda s: s.header(b"Subject", b" hi"),
    b"N": lambda s: s.end_of_headers(),
    b"B": lambda s: s.body(b"line\r\n"),
    b"E": lambda s: s.end_of_message({"i": "Q1"}),
}


class StepPropertyTests(SynchronousTestCase):
    """Whatever the milter negotiates, each step sends exactly what the flags say, and waits only when it must."""

    @given(st.integers(min_value=0, max_value=milter.PROTOCOL).map(lambda bits: bits & milter.PROTOCOL),
           st.lists(st.sampled_from(sorted(STEP_CALLS)), min_size=1, max_size=12), st.booleans())
    @settings(max_examples=300, deadline=None)
    def test_steps(self, protocol, commands, bytewise):
        """Skipped steps send nothing, no-reply steps await nothing, the others send their packet and wait."""
        session = ready(protocol)
        skipping = False  # after SKIP, body pieces are not sent until the next message
        for command in commands:
            skip, silent = milter.STEPS[command]
            step = STEP_CALLS[command](session)
            if command in (b"M", b"E"):
                skipping = False
            if (command != b"E" and protocol & skip) or (command == b"B" and skipping):
                self.assertEqual(step, milter.Step(b"", False))
                continue
            packets = PacketReader().feed(step.data)
            self.assertEqual(packets[-1][0], command)
            self.assertTrue(all(c == b"D" and d[:1] == command for c, d in packets[:-1]))
            self.assertEqual(step.awaits, command == b"E" or not protocol & silent)
            if step.awaits:
                answer = encode(b"s") if command == b"B" and protocol & milter.SMFIP_SKIP else encode(b"c")
                self.assertEqual(feed(session, answer, bytewise)[-1].command, answer[4:5])
                skipping = skipping or answer == encode(b"s")
            self.assertEqual(session.state, milter.READY)


class AnswerTests(SynchronousTestCase):
    """Every answer a milter can give, whole and byte by byte."""

    def answer(self, data, step="mail", bytewise=False):
        """What ``data`` means as an answer to ``step``."""
        session = ready()
        getattr(session, step)(*((b"a@b",) if step in ("mail", "rcpt") else ()))
        return feed(session, data, bytewise)

    def test_finalAnswers(self):
        """continue, accept, reject, tempfail, discard, shutdown map to verdicts; continue is None."""
        cases = {
            b"c": None,
            b"a": filters.ACCEPT,
            b"r": filters.REJECT,
            b"t": filters.TEMPFAIL,
            b"d": filters.DISCARD,
            b"4": filters.DROP,
        }
        for bytewise in (False, True):
            for command, action in cases.items():
                (reply,) = self.answer(encode(command), bytewise=bytewise)
                verdict = milter.to_verdict(reply)
                self.assertEqual(None if verdict is None else verdict.action, action)
        self.assertEqual(milter.to_verdict(MilterReply(b"r")).client_reply(), b"550 5.7.1 Command rejected\r\n")
        self.assertEqual(milter.to_verdict(MilterReply(b"t")).client_reply()[:3], b"451")

    def test_replyCode(self):
        """A reply code carries the milter's own text; 5xx rejects, 4xx tempfails; multi-line kept."""
        (reply,) = self.answer(encode(b"y", b"554 5.7.1 Gtube pattern\0"), bytewise=True)
        verdict = milter.to_verdict(reply)
        self.assertEqual((verdict.action, verdict.reply), (filters.REJECT, b"554 5.7.1 Gtube pattern\r\n"))
        (reply,) = self.answer(encode(b"y", b"451-4.7.1 one\r\n451 4.7.1 two\0"))
        self.assertEqual(milter.to_verdict(reply).action, filters.TEMPFAIL)
        self.assertEqual(reply.reply, b"451-4.7.1 one\r\n451 4.7.1 two\r\n")

    def test_badReplyCodes(self):
        """A reply code that is not 4xx/5xx, mixes codes, or is not NUL-terminated is a protocol error."""
        for data in (b"250 ok\0", b"55 x\0", b"554 x", b"554-a\r\n550 b\0", b"554 a\r\n554 b\0", b"5x4 a\0"):
            self.assertRaises(MilterProtocolError, self.answer, encode(b"y", data))

    def test_progress(self):
        """Progress is not an answer: the real answer still comes."""
        out = self.answer(encode(b"p") + encode(b"p") + encode(b"c"))
        self.assertEqual(out, [Progress(), Progress(), MilterReply(b"c")])

    def test_unknown(self):
        """An unknown reply letter is a protocol error."""
        self.assertRaises(MilterProtocolError, self.answer, encode(b"Z"))

    def test_unexpected(self):
        """An answer when none is awaited is a protocol error."""
        session = ready()
        self.assertRaises(MilterProtocolError, session.receive, encode(b"c"))
        session.mail(b"a@b")
        self.assertRaises(MilterProtocolError, session.receive, encode(b"c") + encode(b"c"))

    def test_modificationBeforeEnd(self):
        """Modifications are only allowed at the end of the message."""
        self.assertRaises(MilterProtocolError, self.answer, encode(b"h", b"X\0v\0"))

    def test_modificationNotNegotiated(self):
        """A modification whose action was not negotiated is a protocol error."""
        session = ready(actions=milter.SMFIF_ADDHDRS)
        session.end_of_message()
        self.assertRaises(MilterProtocolError, session.receive, encode(b"b", b"new body"))


class ModificationTests(SynchronousTestCase):
    """End-of-message modifications become mailguard modifications on an accept verdict."""

    def end(self, data, protocol=0, bytewise=False):
        """Feed ``data`` as the answer to the end of the message; return the verdict."""
        session = ready(protocol)
        session.end_of_message()
        out = feed(session, data, bytewise)
        collected = Modifications(bool(session.protocol & milter.SMFIP_HDR_LEADSPC))
        for value in out[:-1]:
            collected.add(value)
        return collected.verdict(out[-1])

    def test_all(self):
        """Every modification, in the order sent, whole and byte by byte."""
        data = (encode(b"h", b"X-Spam\0yes\0") + encode(b"i", b"\0\0\0\0DKIM-Signature\0v=1;\n\tb=x\0")
                + encode(b"m", b"\0\0\0\x02Subject\0new\0") + encode(b"m", b"\0\0\0\x01X-Old\0\0")
                + encode(b"+", b"<add@example.org>\0") + encode(b"2", b"par@example.org\0NOTIFY=NEVER\0")
                + encode(b"-", b"<Del@example.org>\0") + encode(b"b", b"new\n") + encode(b"b", b"body\r\n")
                + encode(b"c"))
        for bytewise in (False, True):
            verdict = self.end(data, bytewise=bytewise)
            self.assertEqual(verdict.action, filters.ACCEPT)
            self.assertEqual(verdict.modifications, (
                filters.AddHeader(b"X-Spam", b" yes"),
                filters.InsertHeader(0, b"DKIM-Signature", b" v=1;\r\n\tb=x"),
                filters.ChangeHeader(b"Subject", 2, b" new"),
                filters.ChangeHeader(b"X-Old", 1, None),
                filters.AddRecipient(b"add@example.org"),
                filters.AddRecipient(b"par@example.org", b"NOTIFY=NEVER"),
                filters.DeleteRecipient(b"Del@example.org"),
                filters.ReplaceBody(b"new\r\nbody\r\n"),
            ))

    def test_leadingSpaceNegotiated(self):
        """With HDR_LEADSPC the milter's value is taken as it stands."""
        verdict = self.end(encode(b"h", b"X-A\0 spaced\0") + encode(b"a"), protocol=milter.SMFIP_HDR_LEADSPC)
        self.assertEqual(verdict.modifications, (filters.AddHeader(b"X-A", b" spaced"),))

    def test_quarantine(self):
        """Quarantine then continue: the message is quarantined, with the milter's reason."""
        verdict = self.end(encode(b"q", b"suspicious\0") + encode(b"c"))
        self.assertEqual(verdict.action, filters.QUARANTINE)
        self.assertIn("suspicious", verdict.reason)

    def test_quarantineThenReject(self):
        """A reject after a quarantine request rejects."""
        self.assertEqual(self.end(encode(b"q", b"x\0") + encode(b"r")).action, filters.REJECT)

    def test_rejectDropsModifications(self):
        """Modifications are dropped when the final answer refuses."""
        verdict = self.end(encode(b"h", b"X\0v\0") + encode(b"t"))
        self.assertEqual((verdict.action, verdict.modifications), (filters.TEMPFAIL, ()))

    def test_badValues(self):
        """Bad header names and recipient addresses are protocol errors."""
        for data in (encode(b"h", b"Bad Name\0v\0"), encode(b"h", b"\0v\0"), encode(b"+", b"<a b@c>\0"),
                     encode(b"h", b"X\0v"), encode(b"i", b"\0\0"), encode(b"2", b"a@b\0x\0y\0")):
            self.assertRaises(MilterProtocolError, self.end, data + encode(b"c"))

    def test_bodyLimit(self):
        """A replacement body beyond the limit is a protocol error."""
        collected = Modifications(max_body=10)
        collected.add(milter.ReplaceBodyPiece(b"x" * 10))
        self.assertRaises(MilterProtocolError, collected.add, milter.ReplaceBodyPiece(b"y"))


class FuzzTargetTests(SynchronousTestCase):
    """The atheris target runs without atheris and holds its properties."""

    def test_smoke(self):
        """fuzz/fuzz_milter.py's smoke run: random inputs give values or MilterProtocolError only."""
        import importlib.util
        import os

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz", "fuzz_milter.py")
        spec = importlib.util.spec_from_file_location("fuzz_milter", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.assertEqual(module.smoke(300, seed=1), 300)
        for seed in module.seeds():
            module.check(seed)
