"""The gateway's log lines: the three formats, IOS severities, the alert rate limit, MESSAGE facts.

Everything mailguard logs is a structured ``twisted.logger`` event; this
module decides how the events look where the operator reads them.

- **Formats** (``[global] log-format``): ``text`` is twistd's own classic
  line (timestamp, ``[namespace#level]``, text); ``json`` writes each event
  as one JSON object on one line, with its tag, session id and fields as
  keys; ``ios`` begins each tagged line ``%FW-<severity>-<TAG>:`` (untagged
  lines ``%SYS-<severity>-LOG:``), with no timestamp, for syslog or journald
  to add one.  `log_observer` builds the observer for the destination
  twistd was given (``--logfile``, stdout with ``-n``, ``--syslog``); an
  explicit ``--logger`` wins over all of this (twistd asks the application
  for an observer only when none was named).
- **Severities**: `TAGS` maps every tag mailguard logs to its IOS severity
  (0 emergency ... 7 debug) and says whether it is an alert (rate-limited).
- **Rate limit**: `AlertLimiter` lets at most `ALERT_LIMIT` lines per tag
  and client host through per `ALERT_WINDOW` seconds, then counts what it
  drops, so one ``ALERTS_SUPPRESSED`` line can say how many.
- **Workers**: a worker writes every event as a JSON line to a pipe
  (`forwarding_observer`); the supervisor reads them (`EventReader`) and
  publishes them to its own observers, so they reach its log destination.
- **MESSAGE facts**: `queue_id` finds the server's queue id in its reply
  to the end of data; `tls_of` names a leg's TLS protocol and cipher.
"""

import json
import os
import re
import sys
import threading
import time

from twisted.logger import FileLogObserver, ILogObserver, LogLevel, formatEvent, formatEventAsClassicLogText, formatTime
from twisted.python import logfile
from zope.interface import implementer

#: The values ``[global] log-format`` accepts.
FORMATS = ("text", "json", "ios")

#: Most alert lines per tag and client host in one window.
ALERT_LIMIT = 10
#: The window of the alert rate limit, in seconds.
ALERT_WINDOW = 60

#: Every tag mailguard logs: ``tag -> (IOS severity, alert?, what it means)``.
#: Alerts are rate-limited; the audit trail, MESSAGE lines and traces never are.
TAGS = {
    "SESS_AUDIT_TRAIL_START": (6, False, "A session started (audit-trail)."),
    "SESS_AUDIT_TRAIL": (6, False, "A session ended: bytes each way, duration (audit-trail)."),
    "MESSAGE": (6, False, "One message: sender, recipients, size, TLS of each leg, outcome, the server's queue id."),
    "SMTP_TRACE": (7, False, "One command or reply (debug smtp)."),
    "SESSION_CLEARED": (5, False, "An operator closed a session (mailguard clear session)."),
    "DEBUG_CHANGED": (5, False, "An operator switched a debug trace (mailguard debug)."),
    "ALERTS_SUPPRESSED": (4, False, "How many alerts of one tag and host the rate limit dropped."),
    "SMTP_INVALID_COMMAND": (4, True, "An illegal command, x-ed out (or an invalid SASL response)."),
    "SMTP_SYNC_ERROR": (4, True, "A command sent before the reply it had to wait for."),
    "SMTP_LINE_TOO_LONG": (4, True, "A command line over max-command-line."),
    "SMTP_BARE_NEWLINE": (4, True, "A bare CR or LF in a command or in message data."),
    "SMTP_MAX_DATA": (4, True, "A message (or its declared SIZE) over max-data."),
    "SMTP_MAX_RECIPIENTS": (4, True, "More recipients than max-recipients."),
    "SMTP_INVALID_REPLY": (4, True, "A server reply that is not valid SMTP; the session is closed."),
    "NON_SMTP_COMMAND": (4, True, "An HTTP, proxy or header line from a client; the session is closed."),
    "PREGREET": (4, True, "A client that talked before the greeting."),
    "STARTTLS_INJECTION": (3, True, "Plaintext pipelined after STARTTLS (either side); the session is closed."),
    "TLS_PASSTHROUGH": (5, True, "STARTTLS passed through: the rest of the session is not inspected."),
    "EHLO_KEYWORD_REMOVED": (6, True, "An ESMTP keyword removed from the EHLO reply (once per session)."),
    "XCLIENT_REFUSED": (4, True, "The mail server refused the gateway's XCLIENT."),
    "BACKEND_UNREACHABLE": (4, True, "The mail server could not be reached; the client got 421."),
    "BACKEND_TLS_FAILED": (3, True, "TLS to the mail server, or its certificate check, failed."),
    "BACKEND_TLS_MISSING": (3, True, "The mail server did not offer STARTTLS under backend-tls = required."),
    "POP3_INVALID_COMMAND": (4, True, "An illegal POP3 command, answered -ERR."),
    "POP3_SYNC_ERROR": (4, True, "POP3 data sent while an AUTH exchange was in progress."),
    "POP3_INVALID_RESPONSE": (4, True, "A server line that is not a POP3 response."),
    "IMAP_INVALID_COMMAND": (4, True, "An illegal IMAP command, answered BAD."),
    "IMAP_SYNC_ERROR": (4, True, "IMAP literal data sent before the server's continuation."),
    "IMAP_INVALID_RESPONSE": (4, True, "A server line that is not an IMAP response."),
    "ALERT_ON": (4, True, "Too many half-open sessions or new sessions per minute: getting aggressive."),
    "ALERT_OFF": (6, True, "Below the low thresholds again: calming down."),
    "HOST_TCP_ALERT_ON": (4, True, "A host reached max-incomplete-host."),
    "BLOCK_HOST": (2, True, "A host is refused for block-time minutes."),
    "UNBLOCK_HOST": (4, True, "A blocked host is admitted again."),
    "WORKER_EXITED": (3, True, "A worker process ended; it is started again."),
    "SMTP_POLICY_MATCH": (4, True, "A content rule ([match NAME]) fired: match, action, client, criterion."),
    "POLICY_RELOADED": (5, False, "The policy was reloaded (SIGHUP or mailguard reload); new sessions use it."),
    "POLICY_RELOAD_FAILED": (3, False, "A reload was refused (the line says why); the old policy goes on serving."),
    "SUPERVISOR_LOST": (3, False, "A worker lost its supervisor: it drains its sessions and exits."),
    "FILTER_REFUSED": (4, True, "A message filter refused a MAIL or RCPT; it never reached the server."),
    "FILTER_DROP": (4, True, "A message filter dropped the session (421)."),
    "FILTER_RESET": (4, True, "A message filter reset the session (TCP RST)."),
    "FILTER_FAILED": (3, True, "A message filter was down, too slow or broken; its default-action applied."),
    "MILTER_FAILED": (3, True, "A milter was down, too slow or broke the protocol; its default-action applied."),
    "FILTER_DELIVERY_REFUSED": (4, True, "The server refused a recipient (or MAIL) while the gateway delivered an approved message."),
    "MESSAGE_REFUSED": (5, True, "A message filter refused a message; nothing of it reached the server."),
    "MESSAGE_DISCARDED": (5, True, "A message filter discarded a message: the client got 250, nothing was delivered."),
    "MESSAGE_QUARANTINED": (5, True, "A message filter quarantined a message: the client got 250, it was kept in the quarantine Maildir."),
}

# Levels of untagged events (and of tags not in the table) as IOS severities.
_LEVEL_SEVERITY = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


def severity(event):
    """The IOS severity (0-7) of a log event: its tag's, else its level's."""
    known = TAGS.get(event.get("tag"))
    if known is not None:
        return known[0]
    return _LEVEL_SEVERITY.get(event.get("log_level"), 6)


def is_alert(tag, level=LogLevel.warn):
    """Whether events of ``tag`` are alerts (rate-limited): per the table, else warnings and worse."""
    known = TAGS.get(tag)
    if known is not None:
        return known[1]
    return level is not None and level >= LogLevel.warn


# -- the three formats ---------------------------------------------------------------


def _message(event):
    """``(tag, text)`` of an event: its formatted text without the leading ``TAG:`` it repeats."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text += "\n" + failure.getTraceback().rstrip("\n")
        except Exception:  # a failure restored from JSON may lack its frames
            text += "\n" + str(getattr(failure, "value", failure))
    tag = event.get("tag")
    if tag is not None:
        tag = str(tag)
        if text.startswith(tag + ": "):
            text = text[len(tag) + 2 :]
    return tag, text


def format_text(event):
    """twistd's classic line: ``TIME [namespace#level] text``.

    An event whose whole text is its ``line`` field (the ``MESSAGE`` line,
    one per message) is put together here, with the timestamp's text kept
    for the second it names: the same characters as Twisted's
    `formatEventAsClassicLogText`, without its ``str.format`` passes and a
    ``strftime`` per line (about 20 us of a 1 KB message's budget).
    """
    if event.get("log_format") == "{line}":
        line = event.get("line")
        level = event.get("log_level")
        if (line.__class__ is str and line and level is not None and "log_failure" not in event
                and "log_system" not in event and "log_flattened" not in event):
            return "%s [%s#%s] %s\n" % (
                _time_text(event.get("log_time")), event.get("log_namespace", "-"), level.name,
                line.replace("\n", "\n\t"))
    return formatEventAsClassicLogText(event)


def emit_info(logger, event):
    """``logger.info("{line}", **event)``, the same event, without `Logger.emit`'s per-call checks.

    ``event`` (a fresh dict: it becomes the event) must hold ``line``; its
    fields keep their order, as keyword arguments would.  For lines logged
    once per message, where ``emit``'s level lookup and keyword copying show.
    """
    event["log_logger"] = logger
    event["log_level"] = LogLevel.info
    event["log_namespace"] = logger.namespace
    event["log_source"] = logger.source
    event["log_format"] = "{line}"
    event["log_time"] = time.time()
    logger.observer(event)


_last_stamp = [None, "-"]  # [the second, its text] of the last timestamp `_time_text` formatted


def _time_text(when):
    """`twisted.logger.formatTime` of ``when``, formatted once per second."""
    if when is None:
        return "-"
    second = int(when)
    if when - second >= 0.999:
        # fromtimestamp rounds to microseconds: this close to the next
        # second the text may name either, so ask Twisted.
        return formatTime(when)
    stamp = _last_stamp
    if stamp[0] != second:
        stamp[1] = formatTime(second)
        stamp[0] = second
    return stamp[1]


def format_ios(event):
    """``%FW-<severity>-<TAG>: text`` (untagged: ``%SYS-<severity>-LOG: text``), no timestamp."""
    tag, text = _message(event)
    sev = severity(event)
    if tag is None:
        head = "%%SYS-%d-LOG: " % sev
    else:
        head = "%%FW-%d-%s: " % (sev, re.sub(r"[^A-Z0-9_]", "_", tag.upper()))
    # Continuation lines (a traceback) stay visibly attached to their line.
    return head + text.replace("\n", "\n\t") + "\n"


def _plain(value):
    """A JSON-safe rendering of one event field."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


_LEGACY_KEYS = frozenset(("message", "isError", "system", "format", "why", "failure"))


def format_json(event):
    """One JSON object on one line: time, level, severity, namespace, tag, text, then every field."""
    tag, text = _message(event)
    when = event.get("log_time")
    if when is None:
        when = time.time()
    out = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + ".%06dZ" % int((when % 1) * 1e6),
        "level": getattr(event.get("log_level"), "name", "info"),
        "severity": severity(event),
        "namespace": event.get("log_namespace", "-"),
    }
    if tag is not None:
        out["tag"] = tag
    out["text"] = text
    legacy = out["namespace"] == "log_legacy"
    for key, value in event.items():
        if legacy and key in _LEGACY_KEYS:
            continue  # twisted.python.log's own bookkeeping: the text says it all
        if not key.startswith("log_") and key not in out:
            out[key] = _plain(value)
    return json.dumps(out, ensure_ascii=False) + "\n"


FORMATTERS = {"text": format_text, "json": format_json, "ios": format_ios}


# -- the alert rate limit ---------------------------------------------------------------


class AlertLimiter:
    """At most ``limit`` alerts per (tag, host) per ``window`` seconds; counts the rest.

    Pure: the caller passes the time.  A window starts with the first alert of
    its (tag, host); alerts past the limit inside it are dropped and counted.
    `due` hands back the counts of the windows that have ended, once each,
    for the caller to log as ``ALERTS_SUPPRESSED``; `flush` hands back all
    of them (the gateway is stopping).  Memory stays bounded: windows that
    ended without a drop are forgotten once they outnumber `MAX_WINDOWS`.
    """

    MAX_WINDOWS = 10000

    __slots__ = ("limit", "window", "_windows")

    def __init__(self, limit=ALERT_LIMIT, window=ALERT_WINDOW):
        self.limit = limit
        self.window = window
        self._windows = {}  # (tag, host) -> [start, lines, dropped]

    def allow(self, tag, host, now):
        """Count one alert of ``tag`` from ``host`` at ``now``; True when it may be logged."""
        key = (tag, host)
        entry = self._windows.get(key)
        if entry is None or now >= entry[0] + self.window:
            if entry is not None and entry[2]:
                # Ended with drops not yet reported: keep them for `due`.
                return self._restart_after_report(key, entry, now)
            if entry is None and len(self._windows) >= self.MAX_WINDOWS:
                self._forget(now)
            self._windows[key] = [now, 1, 0]
            return True
        if entry[1] < self.limit:
            entry[1] += 1
            return True
        entry[2] += 1
        return False

    def _restart_after_report(self, key, entry, now):
        # The old window's count is reported by `due` under a fresh key.
        self._windows[(key, entry[0])] = entry
        self._windows[key] = [now, 1, 0]
        return True

    def _forget(self, now):
        for key, entry in list(self._windows.items()):
            if now >= entry[0] + self.window and not entry[2]:
                del self._windows[key]

    def next_due(self):
        """When the earliest window holding drops ends, or None."""
        ends = [entry[0] + self.window for entry in self._windows.values() if entry[2]]
        return min(ends) if ends else None

    def due(self, now):
        """``[(tag, host, dropped)]`` for every window that has ended with drops; each reported once."""
        out = []
        for key, entry in list(self._windows.items()):
            if entry[2] and now >= entry[0] + self.window:
                tag, host = key if isinstance(key[0], str) else key[0]
                out.append((tag, host, entry[2]))
                del self._windows[key]
        return out

    def flush(self):
        """``[(tag, host, dropped)]`` for every window holding drops, ended or not; all forgotten."""
        out = []
        for key, entry in self._windows.items():
            if entry[2]:
                tag, host = key if isinstance(key[0], str) else key[0]
                out.append((tag, host, entry[2]))
        self._windows.clear()
        return out


# -- MESSAGE facts -------------------------------------------------------------------

#: How mail servers name the queue id in their reply to the end of data:
#: ``(server, pattern)``, tried in order; group 1 is the id.
QUEUE_ID_SHAPES = (
    # Postfix "250 2.0.0 Ok: queued as 4ZxY1r2Ab3z1"; the embedded backend
    # ("... queued as <maildir key>") and Postfix's smtp-sink say the same.
    ("postfix", re.compile(r"\bqueued as ([^\s,;]+)", re.I)),
    # Exim "250 OK id=1tQ4Zb-0001Ab-3C".
    ("exim", re.compile(r"\bid=([A-Za-z0-9][A-Za-z0-9-]*)")),
    # Exchange "250 2.6.0 <mid@host> [InternalId=123, Hostname=EX1] Queued mail for delivery".
    ("exchange", re.compile(r"\[InternalId=(\d+)[,\]].*Queued mail for delivery", re.I)),
    ("exchange", re.compile(r"^\d{3}[ -](?:\d\.\d{1,3}\.\d{1,3} )?(<[^>\s]+>).*Queued mail for delivery", re.I)),
    # Sendmail (and OpenSMTPD) "250 2.0.0 5B2CKnqX012345 Message accepted for delivery".
    ("sendmail", re.compile(r"^\d{3}[ -](?:\d\.\d{1,3}\.\d{1,3} )?(\S+) Message accepted for delivery", re.I)),
)


def reply_text(raw, limit=300):
    """A reply's bytes as one printable line (lines joined with `` / ``), at most ``limit`` characters."""
    if raw.__class__ is bytes and raw[-2:] == b"\r\n" and raw.find(b"\n") == len(raw) - 1:
        # One CRLF-ended line, as most replies are.
        text = raw[:-2].decode("utf-8", "replace")
        if text and len(text) <= limit and "\r" not in text and text.isprintable():
            return text
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    lines = [line for line in raw.replace("\r", "").split("\n") if line]
    text = " / ".join(lines)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def queue_id(reply):
    """The queue id a server's reply names, or None.

    ``reply`` is the reply (bytes or text) to an end of data or a ``BDAT
    ... LAST``.  The shapes of `QUEUE_ID_SHAPES` are tried in order on its
    last line; None means the reply names no id the table knows (the
    MESSAGE line then carries the reply text alone).
    """
    return queue_id_of_text(reply_text(reply, limit=10000))


def queue_id_of_text(text):
    """`queue_id` of a reply already made one line by `reply_text`."""
    if not text:
        return None
    last = text.rsplit(" / ", 1)[-1]
    for _server, pattern in QUEUE_ID_SHAPES:
        m = pattern.search(last)
        if m is not None:
            return m.group(1)
    return None


def tls_of(transport):
    """``"TLSv1.3/TLS_AES_256_GCM_SHA384"`` for a leg's transport using TLS, else None."""
    seen = 0
    while transport is not None and seen < 4:
        seen += 1
        if getattr(transport, "TLS", False):
            tls = getattr(transport, "protocol", None)
            connection = getattr(tls, "_tlsConnection", None)
            if connection is None:
                return None
            try:
                version, cipher = connection.get_protocol_version_name(), connection.get_cipher_name()
            except Exception:  # the connection is being torn down
                return None
            if not cipher:
                return None
            return "%s/%s" % (version, cipher)
        # A wrapper (the PROXY header reader) holds the real transport.
        transport = getattr(transport, "transport", None)
    return None


def unix_path(description):
    """The socket path of a ``unix:`` endpoint description, or None for any other kind."""
    kind, _, rest = description.partition(":")
    if kind.lower() != "unix" or not rest:
        return None
    words = re.split(r"(?<!\\):", rest)
    path = None
    for word in words:
        key, eq, value = word.partition("=")
        if eq and key == "address":
            path = value
        elif not eq and path is None:
            path = word
    return path.replace("\\:", ":") if path else None


# -- the log destination -------------------------------------------------------------


class LogFile(logfile.LogFile):
    """twistd's log file, appended to (``O_APPEND``), that logrotate can move away.

    On SIGUSR1 it rotates itself as twistd does (``twistd.log`` ->
    ``twistd.log.1``), unless the file was moved away or replaced since it
    was opened (logrotate's ``create``): then it just reopens its path.
    """

    def __init__(self, *args, **kwargs):
        # Twisted serialises write() and rotate() with a pure-Python RLock
        # it creates on first use; this C one is taken in its place, by
        # both (threadable looks for it here).
        self.__dict__["_threadable_lock"] = threading.RLock()
        super().__init__(*args, **kwargs)

    def write(self, data):
        """Append ``data`` (rotating first when the file is full), as twistd's `LogFile` does.

        The same lock as Twisted's, taken directly: a MESSAGE line per
        message made its three Python-level lock calls show.
        """
        with self._threadable_lock:
            logfile.BaseLogFile.write(self, data)
            self.size += len(data)

    def _openFile(self):
        self.closed = False
        if os.path.exists(self.path):
            self._file = open(self.path, "ab", 0)
        else:
            if self.defaultMode is not None:
                old = os.umask(0o777)
                try:
                    self._file = open(self.path, "ab", 0)
                finally:
                    os.umask(old)
                os.chmod(self.path, self.defaultMode)
            else:
                self._file = open(self.path, "ab", 0)
        self._file.seek(0, os.SEEK_END)
        self.size = self._file.tell()

    def moved(self):
        """True when the path no longer names the file being written."""
        try:
            path = os.stat(self.path)
        except OSError:
            return True
        mine = os.fstat(self._file.fileno())
        return (path.st_dev, path.st_ino) != (mine.st_dev, mine.st_ino)

    def rotate_or_reopen(self):
        """SIGUSR1: reopen a file logrotate moved away; otherwise rotate as twistd does."""
        if self.moved():
            self.reopen()
        else:
            self.rotate()


def _hook_sigusr1(log_file):
    import signal

    def handler(signum, frame):
        from twisted.internet import reactor

        reactor.callFromThread(log_file.rotate_or_reopen)

    signal.signal(signal.SIGUSR1, handler)


class SyslogObserver:
    """Writes each formatted line to syslog, with the event's IOS severity as its priority."""

    def __init__(self, prefix, formatter):
        import syslog

        self._syslog = syslog
        self.formatter = formatter
        syslog.openlog(prefix or "mailguard", syslog.LOG_PID, syslog.LOG_DAEMON)

    def __call__(self, event):
        """Format and send one event."""
        text = self.formatter(event)
        if not text:
            return
        priority = self._syslog.LOG_DAEMON | severity(event)
        for line in text.rstrip("\n").split("\n"):
            self._syslog.syslog(priority, line)


def log_observer(log_format, twistd_options, rotate_size=1000000):
    """The observer writing ``log_format`` lines where twistd's options say, or None for twistd's own.

    ``twistd_options`` is twistd's `ServerOptions` (``logfile``,
    ``nodaemon``, ``syslog``, ``prefix``).  The destination is twistd's:
    stdout with ``-n`` and no ``--logfile`` (or ``--logfile=-``), syslog with
    ``--syslog``, else the file (default ``twistd.log``) rotated at
    ``rotate_size`` bytes (0: never) and on SIGUSR1.  Returns None where
    twistd's own observer is already what was asked (text to syslog).
    """
    from zope.interface import directlyProvides
    from twisted.logger import ILogObserver

    formatter = FORMATTERS[log_format]
    if twistd_options.get("syslog"):
        if log_format == "text":
            return None
        observer = SyslogObserver(twistd_options.get("prefix"), formatter)
        directlyProvides(observer, ILogObserver)
        return observer
    name = twistd_options.get("logfile") or ""
    nodaemon = twistd_options.get("nodaemon")
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return FileLogObserver(sys.stdout, formatter)
    log_file = LogFile.fromFullPath(name or "twistd.log", rotateLength=rotate_size or None)
    _hook_sigusr1(log_file)
    return FileLogObserver(log_file, formatter)


def use_log_format(service, log_format, twistd_options, rotate_size=1000000):
    """Make twistd log through `log_observer` when it runs ``service`` (unless ``--logger`` was given).

    twistd asks the application it builds around ``service`` for an
    ``ILogObserver`` component before it starts logging; the observer is
    attached there when ``service`` joins the application.  Returns ``service``.
    """
    if twistd_options is None or twistd_options.get("logger"):
        return service
    from twisted.logger import ILogObserver

    join = service.setServiceParent

    def setServiceParent(parent):
        if hasattr(parent, "setComponent") and parent.getComponent(ILogObserver, None) is None:
            observer = log_observer(log_format, twistd_options, rotate_size)
            if observer is not None:
                parent.setComponent(ILogObserver, observer)
        return join(parent)

    service.setServiceParent = setServiceParent
    return service


# -- workers: every event to the supervisor ----------------------------------------------


#: Fields of an event that `line_event_json` does not carry: objects of the worker (its logger and source),
#: the level (encoded apart), and formatting Twisted would redo.
_NOT_FORWARDED = frozenset({"log_logger", "log_source", "log_level", "log_flattened"})
_PLAIN = (str, int, float, bool, type(None))
_level_json = {}  # level name -> how eventAsJSON writes that level


def _encoded_level(level):
    encoded = _level_json.get(level.name)
    if encoded is None:
        from twisted.logger import eventAsJSON

        encoded = _level_json[level.name] = json.loads(eventAsJSON({"log_level": level}))["log_level"]
    return encoded


def line_event_json(event):
    """An event whose whole text is its ``line`` (`emit_info`'s, one per message) as one JSON line, or None.

    What ``eventAsJSON`` writes less what the supervisor has no use for
    (the worker's logger object, the pre-formatted copy of the fields):
    ``eventFromJSON`` reads it back to the same fields and level.  Twisted
    flattens and formats every event first, most of a 1 KB message's
    logging cost with workers.  Any other event, or one with a value JSON
    cannot hold as it is, is None: use ``eventAsJSON``.
    """
    if event.get("log_format") != "{line}" or "log_failure" in event:
        return None
    level = event.get("log_level")
    if level is None:
        return None
    fields = {}
    for key, value in event.items():
        if key in _NOT_FORWARDED:
            continue
        if not isinstance(value, _PLAIN):
            return None
        fields[key] = value
    fields["log_level"] = _encoded_level(level)
    return json.dumps(fields)  # escapes every newline


def _line_event(text):
    """The event `line_event_json` wrote as ``text``, read without Twisted's object hooks; None for any other line."""
    if not text.startswith('{"line": '):
        return None
    fields = json.loads(text)
    level = fields.get("log_level")
    if fields.get("log_format") != "{line}" or not isinstance(level, dict):
        return None
    level = getattr(LogLevel, str(level.get("name")), None)
    if not isinstance(level, type(LogLevel.info)) or fields["log_level"] != _encoded_level(level):
        return None
    fields["log_level"] = level
    return fields


def forwarding_observer(fd, fallback=None):
    """A worker's observer: each event as one JSON line on the pipe ``fd`` to the supervisor (a `LogForwarder`)."""
    return LogForwarder(fd, fallback)


@implementer(ILogObserver)
class LogForwarder:
    """A worker's observer: each event as one JSON line on the pipe ``fd`` to the supervisor.

    Once the supervisor is gone (the pipe is broken), events go to
    ``fallback`` instead (default: text lines on the inherited standard
    output), so the worker's last words (``SUPERVISOR_LOST``, its drain) are
    not lost where the operator can still see them.

    After `batch_with` (the worker's reactor), the lines of one reactor
    turn go in one write at its end: a write per line woke the supervisor
    once per message.  Outside the reactor's thread, or while it does not
    run, a line is written at once; `flush` writes what waits (the worker
    calls it once its reactor has stopped).
    """

    def __init__(self, fd, fallback=None):
        self.fd = fd
        self.fallback = fallback
        self._broken = None  # the fallback observer, once the pipe broke
        self._reactor = None
        self._pending = []  # (event, line) of this turn

    def batch_with(self, reactor):
        """Write the lines of each turn of ``reactor`` together, at its end."""
        self._reactor = reactor

    def __call__(self, event):
        if self._broken is not None:
            self._broken(event)
            return
        try:
            line = (line_event_json(event) or _event_as_json(event).replace("\n", " ")) + "\n"
            line = line.encode("utf-8")
        except Exception:
            return
        reactor = self._reactor
        if reactor is not None and reactor.running and _in_io_thread():
            self._pending.append((event, line))
            if len(self._pending) == 1:
                reactor.callLater(0, self.flush)
            return
        self._write([(event, line)])

    def flush(self):
        """Write the lines waiting for the end of the turn."""
        pending, self._pending = self._pending, []
        if pending:
            self._write(pending)

    def _write(self, entries):
        view = memoryview(b"".join(line for _, line in entries) if len(entries) > 1 else entries[0][1])
        sent = 0
        while sent < len(view):
            try:
                sent += os.write(self.fd, view[sent:])
            except InterruptedError:
                continue
            except OSError:
                self._broken = self.fallback or _stdout_observer()
                for event, line in _unsent(entries, sent):
                    self._broken(event)
                return


def _unsent(entries, sent):
    """The ``(event, line)`` entries not wholly among the first ``sent`` octets of their lines joined."""
    end = 0
    for entry in entries:
        end += len(entry[1])
        if end > sent:
            yield entry


def _event_as_json(event):
    from twisted.logger import eventAsJSON

    return eventAsJSON(event)


def _in_io_thread():
    from twisted.python import threadable

    return threadable.isInIOThread()


def _stdout_observer():
    from twisted.logger import textFileLogObserver

    return textFileLogObserver(sys.__stdout__)


class EventReader:
    """The supervisor's end of a worker's log pipe: JSON lines in, events published with ``worker``."""

    MAX_LINE = 1 << 20

    def __init__(self, worker, publish=None):
        from twisted.logger import globalLogPublisher

        self.worker = worker
        self.publish = publish or globalLogPublisher
        self._buffer = b""

    def feed(self, data):
        """Publish every whole line in ``data`` (bytes, any segmentation)."""
        from twisted.logger import eventFromJSON

        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.MAX_LINE:
            self._buffer = b""
        for line in lines:
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8", "replace")
                event = _line_event(text) or eventFromJSON(text)
            except ValueError:
                event = {"log_format": "{line}", "line": line.decode("utf-8", "replace"),
                         "log_level": LogLevel.info, "log_namespace": "mailguard", "log_time": time.time()}
            if not isinstance(event, dict):
                continue
            event.setdefault("worker", self.worker)
            level = event.get("log_level")
            if not isinstance(level, type(LogLevel.info)):
                event["log_level"] = LogLevel.info
            self.publish(event)
