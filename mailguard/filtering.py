"""The shell's side of the message-filter seam: the filter chain, the spool, delivery from it.

The SMTP inspector (`mailguard.smtp`) never forwards a filtered envelope
command or any part of a message on its own: it emits `FilterEnvelope`,
`ToSpool`, `MessageSpooled` and waits.  A `FilterSession` (one per client
session that has filters) carries those events out: it asks the rule's
filters in order (content rules, milters, plugins), each step under the
filter's ``timeout`` on the injected clock with its ``default-action`` when
the filter fails, keeps the message in a private spool file (mode 0600,
never whole in memory), applies the modifications of an accepted message,
keeps quarantined ones, and streams an approved message to the server
(`SendSpool`).  The inspector is then told the verdict
(``envelope_verdict`` / ``message_verdict``) and goes on.
"""

import errno
import os
import socket
import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailguard import filters as F
from mailguard.filters import chain_of
from mailguard.interfaces import IInlineMessageFilter
from mailguard.events import (
    FILTER_EVENTS, Alert, DropSpool, FilterAbort, FilterEnvelope, FilterReply, MessageSpooled, SendSpool, ToSpool,
)
from mailguard.message import BodyChunk, EndOfHeaders, HeaderField, MessageSplitter, Stuffer, Unstuffer
from mailguard.writenow import send_file, write_sequence

log = Logger(namespace="mailguard")

__all__ = ["FILTER_EVENTS", "FilterSession", "SpoolFile", "chain_of", "prepare_spool", "quarantine", "rewrite"]

#: Octets read from the spool at a time.
READ_SIZE = 65536

#: A spooled message up to this size is written to the server at once; a larger one is streamed piece by piece.
WHOLE_SEND = 131072


# -- the spool ------------------------------------------------------------------------

_prepared = set()


def prepare_spool(directory, clean=True):
    """Create ``directory`` (mode 0700); with ``clean``, remove the stale spool files a previous run left.

    Raise ``OSError`` when it cannot be created or is not private to us.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for name in os.listdir(directory) if clean else ():
        if name.startswith("msg-"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
    _prepared.add(directory)


#: Emptied spool files kept open for the next message, per directory (creating a file costs more than reusing one).
POOL_SIZE = 32

_pool = {}  # directory -> [descriptor, ...] of empty, unnamed spool files


def _new_spool_fd(directory):
    """An unnamed file (mode 0600) in ``directory``: nothing to remove after a crash, nothing another process can open."""
    try:
        return os.open(directory, os.O_RDWR | os.O_TMPFILE, 0o600)
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    # No O_TMPFILE here: a named file, unnamed at once.
    path = os.path.join(directory, "msg-%d-%d-%s" % (os.getpid(), time.monotonic_ns(), os.urandom(4).hex()))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    return fd


class SpoolFile:
    """One message in the spool: a private, unnamed file written as it arrives, read back in pieces.

    The file has no name in the spool directory (``O_TMPFILE``, or a name
    removed as soon as it is opened): only the gateway's descriptor reaches
    it, and it cannot outlive the process.  `remove` empties it (the
    message is gone) and keeps the emptied file for the next message.
    """

    __slots__ = ("directory", "size", "message_size", "_fd")

    def __init__(self, directory):
        if directory not in _prepared:
            prepare_spool(directory)
        self.directory = directory
        free = _pool.get(directory)
        self._fd = free.pop() if free else _new_spool_fd(directory)
        self.size = 0
        self.message_size = None

    def fileno(self):
        """The file's descriptor (None once removed)."""
        return self._fd

    def write(self, data):
        """Append ``data``."""
        n = os.pwrite(self._fd, data, self.size)
        if n < len(data):
            view = memoryview(data)[n:]
            while view:
                view = view[os.pwrite(self._fd, view, self.size + len(data) - len(view)) :]
        self.size += len(data)

    def place_after(self, data):
        """Write ``data`` just past the message, outside it (``size`` and `pieces` leave it out)."""
        view = memoryview(data)
        while view:
            view = view[os.pwrite(self._fd, view, self.size + len(data) - len(view)) :]

    def pieces(self, piece_size=READ_SIZE, offset=0):
        """The file's octets from ``offset``, in pieces of at most ``piece_size``."""
        fd, size = self._fd, self.size
        if fd is None:
            raise OSError(errno.EBADF, "spool file already removed")
        while offset < size:
            data = os.pread(fd, min(piece_size, size - offset), offset)
            if not data:
                return
            offset += len(data)
            yield data

    def remove(self):
        """Empty the file and give it back for the next message, or close it (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            os.close(fd)
            return
        free = _pool.setdefault(self.directory, [])
        if len(free) < POOL_SIZE:
            free.append(fd)
        else:
            os.close(fd)


def unsent(spool, trailer, sent):
    """What is left to write of ``spool``'s message and then ``trailer`` once ``sent`` octets of both went."""
    pieces = list(spool.pieces(WHOLE_SEND, sent))
    if sent < spool.size + len(trailer):
        pieces.append(trailer[max(sent - spool.size, 0) :])
    return [p for p in pieces if p]


def message_pieces(spool, stuffed):
    """The message octets of ``spool`` (dot stuffing undone for a DATA spool)."""
    unstuff = Unstuffer().feed if stuffed else None
    for data in spool.pieces():
        yield unstuff(data) if unstuff else data


def message_events(spool, stuffed, max_header_size=None):
    """`HeaderField`, `EndOfHeaders` and `BodyChunk` events of a spooled message, in order."""
    splitter = MessageSplitter() if max_header_size is None else MessageSplitter(max_header_size)
    for data in message_pieces(spool, stuffed):
        yield from splitter.feed(data)
    yield from splitter.close()


def rewrite(spool, stuffed, modifications, directory):
    """A new `SpoolFile` holding ``spool``'s message with the header and body ``modifications`` applied.

    Its ``message_size`` is the new message's size as SIZE counts it (dot
    stuffing excluded), counted as it is written.
    """
    header_mods = [m for m in modifications if m.__class__ in (F.AddHeader, F.InsertHeader, F.ChangeHeader)]
    bodies = [m for m in modifications if m.__class__ is F.ReplaceBody]
    out = SpoolFile(directory)
    stuff = Stuffer().feed if stuffed else (lambda data: data)
    size = 0

    def write(data):
        nonlocal size
        size += len(data)
        out.write(stuff(data))

    fields = []
    body_started = False
    for event in message_events(spool, stuffed, max_header_size=1 << 62):
        cls = event.__class__
        if cls is HeaderField:
            fields.append([event.name, event.value])
        elif cls is EndOfHeaders:
            for line in _apply_headers(fields, header_mods):
                write(line)
            write(b"\r\n")
            if bodies:
                write(bodies[-1].data)
            body_started = True
        elif cls is BodyChunk and not bodies and body_started:
            write(event.data)
    out.message_size = size
    return out


def _apply_headers(fields, mods):
    for m in mods:
        if m.__class__ is F.ChangeHeader:
            seen = 0
            for f in fields:
                if f is not None and f[0].lower() == m.name.lower():
                    seen += 1
                    if seen == m.index:
                        if m.value is None:
                            fields[fields.index(f)] = None
                        else:
                            f[1] = m.value
                        break
            else:
                if m.value is not None:
                    fields.append([m.name, m.value])
        elif m.__class__ is F.InsertHeader:
            fields.insert(min(max(m.index, 0), len(fields)), [m.name, m.value])
        else:
            fields.append([m.name, m.value])
    for f in fields:
        if f is not None:
            yield f[0] + b":" + f[1] + b"\r\n"


def quarantine(spool, stuffed, maildir):
    """Keep the message in the Maildir ``maildir`` (created 0700 if needed); return its file name."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    name = "%d.M%dP%d_%s.%s" % (time.time(), time.monotonic_ns() % 1000000, os.getpid(), os.urandom(4).hex(),
                               socket.gethostname().replace("/", "_"))
    tmp = os.path.join(maildir, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for data in message_pieces(spool, stuffed):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(maildir, "new", name))
    return name


# -- asking filters --------------------------------------------------------------------


class _Failed(Exception):
    """A filter did not answer usably; ``why`` says how."""

    def __init__(self, why):
        super().__init__(why)
        self.why = why


def _raised(e):
    """How a filter method that raised ``e`` is described (FILTER_FAILED)."""
    return "raised %s: %s" % (type(e).__name__, e)


def _tell(config, clock, method, *args):
    """Tell a filter what it need not answer (a server reply, an abort, the end of the session).

    Whatever it answers is ignored: an exception, a failed Deferred, or
    one still pending after ``config.timeout`` (then cancelled).
    """
    try:
        result = method(*args)
    except Exception:
        return
    if isinstance(result, defer.Deferred):
        result.addTimeout(config.timeout, clock)
        result.addErrback(lambda _: None)


class FilterSession:
    """The filter chain and the spool of one client session (driven by the relay's `ClientLeg`).

    ``leg`` is the session's `mailguard.relay.ClientLeg`: its inspector is
    told the verdicts, its ``_run`` carries out what the inspector answers,
    its tracker logs the alerts, its server transport receives the spool.
    """

    def __init__(self, leg, chain, clock, spool_directory, quarantine_directory):
        self.leg = leg
        self.chain = chain
        self.clock = clock
        self.spool_directory = spool_directory
        self.quarantine_directory = quarantine_directory
        self.filters = None  # built at the first MAIL
        self.inline = ()  # the built filters that read the message as it is spooled
        self.spool = None
        self.stuffed = True
        self.closed = False
        self._unstuffer = None  # of the message being spooled, for the inline filters
        self._inline_failed = {}  # filter name -> why, an inline filter that raised while reading

    # -- events from the inspector ---------------------------------------------------

    def handle(self, event):
        """Carry out one filter event of the inspector."""
        cls = event.__class__
        if cls is ToSpool:
            self._spool().write(event.data)
            if self.inline:
                self._feed_inline(event.data, event.stuffed)
        elif cls is FilterEnvelope:
            self._envelope(event)
        elif cls is FilterReply:
            for config, f in self.filters or ():
                _tell(config, self.clock, f.serverReply, event.command, event.code, event.text)
        elif cls is FilterAbort:
            for config, f in self.filters or ():
                _tell(config, self.clock, f.abort)
            self._drop_spool()
        elif cls is MessageSpooled:
            self._message(event)
        elif cls is DropSpool:
            self._drop_spool()
        elif cls is SendSpool:
            self._send(event.trailer)

    def close(self):
        """The session is over: close the filters, remove the spool."""
        if self.closed:
            return
        self.closed = True
        self._drop_spool()
        for config, f in self.filters or ():
            _tell(config, self.clock, f.close)

    # -- helpers ------------------------------------------------------------------------

    def _spool(self):
        if self.spool is None:
            self.spool = SpoolFile(self.spool_directory)
        return self.spool

    def _drop_spool(self):
        if self.spool is not None:
            self.spool.remove()
            self.spool = None
        self._unstuffer = None
        self._inline_failed = {}

    def _feed_inline(self, data, stuffed):
        """Give the inline filters the next octets of the message being spooled."""
        if stuffed:
            if self._unstuffer is None:
                self._unstuffer = Unstuffer()
            data = self._unstuffer.feed(data)
        failed = self._inline_failed
        for config, f in self.inline:
            if config.name in failed:
                continue
            try:
                f.messageData(data)
            except Exception as e:
                failed[config.name] = _raised(e)

    def _alert(self, tag, text, **fields):
        leg = self.leg
        leg.factory.tracker.alert(leg.session, Alert(tag, text, fields))

    def _failed(self, config, why):
        self._alert("FILTER_FAILED", "filter %s: %s; %s applies" % (config.name, why, config.default_action),
                    filter=config.name, reason=why)
        return F.default_verdict(config, why)

    def _facts(self):
        inspector = self.leg.inspector
        peer = inspector.peer
        if peer is None:
            address = self.leg.transport.getPeer()
            host = getattr(address, "host", None)
            peer = (host, getattr(address, "port", 0)) if host is not None else None
        version = cipher = None
        if inspector.client_tls:
            conn = getattr(self.leg.transport, "getHandle", lambda: None)()
            get_version = getattr(conn, "get_protocol_version_name", None)
            if get_version is not None:
                version, cipher = get_version(), conn.get_cipher_name()
        session = self.leg.session
        listener = self.leg.factory.listener
        return F.SessionFacts(
            client=peer, helo=inspector.helo, client_tls=inspector.client_tls, server_tls=inspector.server_tls,
            tls_version=version, cipher=cipher, auth=inspector.authenticated_as,
            session=str(getattr(session, "id", "")), listener=listener.name, rule=listener.rule.name,
        )

    def _build(self):
        facts = self._facts()
        built = []
        for config in self.chain:
            try:
                built.append((config, config.factory.buildFilter(config, facts)))
            except Exception as e:
                self._alert("FILTER_FAILED", "filter %s could not start: %s" % (config.name, e), filter=config.name)
                built.append((config, _Broken(F.default_verdict(config, "could not start"))))
        self.filters = built
        self.inline = tuple((config, f) for config, f in built if IInlineMessageFilter.providedBy(f))
        return facts

    def _deliver_verdict(self, method, *args):
        if self.closed or self.leg.inspector.phase == "CLOSED":
            return
        self.leg._run(method(*args))

    # -- envelope ---------------------------------------------------------------------

    def _envelope(self, event):
        try:
            if self.filters is None:
                facts = self._build()
            else:
                facts = self._facts() if event.command == b"MAIL" else None
        except Exception:
            log.failure("message filter envelope step failed")
            self._envelope_done(F.tempfail(), None)
            return
        _advance(self.clock, self._envelope_steps(event, facts), self._envelope_done)

    def _envelope_steps(self, event, facts):
        """The chain at an envelope command, as steps for `_advance`; returns the verdict."""
        for config, f in self.filters:
            if event.command == b"MAIL":
                step = (config, f.envelopeFrom, (facts, event.address, event.parameters))
            else:
                step = (config, f.envelopeRecipient, (event.address, event.parameters))
            try:
                answer = _checked((yield step), F.ENVELOPE_ACTIONS, F.CONTINUE)
            except _Failed as e:
                answer = _envelope_default(self._failed(config, e.why))
            if answer.action != F.CONTINUE:
                return answer
        return F.Verdict.CONTINUE

    def _envelope_done(self, verdict, error):
        if error is not None:
            log.failure("message filter envelope step failed", error)
            verdict = F.tempfail()
        self._deliver_verdict(self.leg.inspector.envelope_verdict, verdict)

    # -- message ----------------------------------------------------------------------

    def _message(self, event):
        spool = self._spool()
        self.stuffed = event.stuffed
        self._unstuffer = None

        def done(result, error):
            self._message_done(event, result, error)

        _advance(self.clock, self._message_steps(spool, event.stuffed), done)

    def _message_done(self, event, result, error):
        size = event.size
        try:
            if error is not None:
                error.raiseException()
            verdict, modifications = result
            if verdict.action == F.ACCEPT and modifications:
                size = self._modify(modifications, event.stuffed, size)
                verdict = F.Verdict(F.ACCEPT, modifications=tuple(modifications), reason=verdict.reason)
            elif verdict.action == F.QUARANTINE:
                name = quarantine(self.spool, event.stuffed, self.quarantine_directory)
                verdict = F.Verdict(F.QUARANTINE, reason=(verdict.reason + " " if verdict.reason else "") + "kept as " + name)
        except Exception as e:
            log.failure("message filter step failed")
            verdict = F.tempfail(reason="gateway error: %s" % e)
        if verdict.action != F.ACCEPT:
            self._drop_spool()
        self._deliver_verdict(self.leg.inspector.message_verdict, verdict, size)

    def _message_steps(self, spool, stuffed):
        """The chain at the end of the message, as steps for `_advance`; returns ``(verdict, modifications)``."""
        modifications = []
        for config, f in self.filters or ():
            try:
                answer = _checked((yield from self._filter_steps(config, f, spool, stuffed)), F.MESSAGE_ACTIONS, F.ACCEPT)
            except _Failed as e:
                answer = self._failed(config, e.why)
            if answer.action != F.ACCEPT:
                return answer, ()
            modifications.extend(answer.modifications)
        return F.Verdict.ACCEPT, modifications

    def _filter_steps(self, config, f, spool, stuffed):
        """One filter's steps for the message; returns its answer."""
        if IInlineMessageFilter.providedBy(f):
            # It has read the message while it was spooled.
            why = self._inline_failed.pop(config.name, None)
            if why is not None:
                raise _Failed(why)
            return (yield (config, f.endOfMessage, ()))
        for event in message_events(spool, stuffed):
            cls = event.__class__
            if cls is HeaderField:
                answer = yield (config, f.header, (event.name, event.value))
            elif cls is EndOfHeaders:
                answer = yield (config, f.endOfHeaders, ())
            else:
                answer = yield (config, f.body, (event.data,))
            if answer is not None:
                return answer
        return (yield (config, f.endOfMessage, ()))

    def _modify(self, modifications, stuffed, size):
        body_or_header = [m for m in modifications if m.__class__ not in (F.AddRecipient, F.DeleteRecipient)]
        if not body_or_header:
            return size
        new = rewrite(self.spool, stuffed, body_or_header, self.spool_directory)
        self.spool.remove()
        self.spool = new
        return new.message_size

    # -- delivery ---------------------------------------------------------------------

    def _send(self, trailer):
        """Stream the spool to the server, then ``trailer``; the client leg stays paused meanwhile."""
        leg = self.leg
        server = leg.server
        spool, self.spool = self.spool, None
        if server is None or spool is None:
            if spool is not None:
                spool.remove()
            return
        transport = server.transport
        if spool.size <= WHOLE_SEND:
            # A small message goes out at once: straight from the file
            # when the connection is idle, else in one write; no producer
            # swap, no reactor turn per piece.
            size, trailer = spool.size, trailer or b""
            try:
                if trailer:
                    spool.place_after(trailer)  # the end of data leaves in the same sendfile
                sent = send_file(transport, spool.fileno(), size + len(trailer))
                pieces = unsent(spool, trailer, sent)
            except OSError as e:
                log.error("spool read failed: {why}", why=os.strerror(e.errno or errno.EIO))
                spool.remove()
                transport.abortConnection()
                return
            spool.remove()
            if pieces:
                write_sequence(transport, pieces)
            return
        transport.unregisterProducer()
        sender = _SpoolSender(spool, transport, trailer)
        transport.registerProducer(sender, False)

        def done():
            spool.remove()
            if leg.server is server and not leg._server_gone:
                transport.unregisterProducer()
                transport.registerProducer(leg, True)

        sender.done = done
        sender.resumeProducing()


def _advance(clock, steps, done, value=None, failed=None):
    """Run the chain generator ``steps`` until it returns, then call ``done(result, None)``.

    Each step it yields is ``(config, method, args)``: the filter's
    ``method(*args)``.  A plain answer is sent straight back (no Deferred
    for a filter that answers at once, such as the content rules); a
    Deferred is waited for under ``config.timeout`` on ``clock``.  A method
    that raises, fails or times out is thrown back into the generator as
    `_Failed`.  When the generator itself raises, ``done(None, failure)``.
    """
    while True:
        try:
            step = steps.throw(failed) if failed is not None else steps.send(value)
        except StopIteration as stop:
            done(stop.value, None)
            return
        except Exception:
            done(None, Failure())
            return
        config, method, args = step
        value = failed = None
        try:
            answer = method(*args)
        except Exception as e:
            failed = _Failed(_raised(e))
            continue
        if not isinstance(answer, defer.Deferred):
            value = answer
            continue
        answer.addTimeout(config.timeout, clock)

        def answered(result):
            _advance(clock, steps, done, result)

        def not_answered(failure, config=config):
            if failure.check(defer.TimeoutError, defer.CancelledError):
                why = _Failed("no answer within %g s" % config.timeout)
            elif failure.check(_Failed):
                why = failure.value
            else:
                why = _Failed("failed: %s" % failure.getErrorMessage())
            _advance(clock, steps, done, failed=why)

        answer.addCallbacks(answered, not_answered)
        return


class _SpoolSender:
    """A pull producer writing a spool file to the server transport, then a trailer.

    The spool file is given back (`SpoolFile.remove`) however the sending
    ends: done, a read error, or the server leg gone.
    """

    def __init__(self, spool, transport, trailer):
        self.spool = spool
        self.pieces = spool.pieces()
        self.transport = transport
        self.trailer = trailer
        self.done = None
        self.finished = False

    def resumeProducing(self):
        """Write the next piece (Twisted asks again when the transport has room)."""
        if self.finished:
            return
        try:
            data = next(self.pieces)
        except StopIteration:
            self.finished = True
            if self.trailer:
                self.transport.write(self.trailer)
            done, self.done = self.done, None
            if done is not None:
                done()
            return
        except OSError as e:
            log.error("spool read failed: {why}", why=os.strerror(e.errno or errno.EIO))
            self.finished = True
            self.spool.remove()
            self.transport.abortConnection()
            return
        self.transport.write(data)

    def pauseProducing(self):
        """Not used by pull producers."""

    def stopProducing(self):
        """The server leg went away."""
        self.finished = True
        self.pieces.close()
        self.spool.remove()


class _Broken:
    """Stands for a filter that could not be built: answers its default verdict at once."""

    def __init__(self, verdict):
        self.verdict = verdict

    def envelopeFrom(self, session, sender, parameters):
        return _envelope_default(self.verdict)

    def envelopeRecipient(self, recipient, parameters):
        return _envelope_default(self.verdict)

    def serverReply(self, command, code, text):
        return None

    def header(self, name, value):
        return None

    def endOfHeaders(self):
        return None

    def body(self, chunk):
        return None

    def endOfMessage(self):
        return self.verdict

    def abort(self):
        return None

    def close(self):
        return None


def _envelope_default(verdict):
    """A default verdict as an envelope step answers it (accept means continue)."""
    return F.Verdict.CONTINUE if verdict.action == F.ACCEPT else verdict


def _checked(answer, allowed, default):
    """``answer`` as a `Verdict` allowed at this step; `_Failed` otherwise."""
    if answer is None:
        return F.Verdict(default)
    if not isinstance(answer, F.Verdict):
        raise _Failed("answered %r, not a Verdict" % (answer,))
    if answer.action not in allowed:
        raise _Failed("answered %s where it is not allowed" % answer.action)
    return answer
