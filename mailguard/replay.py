"""``mailguard replay``: what a policy would do to a recorded SMTP dialogue, offline.

A transcript (what swaks prints, or a plain ``C:``/``S:`` file) is parsed
into the bytes each side sent, line by line (`parse_transcript`).  `replay`
then feeds those bytes, in their recorded order, to the inspector the
listener's rule builds, through the same plugin registry the gateway uses,
and reports under each transcript line what the server would receive, what
the client would see, and every alert and verdict.  Nothing here touches the
network or a clock: the inspector is the sans-IO core, and this module only
plays both peers from the recording.

The recording answers the client's commands, not the gateway's, so three
cases are reconciled here, each said in the output:

 - a recorded reply to a command the gateway answered itself (or never sent
   on) is dropped: the server would never have written it;
 - a recorded positive reply to a command the gateway overwrote with ``x``
   is replaced by ``500 5.5.2 Error: command not recognized``, which is what
   a server answers to the x-ed line;
 - the gateway's own commands to the server (its EHLO, STARTTLS, RSET or
   XCLIENT under ``tls = terminate`` or ``xclient = on``) get the replies a
   willing server gives, the EHLO one taken from the recording.

Message filters are not called offline: each one a rule names is listed as
skipped (`skipped_filters`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailguard.events import AbortServer, Alert, Close, MessageSent, Passthrough, StartTLS, ToClient, ToServer

__all__ = ["Line", "ReplayResult", "TranscriptError", "parse_transcript", "replay", "show_bytes", "skipped_filters"]

#: What a server answers to a line of ``x`` characters.
UNRECOGNIZED = b"500 5.5.2 Error: command not recognized\r\n"

#: Most replies the replay invents in a row for the gateway's own commands.
MAX_OWN_COMMANDS = 8

_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9](?:[ -]|\Z)")
_ESCAPE = re.compile(rb"\\(x[0-9A-Fa-f]{2}|[rn0\\]|.?)")
_ESCAPES = {b"r": b"\r", b"n": b"\n", b"0": b"\0", b"\\": b"\\"}

# swaks' line prefixes (see its ptrans()): client, server, ignored.
_SWAKS_CLIENT = (b" -> ", b" ~> ", b"**> ", b"*~> ")
_SWAKS_SERVER = (b"<-  ", b"<~  ", b"<** ", b"<~* ")
_SWAKS_IGNORED = (b"===", b"***")
_SWAKS_DUMP = (b"  > ", b"<   ")


class TranscriptError(Exception):
    """The transcript cannot be read; ``str()`` is one line naming the file and the line number."""

    def __init__(self, name: str, line: int, problem: str) -> None:
        super().__init__(name, line, problem)
        self.name = name
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.name}: line {self.line}: {self.problem}"


@dataclass(frozen=True, slots=True)
class Line:
    """One line of the transcript: who sent it (``"C"`` or ``"S"``), its number, and its bytes on the wire."""

    number: int
    side: str
    data: bytes


def show_bytes(data: bytes) -> str:
    """``data`` as one printable line: a final CRLF dropped, other CR, LF, NUL and non-ASCII octets escaped."""
    if data.endswith(b"\r\n"):
        data = data[:-2]
    out = []
    for b in data:
        if b == 0x5C:
            out.append("\\\\")
        elif b == 0x0D:
            out.append("\\r")
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0:
            out.append("\\0")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append("\\x%02x" % b)
    return "".join(out)


# -- reading transcripts --------------------------------------------------------


def _unescape(text: bytes, name: str, number: int) -> bytes:
    def one(match: re.Match) -> bytes:
        code = match.group(1)
        if code[:1] == b"x" and len(code) == 3:
            return bytes([int(code[1:], 16)])
        if code in _ESCAPES:
            return _ESCAPES[code]
        raise TranscriptError(
            name, number, "unknown escape \\%s (use \\r, \\n, \\0, \\xHH or \\\\)" % code.decode("ascii", "replace")
        )

    return _ESCAPE.sub(one, text)


def _plain(rows: list[bytes], name: str) -> list[Line]:
    lines = []
    for number, row in enumerate(rows, 1):
        row = row[:-1] if row.endswith(b"\r") else row
        if not row.strip() or row.startswith(b"#"):
            continue
        side = row[:2]
        if side not in (b"C:", b"S:"):
            raise TranscriptError(name, number, "expected a line starting with 'C: ' or 'S: '")
        text = row[3:] if row[2:3] == b" " else row[2:]
        lines.append(Line(number, side[:1].decode(), _unescape(text, name, number) + b"\r\n"))
    return lines


def _swaks(rows: list[bytes], name: str) -> list[Line]:
    lines = []
    in_data = False
    for index, row in enumerate(rows):
        number = index + 1
        if not row.strip() or row.startswith(_SWAKS_IGNORED):
            continue
        prefix, text = row[:4], row[4:]
        if prefix in _SWAKS_DUMP:
            raise TranscriptError(name, number, "a raw dump line; record the transcript without --show-raw-text")
        if prefix in _SWAKS_SERVER:
            text = text[:-1] if text.endswith(b"\r") else text
            if in_data:
                raise TranscriptError(name, number, "a server reply inside the message data (no final '.' line)")
            if _REPLY_LINE.match(text) and text[:3] == b"354":
                in_data = True
            lines.append(Line(number, "S", text + b"\r\n"))
        elif prefix in _SWAKS_CLIENT:
            if not in_data:
                text = text[:-1] if text.endswith(b"\r") else text
                lines.append(Line(number, "C", text + b"\r\n"))
            elif text == b"." and _next_is_server(rows, index + 1):
                # swaks prints its final ".CRLF" as "." and LF.
                in_data = False
                lines.append(Line(number, "C", b".\r\n"))
            else:
                # Inside the data the line end is what was sent: CR LF, or a bare LF.
                lines.append(Line(number, "C", text + b"\n"))
        else:
            raise TranscriptError(
                name, number, "not a swaks transcript line (expected ' -> ', '<-  ', '<** ', ' ~> ', '<~  ' or '===')"
            )
    return lines


def _next_is_server(rows: list[bytes], start: int) -> bool:
    for row in rows[start:]:
        if not row.strip() or row.startswith(_SWAKS_IGNORED):
            continue
        return row[:4] in _SWAKS_SERVER
    return True


def parse_transcript(raw: bytes, name: str = "transcript") -> list[Line]:
    """Read a swaks transcript or a ``C:``/``S:`` transcript into `Line` values.

    The format is told by the first line that is not blank or a ``#``
    comment: ``C:`` or ``S:`` starts the plain format, anything else is read
    as swaks output.  Every server line must be a reply line (a code 200-599
    then SP, ``-`` or its end), a multi-line reply must be finished, and the
    transcript must hold a dialogue.  Raise `TranscriptError` otherwise.
    """
    rows = raw.split(b"\n")
    if rows and rows[-1] == b"":
        rows.pop()
    first = next((r for r in rows if r.strip() and not r.startswith(b"#")), None)
    if first is None:
        raise TranscriptError(name, max(len(rows), 1), "no dialogue in the transcript")
    lines = _plain(rows, name) if first[:2] in (b"C:", b"S:") else _swaks(rows, name)
    _check_replies(lines, name)
    return lines


def _check_replies(lines: list[Line], name: str) -> None:
    """Raise `TranscriptError` unless every server line is a reply line and every multi-line reply is whole."""
    open_reply = None
    for line in lines:
        if line.side == "S":
            text = line.data[:-2]
            if not _REPLY_LINE.match(text):
                raise TranscriptError(name, line.number, "not an SMTP reply line (expected a code 200-599)")
            if open_reply is not None and text[:3] != open_reply.data[:3]:
                raise TranscriptError(name, line.number, "the lines of one reply carry different codes")
            open_reply = line if text[3:4] == b"-" else None
        elif open_reply is not None:
            raise TranscriptError(name, line.number, "a client line in the middle of a multi-line reply")
    if open_reply is not None:
        raise TranscriptError(name, lines[-1].number, "the transcript ends in the middle of a multi-line reply")


# -- playing the dialogue --------------------------------------------------------


@dataclass(slots=True)
class _Unit:
    """What the recorded server answered with one reply: the greeting, a command, or a message's data."""

    kind: str  # "greeting", "command" or "data"
    verb: bytes = b""
    sent: bytearray = field(default_factory=bytearray)
    forwarded: bytearray = field(default_factory=bytearray)


@dataclass(slots=True)
class ReplayResult:
    """The outcome of one replay.

    ``lines`` is the report, one string per output line.  ``client_view``
    is the dialogue as the client would see it: ``C: `` lines it sent and
    ``S: `` lines it received, in order.  ``to_server`` and ``to_client``
    are all the bytes each peer would receive.  ``status`` is 0 when every
    client octet reaches the server unchanged and no alert fires, else 1.
    """

    lines: list[str] = field(default_factory=list)
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_view: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    status: int = 0


def skipped_filters(rule: object) -> tuple[str, ...]:
    """The names of the message filters (milters) a rule would call: never called offline.

    A rule without filters yields ``()``.
    """
    return tuple(str(getattr(f, "name", f)) for f in getattr(rule, "filters", ()) or ())


@dataclass(slots=True)
class _Feed:
    """What the inspector asked for in answer to one feed, sorted for the report.

    ``unit`` is the client unit fed (None for a server feed), ``sent`` the
    bytes fed; ``own`` holds the gateway's own commands to the server,
    ``ready`` the calls that tell the inspector a leg's TLS is ready.
    """

    unit: _Unit | None
    sent: bytes | None
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    own: list[bytes] = field(default_factory=list)
    tls_started: bool = False
    notes: list[str] = field(default_factory=list)
    ready: list = field(default_factory=list)


_OWN_ANSWERS = {
    b"STARTTLS": b"220 2.0.0 Ready to start TLS\r\n",
    b"XCLIENT": b"220 server ESMTP\r\n",
}
"""What a willing server answers to the gateway's own commands (EHLO: the recorded reply; others: 250)."""


class _Replay:
    """One replay in progress: the inspector, the recorded side's bookkeeping, the report."""

    def __init__(self, inspector, lines: list[Line]) -> None:
        self.inspector = inspector
        self.lines = lines
        self.result = ReplayResult()
        self.owed: list[_Unit] = []  # recorded units still waiting for their recorded reply
        self.unit: _Unit | None = None  # the message data being collected
        self.data_mode = False  # the recorded dialogue is inside a message
        self.closed = False
        self.server_gone = False
        self.client_total = bytearray()
        self.forwarded_total = bytearray()
        self._own: list[bytes] = []  # the gateway's own commands the server has not answered yet
        self.changed = 0  # client lines that would not reach the server as sent
        self.ehlo_reply = next(
            (self._reply_at(i) for i, line in enumerate(lines) if line.side == "C" and line.data[:5].upper() == b"EHLO "),
            None,
        )

    def _reply_at(self, index: int) -> bytes | None:
        """The whole recorded reply following the client line at ``index`` (for the gateway's own EHLO)."""
        out = b""
        for line in self.lines[index + 1 :]:
            if line.side != "S":
                if out:
                    break
                continue
            out += line.data
            if line.data[3:4] != b"-":
                return out if out[:1] == b"2" else None
        return None

    def say(self, text: str) -> None:
        self.result.lines.append("       " + text)

    def show(self, label: str, data: bytes) -> None:
        parts = data.split(b"\r\n")
        if parts and parts[-1] == b"":
            parts.pop()
        for i, part in enumerate(parts):
            self.say((label if i == 0 else " " * len(label)) + " " + show_bytes(part))

    # -- feeding the inspector ---------------------------------------------------

    def run(self) -> ReplayResult:
        self.owed.append(_Unit("greeting"))
        self.carry_out(self.inspector.server_connected(), None, None)
        self.own_commands()
        i = 0
        lines = self.lines
        while i < len(lines):
            line = lines[i]
            if line.side == "C":
                self.client_line(line)
                i += 1
                continue
            j = i
            while lines[j].data[3:4] == b"-":
                j += 1
            self.server_reply(lines[i : j + 1])
            i = j + 1
        return self.result

    def client_line(self, line: Line) -> None:
        self.result.lines.append("%4d C: %s" % (line.number, show_bytes(line.data)))
        self.result.client_view.append("C: " + show_bytes(line.data))
        self.client_total += line.data
        unit = self.record_client(line.data)
        if self.closed:
            self.changed += 1
            self.say("not sent: the gateway has closed the session")
            return
        self.carry_out(self.inspector.client_data(line.data), unit, line.data)
        self.own_commands()

    def record_client(self, data: bytes) -> _Unit:
        """Which recorded unit this client line belongs to (a new command, or the message data)."""
        if self.data_mode:
            unit = self.unit
            unit.sent += data
            if (b"\r\n" + bytes(unit.sent)).endswith(b"\r\n.\r\n"):
                self.data_mode = False
                self.owed.append(unit)
            return unit
        verb = data.split(b" ", 1)[0].rstrip(b"\r\n").upper()
        unit = _Unit("command", verb, bytearray(data))
        self.owed.append(unit)
        return unit

    def server_reply(self, reply_lines: list[Line]) -> None:
        recorded = b"".join(line.data for line in reply_lines)
        for line in reply_lines:
            self.result.lines.append("%4d S: %s" % (line.number, show_bytes(line.data)))
        unit = self.owed.pop(0) if self.owed else None
        if recorded[:3] == b"354" and unit is not None and unit.kind == "command":
            self.data_mode = True
            self.unit = _Unit("data", b"<data>")
        dropped = self._dropped(unit)
        if dropped is not None:
            self.say("dropped: " + dropped)
            return
        feed = recorded
        if unit.kind == "command" and unit.forwarded.rstrip(b"\r\n").strip(b"x") == b"" and recorded[:1] in b"23":
            feed = UNRECOGNIZED
            self.say("the server received the x-ed line, not the recorded command: replayed as its error reply")
            self.show("server answers:", feed)
        self.carry_out(self.inspector.server_data(feed), None, feed)
        self.own_commands()

    def _dropped(self, unit: _Unit | None) -> str | None:
        """Why the recorded reply to ``unit`` never reaches the gateway, or None when it does."""
        if unit is None:
            return "this reply answers no command of the dialogue"
        if self.closed:
            return "the gateway has closed the session"
        if self.server_gone:
            return "the gateway has dropped the server connection"
        if unit.kind != "greeting" and not unit.forwarded:
            what = "the message" if unit.kind == "data" else show_bytes(unit.verb) or "that line"
            return "the server never received %s (the gateway answered or refused it)" % what
        return None

    def own_commands(self) -> None:
        """Answer the gateway's own commands to the server as a willing server would."""
        queue = self._own
        count = 0
        while queue and count < MAX_OWN_COMMANDS and not self.closed:
            count += 1
            command = queue.pop(0)
            verb = command.split(b" ", 1)[0].rstrip(b"\r\n").upper()
            if verb == b"EHLO":
                answer = self.ehlo_reply or b"250 server\r\n"
            else:
                answer = _OWN_ANSWERS.get(verb, b"250 2.0.0 Ok\r\n")
            self.show("server answers the gateway:", answer)
            self.carry_out(self.inspector.server_data(answer), None, None)

    # -- what the inspector asked for -----------------------------------------------

    def carry_out(self, events, unit: _Unit | None, sent: bytes | None) -> None:
        """Report the events of one feed; ``unit`` is the client unit fed (None for a server feed)."""
        feed = _Feed(unit, sent)
        for event in events:
            handler = self._HANDLERS.get(type(event))
            if handler is not None:
                handler(self, feed, event)
        self._report_server(feed)
        self._report_client(feed)
        for note in feed.notes:
            self.say(note)
        self._own.extend(feed.own)
        for call in feed.ready:
            follow = call()
            if follow:
                self.carry_out(follow, None, None)

    def _report_server(self, feed: _Feed) -> None:
        """Count and report what the server gets from one feed, the gateway's own commands last."""
        unit, sent, to_server = feed.unit, feed.sent, bytes(feed.to_server)
        if unit is not None:
            unit.forwarded += to_server
            if to_server != sent:
                self.changed += 1
        self.forwarded_total += to_server
        if to_server:
            if sent is not None and to_server == sent:
                self.say("server gets: (same)")
            else:
                self.show("server gets:", to_server)
        elif unit is not None and not self.closed:
            self.say("server gets: nothing")
        for data in feed.own:
            self.show("the gateway sends the server:", data)

    def _report_client(self, feed: _Feed) -> None:
        """Report what the client sees from one feed, and add it to the client's view."""
        to_client = bytes(feed.to_client)
        if not to_client:
            return
        if feed.unit is None and feed.sent is not None and to_client == feed.sent:
            self.say("client sees: (same)")
        else:
            self.show("client sees:", to_client)
        parts = to_client.split(b"\r\n")
        self.result.client_view.extend("S: " + show_bytes(p) for p in parts[:-1])

    def _to_server(self, feed: _Feed, event: ToServer) -> None:
        data = event.data
        self.result.to_server += data
        if feed.unit is not None and not feed.tls_started:
            feed.to_server += data
        elif feed.unit is None and self.client_total.startswith(bytes(self.forwarded_total + feed.to_server + data)):
            # Held client bytes (pregreet = ignore) released by the greeting.
            feed.to_server += data
        else:
            feed.own.append(data)

    def _to_client(self, feed: _Feed, event: ToClient) -> None:
        feed.to_client += event.data
        self.result.to_client += event.data

    def _alert(self, feed: _Feed, event: Alert) -> None:
        self.result.alerts.append(event.tag)
        feed.notes.append("alert %s: %s" % (event.tag, event.text))

    def _close(self, feed: _Feed, event: Close) -> None:
        self.closed = True
        feed.notes.append("the gateway closes the session (%s)" % event.reason)

    def _abort_server(self, feed: _Feed, event: AbortServer) -> None:
        self.server_gone = True
        feed.notes.append("the gateway drops the server connection (%s)" % event.reason)

    def _start_tls(self, feed: _Feed, event: StartTLS) -> None:
        feed.tls_started = True
        feed.notes.append("TLS starts on the %s leg" % event.side)
        # As the relay does: the leg is ready once what came before is written.
        feed.ready.append(self.inspector.client_tls_ready if event.side == "client"
                          else self.inspector.server_tls_ready)

    def _passthrough(self, feed: _Feed, event: Passthrough) -> None:
        feed.notes.append("passthrough: from here on the session is relayed without inspection")

    def _message_sent(self, feed: _Feed, event: MessageSent) -> None:
        feed.notes.append("message of %d octets sent to the server" % event.size)

    _HANDLERS = {
        ToServer: _to_server,
        ToClient: _to_client,
        Alert: _alert,
        Close: _close,
        AbortServer: _abort_server,
        StartTLS: _start_tls,
        Passthrough: _passthrough,
        MessageSent: _message_sent,
    }
    """Each event the inspector may ask for, with the method that sorts it into the feed's report."""


def replay(lines: list[Line], inspector, heading: list[str] | None = None) -> ReplayResult:
    """Play ``lines`` through ``inspector`` (a fresh `IInspector`); return the report and status."""
    run = _Replay(inspector, lines)
    result = run.result
    result.lines.extend(heading or [])
    run.run()
    unchanged = bytes(run.forwarded_total) == bytes(run.client_total)
    if unchanged and not result.alerts:
        result.lines.append("verdict: every client line reaches the server unchanged, no alert (exit 0)")
        result.status = 0
    else:
        why = []
        if not unchanged:
            n = run.changed
            why.append("%d client line%s refused or rewritten" % (n, "" if n == 1 else "s") if n
                       else "client bytes changed")
        if result.alerts:
            n = len(result.alerts)
            why.append("%d alert%s" % (n, "" if n == 1 else "s"))
        result.lines.append("verdict: %s (exit 1)" % ", ".join(why))
        result.status = 1
    return result
