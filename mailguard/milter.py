"""The MTA side of the Sendmail milter protocol, version 6, as a pure sans-IO codec.

A milter (rspamd, clamav-milter, OpenDKIM...) is a server the MTA connects
to and tells about each SMTP session: connect, HELO, MAIL, each RCPT, each
header field, the end of the headers, the body in pieces, the end of the
message.  The milter answers each step (continue, accept, reject,
tempfail, a reply code of its own, discard, skip...) and, at the end of
the message, sends modifications (header fields added, changed or
deleted, the body replaced, recipients added or removed, quarantine)
before its final answer.

Wire format (libmilter's ``mfdef.h``, Postfix's ``milter8.c``): every
packet is a 32-bit big-endian length (counting the command byte), one
command byte, then its data; strings are NUL-terminated.  This module
holds the whole protocol with no sockets and no clocks:

- `PacketReader` cuts packets out of any segmentation, with a size limit;
- `encode` and the ``*_packet`` functions build the MTA's packets;
- `MilterSession` is the MTA's state machine: each step method returns the
  bytes to send and whether an answer is awaited (a step the milter asked
  to skip sends nothing; a "no reply" step expects none), and `receive`
  turns the milter's bytes into `MilterReply` and modification values;
- `to_verdict` and `Modifications` turn them into `mailguard.filters`
  verdicts.

Anything a milter sends that the protocol does not allow raises
`MilterProtocolError`; its text says what was wrong, on one line.
"""

import struct
from dataclasses import dataclass, replace

from mailguard import filters
from mailguard.replies import reply as gateway_reply

# -- commands the MTA sends (SMFIC_*) -------------------------------------------------
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# -- what the milter sends (SMFIR_*) --------------------------------------------------
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"
SMFIR_OPTNEG = b"O"

# -- actions a milter may take at the end of a message (SMFIF_*) ------------------------
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100

# -- protocol steps and flags (SMFIP_*) ------------------------------------------------
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
SMFIP_MDS_256K = 0x10000000
SMFIP_MDS_1M = 0x20000000

# -- macro stages in a negotiation's symbol lists (SMFIM_*) -------------------------------
SMFIM_CONNECT, SMFIM_HELO, SMFIM_ENVFROM, SMFIM_ENVRCPT, SMFIM_DATA, SMFIM_EOM, SMFIM_EOH = range(7)

VERSION = 6
"""The protocol version the gateway speaks (libmilter 8.14 and later, Postfix 2.6 and later)."""

#: Actions the gateway can apply: everything mailguard's modifications express (no CHGFROM).
ACTIONS = (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS
           | SMFIF_QUARANTINE | SMFIF_ADDRCPT_PAR | SMFIF_SETSYMLIST)

#: Protocol bits the gateway offers: every step may be skipped or left unanswered, SKIP,
#: leading spaces kept.  Not RCPT_REJ (a recipient is asked about before the server sees
#: it) and not the large MDS_* sizes (body pieces are at most 65,535 octets).
PROTOCOL = (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY
            | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_NOUNKNOWN | SMFIP_NODATA
            | SMFIP_SKIP | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT
            | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH | SMFIP_NR_BODY | SMFIP_HDR_LEADSPC)

BODY_CHUNK = 65535
"""The largest body piece sent in one packet (libmilter's MILTER_CHUNK_SIZE)."""

MAX_PACKET = (1 << 20) + 1024
"""The largest packet accepted from a milter (a 1 MB replacement body piece and headroom)."""

MAX_BODY = 64 << 20
"""The largest replacement body a milter may send for one message."""

#: The steps of a transaction, with the bit that skips each and the bit that silences its reply.
STEPS = {
    SMFIC_CONNECT: (SMFIP_NOCONNECT, SMFIP_NR_CONN),
    SMFIC_HELO: (SMFIP_NOHELO, SMFIP_NR_HELO),
    SMFIC_MAIL: (SMFIP_NOMAIL, SMFIP_NR_MAIL),
    SMFIC_RCPT: (SMFIP_NORCPT, SMFIP_NR_RCPT),
    SMFIC_DATA: (SMFIP_NODATA, SMFIP_NR_DATA),
    SMFIC_HEADER: (SMFIP_NOHDRS, SMFIP_NR_HDR),
    SMFIC_EOH: (SMFIP_NOEOH, SMFIP_NR_EOH),
    SMFIC_BODY: (SMFIP_NOBODY, SMFIP_NR_BODY),
    SMFIC_UNKNOWN: (SMFIP_NOUNKNOWN, SMFIP_NR_UNKN),
    SMFIC_BODYEOB: (0, 0),
}

#: The modifications the end of a message may carry, with the action each needs.
MODIFICATION_ACTIONS = {
    SMFIR_ADDHEADER: SMFIF_ADDHDRS,
    SMFIR_INSHEADER: SMFIF_ADDHDRS,
    SMFIR_CHGHEADER: SMFIF_CHGHDRS,
    SMFIR_REPLBODY: SMFIF_CHGBODY,
    SMFIR_ADDRCPT: SMFIF_ADDRCPT,
    SMFIR_ADDRCPT_PAR: SMFIF_ADDRCPT_PAR,
    SMFIR_DELRCPT: SMFIF_DELRCPT,
    SMFIR_QUARANTINE: SMFIF_QUARANTINE,
    SMFIR_CHGFROM: SMFIF_CHGFROM,
}

#: Final answers to a step (progress is not final; modifications come only at the end).
ANSWERS = frozenset({SMFIR_CONTINUE, SMFIR_ACCEPT, SMFIR_REJECT, SMFIR_TEMPFAIL, SMFIR_REPLYCODE,
                     SMFIR_DISCARD, SMFIR_SKIP, SMFIR_SHUTDOWN, SMFIR_CONN_FAIL})

#: Macros sent before each step (Postfix's defaults, the ones milters read).
MACROS = {
    SMFIC_CONNECT: ("j", "{daemon_name}", "{client_addr}", "{client_port}", "{client_name}", "_"),
    SMFIC_HELO: ("{tls_version}", "{cipher}"),
    SMFIC_MAIL: ("i", "{auth_authen}", "{mail_addr}"),
    SMFIC_RCPT: ("{rcpt_addr}",),
    SMFIC_DATA: ("i",),
    SMFIC_EOH: ("i",),
    SMFIC_BODYEOB: ("i",),
}

_STAGE_COMMANDS = {SMFIM_CONNECT: SMFIC_CONNECT, SMFIM_HELO: SMFIC_HELO, SMFIM_ENVFROM: SMFIC_MAIL,
                   SMFIM_ENVRCPT: SMFIC_RCPT, SMFIM_DATA: SMFIC_DATA, SMFIM_EOM: SMFIC_BODYEOB,
                   SMFIM_EOH: SMFIC_EOH}


class MilterProtocolError(Exception):
    """The milter broke the protocol; ``str()`` is one line saying how."""


# -- packets -----------------------------------------------------------------------------


def encode(command, data=b""):
    """One packet: length (command byte included), command, data."""
    return struct.pack("!I", len(data) + 1) + command + data


class PacketReader:
    """Cut ``(command, data)`` packets out of bytes fed in any segmentation.

    A length of 0 or above ``limit`` raises `MilterProtocolError`: a milter
    cannot make the gateway buffer without bound.
    """

    def __init__(self, limit=MAX_PACKET):
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data):
        """Add ``data``; return the list of whole packets now available."""
        return list(self.packets(data))

    def packets(self, data):
        """Add ``data``; yield the whole packets now available, one by one.

        A bad length raises when it is reached, after the packets before it:
        the same error comes at the same point whatever the segmentation.
        """
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            (length,) = struct.unpack_from("!I", buffer)
            if length == 0 or length > self.limit:
                raise MilterProtocolError("packet length %d out of range (1..%d)" % (length, self.limit))
            if len(buffer) < 4 + length:
                break
            packet = (bytes(buffer[4:5]), bytes(buffer[5:4 + length]))
            del buffer[:4 + length]
            yield packet

    @property
    def pending(self):
        """How many bytes of an incomplete packet are buffered."""
        return len(self._buffer)


def _cstring(value):
    """``value`` (bytes or str) NUL-terminated; a NUL inside would end it early, so it is refused."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if b"\0" in value:
        raise ValueError("NUL in a milter string")
    return value + b"\0"


def _strings(data, count, what):
    """Split ``data`` into exactly ``count`` NUL-terminated strings."""
    parts = data.split(b"\0")
    if len(parts) != count + 1 or parts[-1] != b"":
        raise MilterProtocolError("%s: expected %d NUL-terminated string%s" % (what, count, "s" * (count > 1)))
    return parts[:-1]


def optneg_packet(version=VERSION, actions=ACTIONS, protocol=PROTOCOL):
    """The MTA's option negotiation."""
    return encode(SMFIC_OPTNEG, struct.pack("!III", version, actions, protocol))


def macro_packet(command, macros):
    """Macros (``{name: value}``) for the step ``command``; b"" when there are none."""
    if not macros:
        return b""
    data = b"".join(_cstring(name) + _cstring(value) for name, value in macros.items())
    return encode(SMFIC_MACRO, command + data)


def connect_packet(hostname, family=None, port=0, address=""):
    """SMFIC_CONNECT: ``family`` is ``"4"``, ``"6"``, ``"L"`` (a UNIX socket) or None (unknown)."""
    data = _cstring(hostname)
    if family is None:
        return encode(SMFIC_CONNECT, data + b"U")
    return encode(SMFIC_CONNECT, data + family.encode() + struct.pack("!H", port) + _cstring(address))


def envelope_packet(command, address, parameters=()):
    """SMFIC_MAIL or SMFIC_RCPT: ``<address>`` then each ESMTP parameter, NUL-terminated."""
    return encode(command, b"".join(_cstring(part) for part in (address, *parameters)))


def header_packet(name, value):
    """SMFIC_HEADER: the field's name and value."""
    return encode(SMFIC_HEADER, _cstring(name) + _cstring(value))


def body_packets(chunk):
    """SMFIC_BODY packets of at most `BODY_CHUNK` octets each."""
    return b"".join(encode(SMFIC_BODY, chunk[i:i + BODY_CHUNK]) for i in range(0, len(chunk), BODY_CHUNK))


# -- what the milter says ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The milter's option negotiation: version, actions and steps it wants, macro lists by step."""

    version: int
    actions: int
    protocol: int
    macros: dict


@dataclass(frozen=True, slots=True)
class MilterReply:
    """A final answer to a step: ``command`` is an SMFIR_* byte; ``reply`` the SMTP reply of SMFIR_REPLYCODE."""

    command: bytes
    reply: bytes | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """The milter is still working (SMFIR_PROGRESS): restart the step's timer."""


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Quarantine the message (SMFIR_QUARANTINE), for ``reason``."""

    reason: bytes


@dataclass(frozen=True, slots=True)
class ReplaceBodyPiece:
    """A piece of the replacement body (SMFIR_REPLBODY; several pieces make the new body)."""

    data: bytes


def _reply_code(data):
    """SMFIR_REPLYCODE: a NUL-terminated 4xx/5xx reply, lines separated by CRLF; return it CRLF-terminated."""
    (text,) = _strings(data, 1, "reply code")
    lines = text.split(b"\r\n")
    code = text[:3]
    if not (len(text) >= 3 and code[:1] in b"45" and code.isdigit()):
        raise MilterProtocolError("reply code %r is not 4xx or 5xx" % text[:40])
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if line[:3] != code or (len(line) > 3 and line[3:4] != (b" " if last else b"-")):
            if not (last and len(line) == 3 and line == code):
                raise MilterProtocolError("malformed reply line %r" % line[:60])
    reply = b"\r\n".join(lines) + b"\r\n"
    try:
        return filters.check_reply(reply)
    except ValueError as e:
        raise MilterProtocolError(str(e)) from None


def _index(data, what):
    if len(data) < 4:
        raise MilterProtocolError("%s: no index" % what)
    return struct.unpack_from("!I", data)[0], data[4:]


def _add_header(data):
    """SMFIR_ADDHEADER: a field name and value, appended to the header."""
    name, value = _strings(data, 2, "add header")
    return filters.AddHeader(_field_name(name), value)


def _insert_header(data):
    """SMFIR_INSHEADER: an index, then a field name and value inserted there."""
    index, rest = _index(data, "insert header")
    name, value = _strings(rest, 2, "insert header")
    return filters.InsertHeader(index, _field_name(name), value)


def _change_header(data):
    """SMFIR_CHGHEADER: an index (the Nth field of that name), a name and a new value (empty deletes)."""
    index, rest = _index(data, "change header")
    name, value = _strings(rest, 2, "change header")
    return filters.ChangeHeader(_field_name(name), max(index, 1), value or None)


def _add_recipient(data):
    """SMFIR_ADDRCPT: one address to add to the envelope."""
    (address,) = _strings(data, 1, "add recipient")
    return filters.AddRecipient(_address(address))


def _add_recipient_parameters(data):
    """SMFIR_ADDRCPT_PAR: an address to add, with its ESMTP parameters."""
    parts = data.split(b"\0")
    if len(parts) not in (2, 3) or parts[-1] != b"":
        raise MilterProtocolError("add recipient: expected an address and its parameters")
    return filters.AddRecipient(_address(parts[0]), parts[1] if len(parts) == 3 else b"")


def _delete_recipient(data):
    """SMFIR_DELRCPT: one address to remove from the envelope."""
    (address,) = _strings(data, 1, "delete recipient")
    return filters.DeleteRecipient(_address(address))


def _quarantine(data):
    """SMFIR_QUARANTINE: the reason to quarantine the message for."""
    (reason,) = _strings(data, 1, "quarantine")
    return Quarantine(reason)


def _change_sender(data):
    """SMFIR_CHGFROM: refused, the gateway never offers it."""
    raise MilterProtocolError("change sender is not an action the gateway offered")


_FINAL_REPLIES = (SMFIR_CONTINUE, SMFIR_ACCEPT, SMFIR_REJECT, SMFIR_TEMPFAIL, SMFIR_DISCARD,
                  SMFIR_SKIP, SMFIR_SHUTDOWN, SMFIR_CONN_FAIL)
"""The replies that end a step and carry nothing."""

_DECODERS = {
    **{command: (lambda data, command=command: MilterReply(command)) for command in _FINAL_REPLIES},
    SMFIR_REPLYCODE: lambda data: MilterReply(SMFIR_REPLYCODE, _reply_code(data)),
    SMFIR_PROGRESS: lambda data: Progress(),
    SMFIR_ADDHEADER: _add_header,
    SMFIR_INSHEADER: _insert_header,
    SMFIR_CHGHEADER: _change_header,
    SMFIR_REPLBODY: ReplaceBodyPiece,
    SMFIR_ADDRCPT: _add_recipient,
    SMFIR_ADDRCPT_PAR: _add_recipient_parameters,
    SMFIR_DELRCPT: _delete_recipient,
    SMFIR_QUARANTINE: _quarantine,
    SMFIR_CHGFROM: _change_sender,
}
"""Each reply command the milter may send, with the function that decodes its data."""


def decode_reply(command, data):
    """Turn one packet from the milter into a value (see `MilterSession.receive`)."""
    decoder = _DECODERS.get(command)
    if decoder is None:
        raise MilterProtocolError("unknown reply %r" % command)
    return decoder(data)


def _field_name(name):
    if not name or any(c <= 32 or c == 58 or c > 126 for c in name):
        raise MilterProtocolError("bad header field name %r" % name[:60])
    return name


def _address(address):
    """An address as milters write it (``<a@b>`` or ``a@b``), without the brackets."""
    if address.startswith(b"<") and address.endswith(b">"):
        address = address[1:-1]
    if any(c <= 32 or c > 126 or c in b"<>" for c in address):
        raise MilterProtocolError("bad recipient address %r" % address[:60])
    return address


def decode_optneg(data):
    """The milter's SMFIC_OPTNEG reply: three 32-bit words, then optional macro lists."""
    if len(data) < 12:
        raise MilterProtocolError("option negotiation: %d bytes, expected at least 12" % len(data))
    version, actions, protocol = struct.unpack_from("!III", data)
    macros = {}
    rest = data[12:]
    while rest:
        if len(rest) < 5 or b"\0" not in rest[4:]:
            raise MilterProtocolError("option negotiation: malformed macro list")
        (stage,) = struct.unpack_from("!I", rest)
        names, _, rest = rest[4:].partition(b"\0")
        command = _STAGE_COMMANDS.get(stage)
        if command is None:
            raise MilterProtocolError("option negotiation: unknown macro stage %d" % stage)
        macros[command] = tuple(n for n in names.decode("ascii", "replace").replace(",", " ").split() if n)
    return Negotiated(version, actions, protocol, macros)


# -- the MTA's state machine ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """What one step sends (``data``, maybe empty) and whether the milter will answer it."""

    data: bytes
    awaits: bool


#: The states of `MilterSession`, by what the gateway waits for.
NEW, NEGOTIATING, READY, WAITING, CLOSED = "new", "negotiating", "ready", "waiting", "closed"


class MilterSession:
    """One milter connection, seen from the MTA: which steps to send, which answers to expect.

    The shell calls `negotiate` first and feeds every byte the milter sends
    to `receive`; then calls one step method at a time (`connect`, `helo`,
    `mail`, `rcpt`, `data`, `header`, `end_of_headers`, `body`,
    `end_of_message`), sends the returned `Step.data`, and, when
    `Step.awaits`, waits for a `MilterReply` out of `receive` before the
    next step.  At the end of a message the modifications come out of
    `receive` before the final `MilterReply`.  `abort` and `quit` need no
    answer.

    ``macros`` maps macro names to values (str); the step methods send the
    ones the milter asked for (or `MACROS`) that have a value.
    """

    def __init__(self, actions=ACTIONS, protocol=PROTOCOL):
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.actions = 0
        self.protocol = 0
        self.version = None
        self.state = NEW
        self.macro_names = dict(MACROS)
        self.awaiting = None
        self.skipping = False
        self._reader = PacketReader()

    # -- negotiation

    def negotiate(self):
        """The first packet to send: the options the gateway offers."""
        if self.state != NEW:
            raise RuntimeError("negotiate() twice")
        self.state = NEGOTIATING
        return optneg_packet(VERSION, self.offered_actions, self.offered_protocol)

    def _negotiated(self, value):
        if not 2 <= value.version <= VERSION:
            raise MilterProtocolError("milter speaks protocol version %d (the gateway speaks 2 to 6)"
                                      % value.version)
        extra = value.protocol & ~self.offered_protocol
        if extra:
            raise MilterProtocolError("milter asks for protocol flags 0x%x the gateway did not offer" % extra)
        # Actions it may ask for but not offered are masked off; using one is an error then.
        self.actions = value.actions & self.offered_actions
        self.protocol = value.protocol
        self.version = value.version
        self.macro_names.update(value.macros)
        self.state = READY

    # -- steps

    def skips(self, command):
        """True when the milter asked not to be told about ``command``."""
        return bool(self.protocol & STEPS[command][0])

    def _step(self, command, packet, macros):
        if self.state != READY:
            raise RuntimeError("step %r while %s" % (command, self.state))
        skip, silent = STEPS[command]
        if self.protocol & skip:
            return Step(b"", False)
        names = self.macro_names.get(command, ())
        chosen = {n: macros[n] for n in names if macros and macros.get(n) is not None}
        data = macro_packet(command, chosen) + packet
        awaits = not self.protocol & silent
        if awaits:
            self.state = WAITING
            self.awaiting = command
        return Step(data, awaits)

    def connect(self, hostname, family, port, address, macros=None):
        """SMFIC_CONNECT (see `connect_packet`)."""
        return self._step(SMFIC_CONNECT, connect_packet(hostname, family, port, address), macros)

    def helo(self, name, macros=None):
        """SMFIC_HELO with the client's HELO/EHLO name."""
        return self._step(SMFIC_HELO, encode(SMFIC_HELO, _cstring(name)), macros)

    def mail(self, sender, parameters=(), macros=None):
        """SMFIC_MAIL: ``sender`` without brackets (they are added), then its ESMTP parameters."""
        self.skipping = False
        return self._step(SMFIC_MAIL, envelope_packet(SMFIC_MAIL, b"<" + sender + b">", parameters), macros)

    def rcpt(self, recipient, parameters=(), macros=None):
        """SMFIC_RCPT, like `mail`."""
        return self._step(SMFIC_RCPT, envelope_packet(SMFIC_RCPT, b"<" + recipient + b">", parameters), macros)

    def data(self, macros=None):
        """SMFIC_DATA: the message follows."""
        return self._step(SMFIC_DATA, encode(SMFIC_DATA), macros)

    def header(self, name, value, macros=None):
        """SMFIC_HEADER; ``value`` as in the message, its leading white space removed unless HDR_LEADSPC.

        A NUL (possible in a BDAT message) cannot travel in a milter string:
        the milter sees a space there.
        """
        if not self.protocol & SMFIP_HDR_LEADSPC:
            value = value.lstrip(b" \t")
        value = value.replace(b"\0", b" ")
        return self._step(SMFIC_HEADER, header_packet(name, value), macros)

    def end_of_headers(self, macros=None):
        """SMFIC_EOH."""
        return self._step(SMFIC_EOH, encode(SMFIC_EOH), macros)

    def body(self, chunk, macros=None):
        """SMFIC_BODY for one piece of at most `BODY_CHUNK` octets (nothing after a SKIP)."""
        if len(chunk) > BODY_CHUNK:
            raise ValueError("body piece of %d octets (at most %d)" % (len(chunk), BODY_CHUNK))
        if self.skipping or not chunk:
            return Step(b"", False)
        return self._step(SMFIC_BODY, encode(SMFIC_BODY, chunk), macros)

    def end_of_message(self, macros=None):
        """SMFIC_BODYEOB: the milter sends its modifications, then its final answer."""
        self.skipping = False
        return self._step(SMFIC_BODYEOB, encode(SMFIC_BODYEOB), macros)

    def abort(self):
        """SMFIC_ABORT: the transaction is over (no answer is expected)."""
        if self.state == WAITING:
            raise RuntimeError("abort while waiting for an answer")
        self.skipping = False
        return encode(SMFIC_ABORT)

    def quit(self):
        """SMFIC_QUIT: the session is over."""
        self.state = CLOSED
        return encode(SMFIC_QUIT)

    # -- what comes back

    def receive(self, data):
        """Feed bytes from the milter; return what they say, in order.

        `Negotiated`, then per awaited step any `Progress`, and (end of
        message only) modifications (`mailguard.filters` values,
        `ReplaceBodyPiece`, `Quarantine`) before the `MilterReply` that
        ends the step.  Raises `MilterProtocolError` for anything else.
        """
        out = []
        for command, payload in self._reader.packets(data):
            if self.state == NEGOTIATING:
                if command != SMFIR_OPTNEG:
                    raise MilterProtocolError("expected option negotiation, got %r" % command)
                value = decode_optneg(payload)
                self._negotiated(value)
                out.append(value)
                continue
            if self.state != WAITING:
                raise MilterProtocolError("unexpected packet %r while no answer is awaited" % command)
            value = decode_reply(command, payload)
            if isinstance(value, MilterReply):
                if command == SMFIR_SKIP:
                    if self.awaiting != SMFIC_BODY or not self.offered_protocol & SMFIP_SKIP:
                        raise MilterProtocolError("skip is only an answer to a body piece")
                    self.skipping = True
                self.state = READY
                self.awaiting = None
            elif not isinstance(value, Progress):
                if self.awaiting != SMFIC_BODYEOB:
                    raise MilterProtocolError("modification %r before the end of the message" % command)
                needed = MODIFICATION_ACTIONS[command]
                if not self.actions & needed:
                    raise MilterProtocolError("modification %r needs action 0x%x, not negotiated" % (command, needed))
            out.append(value)
        return out


# -- from milter answers to verdicts ------------------------------------------------------------

#: The reply a bare answer gets (`mailguard.replies`: the gateway's replies live in one table).
_DEFAULT_REPLIES = {
    SMFIR_REJECT: gateway_reply("milter_reject"),
    SMFIR_TEMPFAIL: gateway_reply("milter_tempfail"),
    SMFIR_SHUTDOWN: gateway_reply("milter_shutdown"),
    SMFIR_CONN_FAIL: gateway_reply("milter_shutdown"),
}


def to_verdict(reply, reason=""):
    """The `mailguard.filters.Verdict` of a final answer, or None for continue/skip (go on).

    Accept is `Verdict.ACCEPT` (the caller decides what it means at its step).
    """
    command = reply.command
    if command in (SMFIR_CONTINUE, SMFIR_SKIP):
        return None
    if command == SMFIR_ACCEPT:
        return filters.Verdict(filters.ACCEPT, reason=reason)
    if command == SMFIR_DISCARD:
        return filters.Verdict(filters.DISCARD, reason=reason or "discarded by milter")
    if command in (SMFIR_SHUTDOWN, SMFIR_CONN_FAIL):
        return filters.Verdict(filters.DROP, _DEFAULT_REPLIES[command], reason=reason or "milter shut down")
    if command == SMFIR_REPLYCODE:
        text = reply.reply
        action = filters.REJECT if text[:1] == b"5" else filters.TEMPFAIL
        return filters.Verdict(action, text, reason=reason)
    action = filters.REJECT if command == SMFIR_REJECT else filters.TEMPFAIL
    return filters.Verdict(action, _DEFAULT_REPLIES[command], reason=reason)


def _crlf(data):
    """Bare LF line ends (milters often write them) as CRLF."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class Modifications:
    """Collects what a milter sends at the end of a message, then makes its `Verdict`."""

    def __init__(self, leading_space=False, max_body=MAX_BODY):
        self.leading_space = leading_space
        self.max_body = max_body
        self.changes = []
        self.quarantine = None
        self._body = None

    def add(self, value):
        """Take one modification out of `MilterSession.receive`."""
        if isinstance(value, Quarantine):
            self.quarantine = value.reason
        elif isinstance(value, ReplaceBodyPiece):
            if self._body is None:
                self._body = bytearray()
            if len(self._body) + len(value.data) > self.max_body:
                raise MilterProtocolError("replacement body larger than %d octets" % self.max_body)
            self._body += value.data
        elif isinstance(value, (filters.AddHeader, filters.InsertHeader, filters.ChangeHeader)):
            header = value.value
            if header is not None:
                header = _crlf(header)
                if not self.leading_space:
                    header = b" " + header
                value = replace(value, value=header)
            self.changes.append(value)
        else:
            self.changes.append(value)

    def verdict(self, reply):
        """The message's `Verdict` given the final `MilterReply`."""
        verdict = to_verdict(reply)
        if verdict is None or verdict.action == filters.ACCEPT:
            if self.quarantine is not None:
                return filters.Verdict(filters.QUARANTINE,
                                       reason="quarantined by milter: %s" % self.quarantine.decode("utf-8", "replace"))
            changes = list(self.changes)
            if self._body is not None:
                changes.append(filters.ReplaceBody(_crlf(bytes(self._body))))
            return filters.Verdict(filters.ACCEPT, modifications=tuple(changes))
        return verdict

