"""The gateway's own dialogue with the mail server (sans-IO): its EHLO, STARTTLS, XCLIENT and RSET.

Before the client sees the server's greeting the gateway may secure its own
leg (``tls = terminate``, ``backend-tls``) and pass the real client's address
(``xclient = on``); later it sends RSET when STARTTLS resets a transaction.
The replies to these commands are never relayed.  `GatewayDialogue` is
mixed into `mailguard.smtp.SMTPInspector`; it keeps the steps of that
dialogue in one place::

    server 220 --> [EHLO] --STARTTLS offered, tls wanted--> STARTTLS --220--> (TLS) --> [EHLO]
                      \--XCLIENT offered, xclient = on--> XCLIENT --any--> greet the client
                       \--otherwise--> greet the client

Each of the gateway's commands is a queue entry marked ``GW_*``
(`mailguard.smtp_state`); `GatewayDialogue.INTERNAL_REPLIES` says what each
reply means.
"""

from mailguard.events import Greeted, StartTLS, ToClient, ToServer
from mailguard.smtp_state import COMMAND, GREETING, GW_EHLO, GW_RSET, GW_STARTTLS, GW_XCLIENT, Pending
from mailguard.wire import mask_banner


class GatewayDialogue:
    """The backend set-up and the gateway's own commands, for `mailguard.smtp.SMTPInspector`."""

    __slots__ = ()

    #: The name the gateway gives in its own EHLO to the backend.
    helo_name = b"localhost"

    def server_tls_ready(self):
        """The gateway's TLS handshake with the backend completed: greet the client."""
        ev = self._ev = []
        self._server_tls_pending = False
        self.server_tls = True
        if self._greeting is not None and self.phase is GREETING:
            if self.xclient and not self._xclient_done:
                # RFC 3207: what the server offered before TLS is forgotten.
                self._gateway_command(b"EHLO " + self.helo_name + b"\r\n", GW_EHLO)
            else:
                self._relay_greeting()
        return ev

    def _gateway_command(self, line, marker):
        """Send the gateway's own command to the backend; its reply is not relayed."""
        self._ev.append(ToServer(line))
        self._owe(Pending(marker))
        self._internal += 1

    def _greeting_reply(self, head, r):
        self._greeting = mask_banner(r.raw, self.rule.mask_banner)
        if r.code == 220:
            # Secure the backend leg and pass the client's identity first,
            # independently of the client.
            self._setup_backend()
        else:
            self._relay_greeting()
        return None

    def _gateway_reply(self, head, r):
        self._internal -= 1
        self._internal_reply(head.verb, r)
        return None

    def _relay_greeting(self):
        out, self._greeting = self._greeting, None
        self._enter(COMMAND)
        self._ev.append(ToClient(out))
        self._ev.append(Greeted())
        self._flush_local()
        if self._held:
            held, self._held = self._held, b""
            self._client(held)

    def _wants_tls(self):
        return self._tls == "terminate" and self.rule.backend_tls != "off" and not self.server_tls

    def _setup_backend(self):
        """Before greeting the client: secure the backend leg, then XCLIENT, as configured."""
        if self._wants_tls() or (self.xclient and not self._xclient_done):
            self._gateway_command(b"EHLO " + self.helo_name + b"\r\n", GW_EHLO)
        else:
            self._relay_greeting()

    def _xclient_command(self, attributes):
        host, port = self.peer if self.peer is not None else ("", 0)
        if ":" in host:
            addr = b"IPV6:" + host.encode("ascii", "replace")
        else:
            addr = host.encode("ascii", "replace") or b"[UNAVAILABLE]"
        values = {b"ADDR": addr, b"PORT": b"%d" % port if port else b"[UNAVAILABLE]",
                  b"NAME": b"[UNAVAILABLE]", b"HELO": b"[UNAVAILABLE]", b"PROTO": b"[UNAVAILABLE]"}
        words = [b"%s=%s" % (name, value) for name, value in values.items() if name in attributes]
        return b"XCLIENT " + b" ".join(words) + b"\r\n"

    def _internal_reply(self, verb, r):
        """A reply to the gateway's own command on the backend leg."""
        self.INTERNAL_REPLIES[verb](self, r)

    def _rset_done(self, r):
        self._flush_local()

    def _xclient_done_reply(self, r):
        # Postfix answers XCLIENT with a fresh 220 greeting, never relayed:
        # the client already waits for the original one.
        self._xclient_done = True
        if r.code != 220:
            self._alert("XCLIENT_REFUSED", "mail server refused XCLIENT (%d)" % r.code)
        self._relay_greeting()

    def _starttls_done(self, r):
        if r.code != 220:
            self._next_setup_step({})  # refused: as if STARTTLS had not been offered
            return
        if self._trailing:
            self._alert("STARTTLS_INJECTION", "server sent data after its 220 to STARTTLS")
            self._close("backend_injection", "server STARTTLS injection")
            return
        self._server_tls_pending = True
        self._ev.append(StartTLS("server"))

    def _ehlo_done(self, r):
        offered = {}
        if r.code == 250:
            for text in r.texts()[1:]:
                words = text.upper().split()
                if words:
                    offered[words[0]] = words[1:]
        self._next_setup_step(offered)

    def _next_setup_step(self, offered):
        """After the gateway's EHLO (``offered``: its keywords): STARTTLS, XCLIENT, or greet the client."""
        if self._wants_tls():
            if b"STARTTLS" in offered:
                self._gateway_command(b"STARTTLS\r\n", GW_STARTTLS)
                return
            if self.rule.backend_tls == "required":
                self._alert("BACKEND_TLS_MISSING", "mail server did not offer STARTTLS")
                self._greeting = None
                self._close("backend_tls_missing", "backend TLS required")
                return
        if self.xclient and not self._xclient_done and b"XCLIENT" in offered:
            self._gateway_command(self._xclient_command(set(offered[b"XCLIENT"])), GW_XCLIENT)
            return
        self._relay_greeting()


GatewayDialogue.INTERNAL_REPLIES = {
    GW_RSET: GatewayDialogue._rset_done,
    GW_XCLIENT: GatewayDialogue._xclient_done_reply,
    GW_STARTTLS: GatewayDialogue._starttls_done,
    GW_EHLO: GatewayDialogue._ehlo_done,
}
