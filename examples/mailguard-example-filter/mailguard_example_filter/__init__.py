"""An example mailguard message filter: refuse, discard or mark messages by Subject and recipient.

`ExampleFilterFactory` is the plugin (`IMessageFilterFactory`): it names the
filter, declares and validates its section keys, and builds one
`ExampleFilter` (`IMessageFilter`) per client session.  The filter sees
the envelope before the server does and the whole message before any of it
is delivered, and answers with `mailguard.filters.Verdict` values.
"""

import re
from types import MappingProxyType

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailguard import filters as F
from mailguard.interfaces import IMessageFilter, IMessageFilterFactory

_WORD = re.compile(r"[A-Za-z0-9_-]+\Z")


def _words(value):
    words = tuple(w.lower() for w in value.split())
    for word in words:
        if not _WORD.match(word):
            raise ValueError("expected words of letters, digits, '-' and '_' (%r is not one)" % word)
    return words


def _addresses(value):
    return frozenset(a.strip().lower().encode() for a in value.split(",") if a.strip())


def _header(value):
    if not value:
        return None
    name, colon, text = value.partition(":")
    if not colon or not re.fullmatch(r"[!-9;-~]+", name):
        raise ValueError("expected 'Name: value'")
    return name.encode(), b" " + text.strip().encode()


def _seconds(value):
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not 0 <= seconds <= 3600:
        raise ValueError("expected a number of seconds from 0 to 3600")
    return seconds


_KEYS = {
    "reject-subject-words": ("", _words),
    "discard-subject-words": ("", _words),
    "refuse-recipients": ("", _addresses),
    "add-header": ("", _header),
    "delay": ("0", _seconds),
}


@implementer(IPlugin, IMessageFilterFactory)
class ExampleFilterFactory:
    """The ``example-filter`` plugin."""

    name = "example-filter"
    options = MappingProxyType({key: default for key, (default, _) in _KEYS.items()})

    def validateOption(self, key, value):
        """Parse one of the section's keys (ValueError with a one-line reason)."""
        return _KEYS[key][1](value)

    def buildFilter(self, config, session):
        """One `ExampleFilter` per client session."""
        return ExampleFilter(config.options)


@implementer(IMessageFilter)
class ExampleFilter:
    """Decides on the Subject and the recipients; adds a header to what it lets through."""

    def __init__(self, options):
        self.options = options
        self.subject = b""

    def envelopeFrom(self, session, sender, parameters):
        """A new transaction: forget the previous Subject."""
        self.subject = b""
        return F.Verdict.CONTINUE

    def envelopeRecipient(self, recipient, parameters):
        """Refuse the recipients listed in ``refuse-recipients``."""
        if recipient.lower() in self.options["refuse-recipients"]:
            return F.reject(b"550 5.7.1 Recipient refused by example-filter\r\n", reason="refused recipient")
        return F.Verdict.CONTINUE

    def serverReply(self, command, code, text):
        """Nothing to learn from the server here."""

    def header(self, name, value):
        """Remember the Subject."""
        if name.lower() == b"subject":
            self.subject = value.lower()

    def endOfHeaders(self):
        """Nothing to decide yet."""

    def body(self, chunk):
        """The body does not matter to this filter."""

    def endOfMessage(self):
        """The verdict, after ``delay`` seconds when one is set."""
        verdict = self._verdict()
        delay = self.options["delay"]
        if not delay:
            return verdict
        from twisted.internet import reactor, task

        return task.deferLater(reactor, delay, lambda: verdict)

    def _verdict(self):
        words = self.subject.decode("utf-8", "replace").split()
        if any(w in words for w in self.options["reject-subject-words"]):
            return F.reject(b"550 5.7.1 Subject refused by example-filter\r\n", reason="subject")
        if any(w in words for w in self.options["discard-subject-words"]):
            return F.Verdict(F.DISCARD, reason="subject")
        header = self.options["add-header"]
        if header is None:
            return F.Verdict.ACCEPT
        return F.Verdict(F.ACCEPT, modifications=(F.AddHeader(*header),))

    def abort(self):
        """The transaction ended without a message."""
        self.subject = b""

    def close(self):
        """Nothing held."""
