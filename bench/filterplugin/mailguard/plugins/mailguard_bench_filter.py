"""The benchmark's trivial message filter ``bench-accept`` (a twisted.plugin plugin module).

It accepts every envelope command and every message, and touches each
header field and body piece on the way (it counts their octets), so a
benchmark row with it measures what the message-filter seam itself costs:
the spool, the events, the calls, the delivery from the spool.

It lives outside the ``mailguard`` package: ``bench/bench.py`` puts
``bench/filterplugin`` on the gateway's ``PYTHONPATH`` for its filter rows,
and ``mailguard.plugins`` extends its ``__path__`` over every
``mailguard/plugins`` directory on ``sys.path`` without an ``__init__.py``
(this tree ships none).  Use it in a policy with::

    [inspect BENCH]
    filters = bench

    [filter bench]
    plugin = bench-accept
"""

from types import MappingProxyType

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailguard import filters as F
from mailguard.interfaces import IMessageFilter, IMessageFilterFactory


@implementer(IPlugin, IMessageFilterFactory)
class BenchAcceptFactory:
    """The ``bench-accept`` plugin: no keys of its own."""

    name = "bench-accept"
    options = MappingProxyType({})

    def validateOption(self, key, value):
        """No keys are declared, so none reaches here."""
        raise ValueError("bench-accept has no keys")

    def buildFilter(self, config, session):
        """One `BenchAcceptFilter` per client session."""
        return BenchAcceptFilter()


@implementer(IMessageFilter)
class BenchAcceptFilter:
    """Accepts everything; counts the messages and the header and body octets it was shown."""

    def __init__(self):
        self.messages = 0
        self.octets = 0

    def envelopeFrom(self, session, sender, parameters):
        """Go on."""
        return F.Verdict.CONTINUE

    def envelopeRecipient(self, recipient, parameters):
        """Go on."""
        return F.Verdict.CONTINUE

    def serverReply(self, command, code, text):
        """Nothing to learn from the server."""

    def header(self, name, value):
        """Count the field's octets."""
        self.octets += len(name) + len(value)

    def endOfHeaders(self):
        """Nothing to decide yet."""

    def body(self, chunk):
        """Count the piece's octets."""
        self.octets += len(chunk)

    def endOfMessage(self):
        """Accept, unmodified."""
        self.messages += 1
        return F.Verdict.ACCEPT

    def abort(self):
        """Nothing held per transaction."""

    def close(self):
        """Nothing held per session."""


bench_accept = BenchAcceptFactory()
