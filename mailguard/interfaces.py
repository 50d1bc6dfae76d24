"""The public contract between mailguard and its inspectors (zope.interface).

An inspector plugs in as an `IInspectorFactory` (one per protocol name, e.g.
``esmtp``); for every accepted connection it builds an `IInspector`, the
sans-IO core of that session: bytes in from either peer, events out
(`mailguard.events`).  The Twisted shell carries the events out and never
looks inside the protocol.

Factories are found with ``twisted.plugin``: a factory is an object that
provides both ``twisted.plugin.IPlugin`` and `IInspectorFactory`, bound to
a name in a module of the ``mailguard.plugins`` package (or of
``twisted.plugins``).  The built-in protocols are registered that way too
(``mailguard/plugins/mailguard_builtin.py``).  See
``docs/writing-an-inspector.md``.
"""

from zope.interface import Attribute, Interface


class IInspectorFactory(Interface):
    """Builds the per-session inspectors of one protocol, and validates its rule keys.

    A provider is created once, when its plugin module is imported, and is
    shared by every rule and session: it must hold no per-session state.
    Importing its module must stay cheap and must not import
    ``twisted.internet.reactor`` (``twistd -r`` could no longer choose one).
    """

    name = Attribute(
        """The protocol name a policy selects with ``protocol = NAME``.

        Lower case letters, digits, ``-``, ``_`` or ``.``; unique among the
        installed plugins (two providers of one name stop the gateway at
        start-up).
        """
    )

    options = Attribute(
        """The rule keys this protocol adds to ``[inspect NAME]``.

        A mapping of each key (lower case, e.g. ``secure-login``) to its
        default, written as INI text (e.g. ``"off"``).  The default is parsed
        by `validateOption` like a written value, so every key is always
        present in ``rule.options``.  Keys the core already knows (see
        ``mailguard.policy.INSPECT_KEYS``) cannot be redefined.  An empty
        mapping when the protocol adds none.
        """
    )

    def validateOption(key, value):
        """Parse the INI text ``value`` of the rule key ``key`` (one of `options`).

        Return the parsed value: an immutable object (a string, a number, a
        frozenset, ...), which the policy stores in ``rule.options[key]``.
        Raise ``ValueError`` when ``value`` is not acceptable; its text says
        what was expected, on one line (e.g. ``"expected on or off"``), and
        the policy reports it as
        ``PATH: [inspect NAME] KEY: bad value 'VALUE': TEXT``.  Called while
        the policy is loaded (start-up, ``mailguard check``), never per
        session.
        """

    def buildInspector(rule):
        """Return a new `IInspector` for one session under ``rule``.

        ``rule`` is the immutable `mailguard.policy.Rule` of the listener
        that accepted the connection; the protocol's own keys are in
        ``rule.options``.  A ``Rule`` built by hand (in tests) may have an
        empty ``options``: fall back to the defaults.  Must be cheap: it
        runs per connection.
        """

    def refusalReply(reason):
        """The bytes the gateway writes to a client whose session it refuses, before closing.

        A refused session never reaches the protocol's dialogue, so these
        are the first and last bytes the client gets: write them as the
        protocol's own "go away" greeting (SMTP ``421 4.7.0 ...``, POP3
        ``-ERR ...``, IMAP ``* BYE ...``), or return ``b""`` to close
        without a word (a byte relay).  ``reason`` is one of:

        - ``"overload"``: the session tracker refused the connection (a
          ``[global]`` threshold, ``max-incomplete-host`` or a blocked
          host); no inspector is built for it;
        - ``"unreachable"``: the backend could not be reached within
          ``synwait-time``; the session's inspector saw nothing from the
          server.

        Return ``b""`` for a reason you do not know (more may be added).
        Called once per listener and reason, when the listener is set up,
        never per connection.  Optional: a factory without it gets
        ``b""`` (the connection is closed without a word), never another
        protocol's words.
        """


class IInspector(Interface):
    """The sans-IO core of one inspected session.

    Every method returns a list of `mailguard.events` values, in the order
    they must be carried out: `ToServer`/`ToClient` bytes, `Alert`,
    `Greeted` (the session is established: the tracker's synwait timer
    stops), `AbortServer`, `Close`.  No method may raise for any input a peer
    can send: bad input becomes a reply to the client and/or a `Close`
    event.  Nothing here may block, sleep, or touch sockets or clocks.

    The shell also calls ``client_tls_ready()`` when a session arrives on a
    TLS listener (``ssl:``) and after a `StartTLS` event, and
    ``server_tls_ready()`` after ``StartTLS("server")``; an inspector that
    may run behind an ``ssl:`` listener provides ``client_tls_ready`` (it
    may simply return ``[]``).

    The shell sets ``trace``, ``xclient`` and ``peer`` (below) after
    building the inspector and before its first method call; an inspector
    that has no use for them still accepts them (class attributes with
    their defaults will do).  It reads, when present, ``verbs`` (a
    ``collections.Counter`` of the accepted verbs, for the metrics) and
    calls ``awaiting_replies()`` (true while the client is owed replies,
    so that a client that half-closes still gets them).
    """

    phase = Attribute("A short name of the current state, for the session table.")
    commands = Attribute("How many commands (or requests) the client has issued.")

    trace = Attribute(
        """Emit a `mailguard.events.Trace` per command and reply (default false).

        Set to true by the shell when ``debug = smtp`` is on.  Traces carry
        the verb, the length, the state and the reply code, never arguments,
        credentials or message data.
        """
    )

    xclient = Attribute(
        """Announce the real client to the backend with XCLIENT when it offers it (default false).

        Set to true by the shell for a listener with ``xclient = on``; a
        protocol without such a command ignores it.
        """
    )

    peer = Attribute(
        """The real client's ``(host, port)``, or None (the default).

        Set by the shell when ``xclient`` is true, from the client leg's
        address (the one a PROXY header named, behind ``haproxy:``).
        """
    )

    def server_connected():
        """The backend connection is up; return events (e.g. bytes to send first).

        Return `Greeted` here when the protocol has no server greeting;
        otherwise return it when the greeting is relayed.
        """

    def client_data(data):
        """Inspect ``data`` (bytes, any segmentation) received from the client.

        Return what to forward, answer or log.  Bytes received before
        `server_connected` are the client talking first.
        """

    def server_data(data):
        """Inspect ``data`` (bytes, any segmentation) received from the backend."""

    def server_lost():
        """The backend closed; return what the client must be told (and `Close`)."""

    def client_lost():
        """The client closed; return how the backend leg should end.

        `AbortServer` drops it without a clean end (a half-sent message must
        not complete); otherwise it is closed normally.
        """

    def in_message():
        """True while a message (or any data unit) is partly forwarded to the backend.

        The shell then aborts the backend leg instead of writing to it when
        it ends the session on a timer.
        """

    def client_tls_ready():
        """The client leg is now TLS (``ssl:`` listener, or after ``StartTLS("client")``)."""

    def server_tls_ready():
        """The backend leg is now TLS (after ``StartTLS("server")``)."""

    def timeout_reply(reason):
        """What to tell the client and the server when the tracker ends the session.

        ``reason`` is ``"idle_timeout"`` or ``"synwait_timeout"``.  Return
        ``(bytes for the client, bytes for the server)`` in the protocol's
        own language (e.g. ``421 4.4.2 ...`` and ``QUIT``); either may be
        ``b""``.
        """


# -- message filters -------------------------------------------------------------


class IMessageFilterFactory(Interface):
    """Builds the per-session filters of one kind, and validates its section keys.

    A message filter looks at the envelope and the message before the
    server sees them, and decides: see `IMessageFilter`.  Content rules
    (``match``), milters (``milters``) and third-party filters (``filters``)
    are all message filters.  Third-party factories are found with
    ``twisted.plugin`` exactly like inspector factories: an object providing
    ``twisted.plugin.IPlugin`` and this interface, bound to a name in a
    module of ``mailguard.plugins`` or ``twisted.plugins``.  A policy selects
    one with ``[filter NAME]`` / ``plugin = <name>``.  Importing the module
    must stay cheap and must not import ``twisted.internet.reactor``.
    """

    name = Attribute(
        """The name a ``[filter NAME]`` section selects with ``plugin = NAME``.

        Lower case letters, digits, ``-``, ``_`` or ``.``; unique among the
        installed filter plugins.
        """
    )

    options = Attribute(
        """The section keys this filter adds to ``[filter NAME]``: a mapping of
        each key (lower case) to its default as INI text, parsed by
        `validateOption` like a written value, or to ``None`` for a key that
        must be given.  ``plugin``, ``timeout`` and ``default-action`` are the
        core's and cannot be redefined.
        """
    )

    def validateOption(key, value):
        """Parse the INI text ``value`` of ``key`` (one of `options`).

        Return an immutable value, stored in ``FilterConfig.options[key]``;
        raise ``ValueError`` with a one-line text saying what was expected.
        Called when the policy is loaded, never per session.
        """

    def buildFilter(config, session):
        """Return a new `IMessageFilter` for one client session.

        ``config`` is the frozen `mailguard.filters.FilterConfig` of the
        section; ``session`` the `mailguard.filters.SessionFacts` known when
        the session's first transaction begins.  Called lazily (at the
        session's first ``MAIL``), so idle sessions cost nothing; must not
        block.
        """


class IMessageFilter(Interface):
    """One filter's view of one client session, called in the session's order.

    Every method may return its answer directly or as a ``Deferred`` firing
    with it (a network scanner); the gateway waits, under the section's
    ``timeout``, and applies its ``default-action`` when the answer does not
    come, or when the method raises or the Deferred fails.  Answers are
    `mailguard.filters.Verdict` values.

    The gateway promises: ``envelopeFrom`` and ``envelopeRecipient`` are
    called *before* the command is forwarded, and later client commands
    wait until the answer; the message is given to the filter whole (from
    the gateway's private spool) before any part of it reaches the server,
    and nothing the filter does not accept is ever delivered.  After a
    refusal the client's session goes on.
    """

    def envelopeFrom(session, sender, parameters):
        """``MAIL FROM:<sender> parameters`` arrived (``sender`` and ``parameters`` are bytes).

        ``session`` is the `mailguard.filters.SessionFacts` at this point
        (client address, HELO name, TLS on each leg, AUTH identity).  Answer
        `Verdict.CONTINUE`, or a reject / tempfail (with the reply the client
        gets), or drop.  A new transaction: whatever the filter knew of the
        previous one is over.
        """

    def envelopeRecipient(recipient, parameters):
        """``RCPT TO:<recipient> parameters`` arrived; answer as `envelopeFrom`."""

    def serverReply(command, code, text):
        """The server answered ``command`` (``b"MAIL"`` or ``b"RCPT"``) with ``code`` and ``text``.

        A notification: the return value is ignored.  Not called for a
        command the filters refused (it never reached the server).
        """

    def header(name, value):
        """One header field of the message: ``name`` without the colon, ``value`` after it.

        Both bytes as they stand in the message: ``value`` keeps its leading
        white space and its folding (CRLF inside); no line end at its end.
        Return ``None`` to go on, or a final `Verdict` to decide now (the rest
        of the message is then not given to this filter).
        """

    def endOfHeaders():
        """The header block is over; ``None`` to go on, or a final `Verdict`."""

    def body(chunk):
        """A piece of the body (bytes, CRLF line ends, at most 64 KiB); ``None`` or a final `Verdict`."""

    def endOfMessage():
        """The message is whole: answer its final `Verdict`.

        ``Verdict.ACCEPT`` may carry modifications (header changes, a new
        body, recipients added or removed), applied to what the server
        receives.
        """

    def abort():
        """The current transaction ended without a message verdict (RSET, a refusal, a new MAIL)."""

    def close():
        """The session is over; release what the filter holds (connections, files)."""


class IInlineMessageFilter(IMessageFilter):
    """A message filter that reads the message as it arrives and answers at once (the content rules).

    Instead of ``header``, ``endOfHeaders`` and ``body`` from the spool
    after the message is whole, the gateway calls ``messageData`` with each
    piece of the message while it is being spooled; ``endOfMessage`` then
    answers without waiting.  Nothing changes for the server: the message
    still reaches it only once every filter of the chain has accepted, and
    the verdicts are still taken in the chain's order.  It saves reading
    the spool back for a filter that needs no network.
    """

    def messageData(data):
        """The next octets of the message as the server would store them (dot stuffing undone, CRLF line ends)."""
