"""Content rules: ``[match NAME]`` sections, the IOS zone-based firewall's and the ASA's SMTP match set.

A ``[match NAME]`` section is parsed once into a frozen `Match`: its
criteria (all must hold; ``negate = on`` inverts the section), and the
action taken when it fires.  A rule lists its matches with ``match = A, B``
(tried in that order); the first firing match whose action is not ``log``
decides, and every firing match logs ``SMTP_POLICY_MATCH``.

Criteria act at three places:

- in the dialogue (``cmd-verb``, ``cmd-line-length-gt``, ``reply``,
  ``ehlo-reply-parameter``): `Dialogue`, a pure object the SMTP core asks
  at each command, each relayed reply and each EHLO keyword;
- on the envelope (``sender-address*`` at MAIL, ``recipient-*`` and
  ``invalid-recipients-count-gt`` at RCPT) and
- on the message (headers, body, MIME parts, at the end of the message):
  both through the message-filter seam, as the `IMessageFilter` built by
  `CONTENT_RULES` (one per rule, listed first in the rule's filter chain).

Regular expressions use RE2 (``google-re2``): linear time whatever the
input, so a sender cannot stall the gateway with a pathological subject.
"""

import collections
import re
import time
from dataclasses import dataclass, field
from types import MappingProxyType

from zope.interface import implementer

from mailguard.interfaces import IInlineMessageFilter, IMessageFilterFactory
from mailguard import policy as P
from mailguard.replies import reply

# -- the vocabulary ---------------------------------------------------------------

LOG = "log"
REJECT = "reject"
DROP = "drop-connection"
RESET = "reset"
MASK = "mask"
RATE_LIMIT = "rate-limit"
ACTIONS = (LOG, REJECT, DROP, RESET, MASK, RATE_LIMIT)

#: The EHLO keywords the ASA names; ``others`` in ``ehlo-reply-parameter`` is every keyword outside them.
ASA_EHLO_KEYWORDS = frozenset(
    "8BITMIME AUTH BINARYMIME CHECKPOINT DSN ENHANCEDSTATUSCODES ETRN PIPELINING SIZE VRFY".split()
)
#: The transfer encodings ``mime-encoding`` names; ``others`` is any other.
MIME_ENCODINGS = ("7bit", "8bit", "binary", "base64", "quoted-printable")

# Where each criterion acts.
COMMAND, REPLY, EHLO, MAIL, RCPT, MESSAGE = "command", "reply", "ehlo", "mail", "rcpt", "message"
STAGES = MappingProxyType({
    "sender-address": MAIL,
    "sender-address-length-gt": MAIL,
    "recipient-address": RCPT,
    "recipient-count-gt": RCPT,
    "invalid-recipients-count-gt": RCPT,
    "cmd-verb": COMMAND,
    "cmd-line-length-gt": COMMAND,
    "ehlo-reply-parameter": EHLO,
    "reply": REPLY,
    "header": MESSAGE,
    "header-length-gt": MESSAGE,
    "header-line-length-gt": MESSAGE,
    "header-to-fields-count-gt": MESSAGE,
    "body": MESSAGE,
    "body-length-gt": MESSAGE,
    "body-line-length-gt": MESSAGE,
    "mime-content-type": MESSAGE,
    "mime-encoding": MESSAGE,
    "mime-filename": MESSAGE,
    "mime-filename-length-gt": MESSAGE,
})
_DIALOGUE = (COMMAND, REPLY, EHLO)

#: The actions each stage allows (mask: cmd-verb and ehlo-reply-parameter only, see _check).
FITTING = MappingProxyType({
    COMMAND: (LOG, REJECT, DROP, RESET, MASK),
    REPLY: (LOG, DROP, RESET),
    EHLO: (LOG, MASK, DROP, RESET),
    MAIL: (LOG, REJECT, DROP, RESET, RATE_LIMIT),
    RCPT: (LOG, REJECT, DROP, RESET, RATE_LIMIT),
    MESSAGE: (LOG, REJECT, DROP, RESET, RATE_LIMIT),
})

# The gateway's own replies for content rules (from the one table, mailguard.replies).
REPLIES = MappingProxyType({
    name: reply("policy_" + name) for name in ("sender", "recipient", "command", "message", "drop", "rate")
})


@dataclass(frozen=True, slots=True)
class Criterion:
    """One criterion of a match: its policy ``key``, parsed ``value`` and the ``text`` as written."""

    key: str
    value: object = field(compare=False)
    text: str

    def describe(self):
        """The criterion as the alert names it (the policy's words, never message content)."""
        return "%s %s" % (self.key, self.text)


@dataclass(frozen=True, slots=True)
class Match:
    """One ``[match NAME]`` section: criteria (AND), ``negate``, ``action`` (and ``rate`` for rate-limit).

    ``stage`` is where it is decided: ``command``, ``reply``, ``ehlo`` (in
    the dialogue), ``mail``, ``rcpt`` (on that envelope command) or
    ``message`` (at the end of the message; also a section mixing envelope
    and message criteria).
    """

    name: str
    criteria: tuple
    action: str = LOG
    rate: int | None = None
    negate: bool = False
    stage: str = MESSAGE

    @property
    def action_text(self):
        """The action as written (``rate-limit 10``)."""
        return "%s %d" % (self.action, self.rate) if self.action == RATE_LIMIT else self.action

    def describe(self):
        """The criteria as the alert names them."""
        words = ", ".join(c.describe() for c in self.criteria)
        return ("not (%s)" % words) if self.negate else words


# -- hits: counted per process, for show policy-map and the metrics -----------------

#: Firings per ``(match name, action)`` in this process.
HITS = collections.Counter()


def _hit(match):
    HITS[(match.name, match.action)] += 1


@dataclass(frozen=True, slots=True)
class Decision:
    """What the matches that fired at one point decide.

    ``fired`` are the matches that fired, in ``match`` order (each is
    alerted); ``action`` is the first action other than ``log`` among them
    (``log`` when all only log), and ``match`` the one that decides.
    """

    fired: tuple
    action: str
    match: Match

    def alert_text(self, match, client=None):
        """The SMTP_POLICY_MATCH text for one fired match (never message content)."""
        who = " client %s" % (client,) if client else ""
        return "SMTP_POLICY_MATCH: match %s action %s%s criterion %s" % (
            match.name, match.action_text, who, match.describe())


def decide(fired):
    """The `Decision` of the matches that fired (a sequence, in match order), or None when none did."""
    if not fired:
        return None
    for match in fired:
        _hit(match)
    for match in fired:
        if match.action != LOG:
            return Decision(tuple(fired), match.action, match)
    return Decision(tuple(fired), LOG, fired[0])


# -- parsing a [match NAME] section ---------------------------------------------------


def _compile(raw, context, prefix=""):
    """Compile an RE2 pattern; a pattern RE2 refuses is a one-line problem saying why."""
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(prefix + raw, options)
    except re2.error as e:
        why = e.args[0] if e.args else "refused"
        if isinstance(why, bytes):
            why = why.decode("utf-8", "replace")
        hint = ""
        if "perl operator" in why or "escape sequence" in why:
            hint = "; RE2 has no lookaround or backreference"
        raise P._bad(raw, f"not an RE2 regular expression ({why}{hint})") from None
    except (TypeError, ValueError) as e:
        raise P._bad(raw, f"not an RE2 regular expression ({e})") from None


# What keeps a line regex from matching the same text inside a block of lines
# in multi-line mode: text-only anchors, or multi-line mode turned off.
_NOT_BLOCKWISE = re.compile(r"\\[Az]|\(\?[a-zA-Z]*-[a-zA-Z]*m")


class LinesRegex:
    """A ``body`` or ``header`` regex: ``line`` for one line (or field); ``block``, when sound, to rule out many in one search.

    ``block`` is the pattern in multi-line mode (``^``/``$`` at every
    line): whatever ``line`` finds in a line, ``block`` finds in a block
    holding that line, so a block it does not match holds no matching line.
    """

    __slots__ = ("line", "block")

    def __init__(self, line, block):
        self.line = line
        self.block = block

    def search(self, text):
        """Search one line."""
        return self.line.search(text)

    def search_lines(self, text):
        """Whether any line of ``text`` (lines joined with newlines) matches."""
        if self.block is not None and self.block.search(text) is None:
            return False
        return self._any(text.split("\n"))

    def search_any(self, texts, joined):
        """Whether any of ``texts`` matches; ``joined`` is them joined with newlines.

        A text may itself hold a newline (a header field whose encoded
        words decode to one): ``block`` still finds whatever ``line`` finds.
        """
        if self.block is not None and self.block.search(joined) is None:
            return False
        return self._any(texts)

    def _any(self, texts):
        search = self.line.search
        return any(search(text) is not None for text in texts)


def _compile_lines(raw, context):
    """A ``body`` or ``header`` regex, with its block form when that is sound."""
    line = _compile(raw, context)
    block = None if _NOT_BLOCKWISE.search(raw) else _compile(raw, context, "(?m)")
    return LinesRegex(line, block)


def _words(raw):
    return [w for w in raw.replace(",", " ").split() if w]


def _verbs(raw, context):
    """A list of SMTP verbs (letters), upper-cased."""
    verbs = frozenset(w.upper() for w in _words(raw))
    if not verbs:
        raise P._bad(raw, "expected SMTP verbs separated by spaces")
    for verb in sorted(verbs):
        if not verb.isalpha() or not verb.isascii():
            raise P._bad(raw, f"expected SMTP verbs of letters ({verb!r} is not one)")
    return verbs


def _ehlo_parameters(raw, context):
    """A list of ESMTP keywords, or ``others``."""
    words = frozenset(w.upper() for w in _words(raw))
    if not words:
        raise P._bad(raw, "expected ESMTP keywords (or others) separated by spaces")
    for word in sorted(words):
        if P._KEYWORD.fullmatch(word) is None:
            raise P._bad(raw, f"expected ESMTP keywords of letters, digits and '-' ({word!r} is not one)")
    return words


def _encodings(raw, context):
    """A list of transfer encodings out of MIME_ENCODINGS and ``others``."""
    words = frozenset(w.lower() for w in _words(raw))
    known = (*MIME_ENCODINGS, "others")
    if not words:
        raise P._bad(raw, "expected transfer encodings out of " + " ".join(known))
    for word in sorted(words):
        if word not in known:
            raise P._bad(raw, f"expected transfer encodings out of {' '.join(known)} ({word!r} is not one)")
    return words


def _action(raw, context):
    """``log``, ``reject``, ``drop-connection``, ``reset``, ``mask`` or ``rate-limit N``: ``(action, N or None)``."""
    words = raw.lower().split()
    expected = "expected one of log, reject, drop-connection, reset, mask, rate-limit N"
    if not words or words[0] not in ACTIONS:
        raise P._bad(raw, expected)
    if words[0] == RATE_LIMIT:
        if len(words) != 2 or not words[1].isdigit() or int(words[1]) < 1:
            raise P._bad(raw, "expected rate-limit N (matching messages per minute per client host, N >= 1)")
        return (RATE_LIMIT, int(words[1]))
    if len(words) != 1:
        raise P._bad(raw, expected)
    return (words[0], None)


_ABSENT = P.Derived("absent", lambda values, context: None)


def _criterion(parse, description):
    return P.KeySpec(parse, _ABSENT, description)


_COUNT = P._whole(0)

MATCH_KEYS = P._table(
    sender_address=_criterion(_compile, "The MAIL FROM path (without angle brackets) matches this RE2 regex."),
    sender_address_length_gt=_criterion(_COUNT, "The MAIL FROM path is longer than this many octets."),
    recipient_address=_criterion(_compile, "A RCPT TO path (without angle brackets) matches this RE2 regex."),
    recipient_count_gt=_criterion(_COUNT, "More RCPT commands than this were forwarded in the transaction."),
    invalid_recipients_count_gt=_criterion(_COUNT, "The server refused (5xx) more recipients than this in the session."),
    cmd_verb=_criterion(_verbs, "The command's verb is one of these (separated by spaces)."),
    cmd_line_length_gt=_criterion(_COUNT, "The command line is longer than this many octets, CRLF included."),
    ehlo_reply_parameter=_criterion(
        _ehlo_parameters, "An EHLO reply keyword is one of these; others: any outside the ASA's named set."),
    reply=_criterion(_compile, "A server reply's text matches this RE2 regex."),
    header=_criterion(_compile_lines, "A header field, unfolded and decoded, as 'Name: value', matches this RE2 regex."),
    header_length_gt=_criterion(_COUNT, "The header block is longer than this many octets."),
    header_line_length_gt=_criterion(_COUNT, "A header line is longer than this many octets (without CRLF)."),
    header_to_fields_count_gt=_criterion(_COUNT, "The header block has more To: fields than this."),
    body=_criterion(_compile_lines, "A decoded text line of a text/* part matches this RE2 regex."),
    body_length_gt=_criterion(_COUNT, "The body is longer than this many octets."),
    body_line_length_gt=_criterion(_COUNT, "A body line is longer than this many octets (without CRLF)."),
    mime_content_type=_criterion(_compile, "A part's type/subtype matches this RE2 regex."),
    mime_encoding=_criterion(_encodings, "A part's transfer encoding is one of these (others: any other)."),
    mime_filename=_criterion(_compile, "A part's file name (RFC 2047 and RFC 2231 decoded) matches this RE2 regex."),
    mime_filename_length_gt=_criterion(_COUNT, "A part's file name is longer than this many octets (UTF-8)."),
    negate=P.KeySpec(P._boolean, "off", "Fire when the criteria do not all hold (ASA match not)."),
    action=P.KeySpec(_action, "log", "What a firing match does: log, reject, drop-connection, reset, mask, "
                                     "or rate-limit N."),
)
"""The keys of C{[match NAME]}, in the order of the policy reference (criteria first)."""


def parse_match_section(path, header, name, items, context):
    """Parse one ``[match NAME]`` section into a `Match`; raise `PolicyError` on its first mistake."""
    values = P._parse_section(path, header, items, MATCH_KEYS, context)
    criteria = []
    for key, spec in MATCH_KEYS.items():
        if key in STAGES and values[spec.field_for(key)] is not None:
            criteria.append(Criterion(key, values[spec.field_for(key)], " ".join(items[key].split())))
    if not criteria:
        raise P.PolicyError(path, header, None, "no criterion (expected at least one of %s)" % ", ".join(STAGES))
    action, rate = values["action"]
    stage = _stage_of(path, header, criteria)
    _check_action(path, header, items, action, stage, criteria)
    return Match(name=name, criteria=tuple(criteria), action=action, rate=rate, negate=values["negate"], stage=stage)


def _stage_of(path, header, criteria):
    """When a section's criteria are decided: a dialogue criterion alone, else the latest envelope or message step."""
    stages = {STAGES[c.key] for c in criteria}
    dialogue = stages & set(_DIALOGUE)
    if dialogue and len(stages) > 1:
        first = next(c.key for c in criteria if STAGES[c.key] in dialogue)
        other = next(c.key for c in criteria if STAGES[c.key] != STAGES[first])
        raise P.PolicyError(path, header, other,
                            f"cannot be combined with {first} (a dialogue criterion is decided on its own command or reply)")
    for stage in (MESSAGE, RCPT):
        if stage in stages:
            return stage
    return stages.pop()


def _check_action(path, header, items, action, stage, criteria):
    """Refuse an action that does not fit the section's criteria (mask on a body rule, ...)."""
    allowed = FITTING[stage]
    if action in allowed and not (action == MASK and stage == COMMAND
                                  and "cmd-verb" not in {c.key for c in criteria}):
        return
    if action == MASK:
        why = "mask only fits cmd-verb and ehlo-reply-parameter"
    else:
        why = f"{action} does not fit {', '.join(c.key for c in criteria)} (expected one of {', '.join(allowed)})"
    raise P.PolicyError(path, header, "action", f"bad value {items.get('action', action)!r}: {why}")


def rule_matches(raw, context):
    """The rule key ``match``: resolve the names, return ``(FilterConfig,)`` for the content-rules filter, or ``()``."""
    from mailguard.filters import FilterConfig

    matches = P._references("match", raw, context)
    if not matches:
        return ()
    # Only envelope and message criteria need the filter seam (and its spool);
    # dialogue criteria act in the SMTP core alone.
    filtering = any(m.stage not in _DIALOGUE for m in matches)
    options = MappingProxyType({"matches": matches, "dialogue": Dialogue(matches), "filtering": filtering})
    return (FilterConfig(name="match", plugin="match", timeout=30.0, default_action="tempfail",
                         options=options, factory=CONTENT_RULES),)


def dialogue_of(rule):
    """The rule's `Dialogue` (its cmd-*, reply and ehlo-reply-parameter matches), or None when it has none."""
    for config in getattr(rule, "matches", ()):
        dialogue = config.options.get("dialogue")
        if dialogue is not None and dialogue.active:
            return dialogue
    return None


def matches_of(rule):
    """Every `Match` a rule lists, in order."""
    for config in getattr(rule, "matches", ()):
        return config.options.get("matches", ())
    return ()


def unused_matches(policy):
    """The names of the ``[match NAME]`` sections no rule lists (for the warning of ``mailguard check``)."""
    used = {m.name for rule in policy.rules for m in matches_of(rule)}
    return [name for name in getattr(policy, "match_names", ()) if name not in used]


# -- the dialogue criteria: a pure object the SMTP core asks ----------------------------


def _holds(match, test):
    """Whether ``match`` fires, given ``test(criterion) -> bool`` for each of its criteria."""
    result = True
    for c in match.criteria:
        if not test(c):
            result = False
            break
    return result != match.negate


class Dialogue:
    """The dialogue criteria of one rule; stateless, shared by every session of the rule.

    Each method returns a `Decision`, or None when no match fired.
    """

    __slots__ = ("commands", "replies", "ehlo", "active")

    def __init__(self, matches):
        self.commands = tuple(m for m in matches if m.stage == COMMAND)
        self.replies = tuple(m for m in matches if m.stage == REPLY)
        self.ehlo = tuple(m for m in matches if m.stage == EHLO)
        self.active = bool(self.commands or self.replies or self.ehlo)

    def __eq__(self, other):
        return isinstance(other, Dialogue) and (self.commands, self.replies, self.ehlo) == (
            other.commands, other.replies, other.ehlo)

    __hash__ = None

    def on_command(self, verb, line):
        """A command line (``line`` without its CRLF; ``verb`` upper-cased bytes) arrived."""
        if not self.commands:
            return None
        size = len(line) + 2
        name = verb.decode("ascii", "replace")

        def test(c):
            if c.key == "cmd-verb":
                return name in c.value
            return size > c.value

        return decide([m for m in self.commands if _holds(m, test)])

    def on_reply(self, code, texts):
        """The server's reply ``code`` with its lines' ``texts`` (bytes, without code and separator) is relayed."""
        if not self.replies:
            return None
        text = "\n".join(t.decode("utf-8", "replace") for t in texts)

        def test(c):
            return c.value.search(text) is not None

        return decide([m for m in self.replies if _holds(m, test)])

    def on_ehlo_keyword(self, keyword):
        """The EHLO reply offers ``keyword`` (bytes); mask it when the decision's action is ``mask``."""
        if not self.ehlo:
            return None
        name = keyword.decode("ascii", "replace").upper()

        def test(c):
            return name in c.value or ("OTHERS" in c.value and name not in ASA_EHLO_KEYWORDS)

        return decide([m for m in self.ehlo if _holds(m, test)])


# -- the envelope and message criteria: a message filter ---------------------------------


class RateLimiter:
    """At most N firings per minute per (match, client host), in this process.

    Holds at most N timestamps per key; keys whose last firing is over a
    minute old are swept once the table has grown.
    """

    def __init__(self, now=time.monotonic, window=60.0):
        self.now = now
        self.window = window
        self._seen = {}
        self._sweep_at = 1024

    def allow(self, match, host):
        """Count one firing of ``match`` for ``host``; True while within the limit."""
        now = self.now()
        key = (match.name, host)
        times = self._seen.get(key)
        if times is None:
            times = self._seen[key] = collections.deque(maxlen=match.rate)
            if len(self._seen) > self._sweep_at:
                self._sweep(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= match.rate:
            return False
        times.append(now)
        return True

    def _sweep(self, now):
        for key in [k for k, t in self._seen.items() if not t or t[-1] <= now - self.window]:
            del self._seen[key]
        self._sweep_at = max(1024, 2 * len(self._seen))


def _log_alert(text, **fields):
    from twisted.logger import Logger

    Logger(namespace="mailguard").warn("{text}", text=text, tag="SMTP_POLICY_MATCH", **fields)


@implementer(IMessageFilterFactory)
class ContentRulesFactory:
    """Builds the content-rules filter of a session; ``config.options['matches']`` are the rule's matches.

    ``alert(text, **fields)`` logs an SMTP_POLICY_MATCH line (the gateway's
    log by default); ``limiter`` is the process's `RateLimiter`.
    """

    name = "match"
    options = MappingProxyType({})

    def __init__(self, alert=None, limiter=None):
        self.alert = alert or _log_alert
        self.limiter = limiter or RateLimiter()

    def validateOption(self, key, value):
        """The content rules take no ``[filter]`` keys (they are ``[match NAME]`` sections)."""
        raise ValueError("content rules are configured with [match NAME] sections")

    def buildFilter(self, config, session):
        """A `ContentRules` filter for one session."""
        return ContentRules(config.options.get("matches", ()), session, self)


CONTENT_RULES = ContentRulesFactory()
"""The factory of every rule's content-rules filter (``FilterConfig.factory`` of ``rule.matches``)."""


def _address(path):
    """A MAIL/RCPT path without its angle brackets, as text."""
    if path[:1] == b"<" and path[-1:] == b">":
        path = path[1:-1]
    return path.decode("utf-8", "replace")


_TX_KEYS = ("sender-address", "sender-address-length-gt", "recipient-address", "recipient-count-gt",
            "invalid-recipients-count-gt")


@implementer(IInlineMessageFilter)
class ContentRules:
    """The envelope and message criteria of one rule, for one client session.

    An `IInlineMessageFilter`: the gateway gives it the message as it is
    spooled (`messageData`); `header`, `endOfHeaders` and `body` read a message
    given field by field instead.
    """

    def __init__(self, matches, session, factory):
        self.factory = factory
        self.session = session
        self.client = session.client[0] if session and session.client else None
        self.mail = tuple(m for m in matches if m.stage == MAIL)
        self.rcpt = tuple(m for m in matches if m.stage == RCPT)
        self.message = tuple(m for m in matches if m.stage == MESSAGE)
        self.invalid = 0  # recipients the server refused in this session
        self._reader = None
        self._new_transaction()

    def _new_transaction(self):
        self.sender = ""
        self.recipients = 0  # forwarded RCPTs
        self.facts = {}  # envelope criterion -> held for the message's matches
        self._state = None

    # -- verdicts -----------------------------------------------------------------

    def _verdict(self, decision, refused, stage_reply):
        from mailguard.filters import CONTINUE, Verdict, ACCEPT

        ok = Verdict(ACCEPT) if refused == "message" else Verdict(CONTINUE)
        if decision is None:
            return ok
        for match in decision.fired:
            self.factory.alert(decision.alert_text(match, self.client), match=match.name, action=match.action_text,
                               client=self.client or "-", criterion=match.describe())
        # rate-limit: a match within its rate is only counted.
        deciding = None
        for match in decision.fired:
            if match.action == LOG:
                continue
            if match.action == RATE_LIMIT and self.factory.limiter.allow(match, self.client):
                continue
            deciding = match
            break
        if deciding is None:
            return ok
        reason = "match %s" % deciding.name
        if deciding.action == REJECT:
            return Verdict("reject", stage_reply, reason=reason)
        if deciding.action == RATE_LIMIT:
            return Verdict("tempfail", REPLIES["rate"], reason=reason)
        if deciding.action == DROP:
            return Verdict("drop", REPLIES["drop"], reason=reason)
        return Verdict("reset", reason=reason)

    # -- the envelope -------------------------------------------------------------

    def envelopeFrom(self, session, sender, parameters):
        """MAIL FROM: a new transaction; the sender-address criteria act here."""
        if session is not None:
            self.session = session
            self.client = session.client[0] if session.client else self.client
        self._new_transaction()
        self.sender = _address(sender)
        raw = len(sender[1:-1] if sender[:1] == b"<" and sender[-1:] == b">" else sender)

        def test(c):
            if c.key == "sender-address":
                return c.value.search(self.sender) is not None
            return raw > c.value

        for m in self.rcpt + self.message:
            for c in m.criteria:
                if c.key in ("sender-address", "sender-address-length-gt"):
                    self.facts[c] = test(c)
        return self._verdict(decide([m for m in self.mail if _holds(m, test)]), "envelope", REPLIES["sender"])

    def envelopeRecipient(self, recipient, parameters):
        """RCPT TO: the recipient criteria act here (this RCPT would be the transaction's next one)."""
        address = _address(recipient)
        count = self.recipients + 1

        def test(c):
            if c.key == "recipient-address":
                return c.value.search(address) is not None
            if c.key == "recipient-count-gt":
                return count > c.value
            if c.key == "invalid-recipients-count-gt":
                return self.invalid > c.value
            return self.facts.get(c, False) if c.key in _TX_KEYS else False

        for m in self.message:
            for c in m.criteria:
                if c.key == "recipient-address" and test(c):
                    self.facts[c] = True
        verdict = self._verdict(decide([m for m in self.rcpt if _holds(m, test)]), "envelope", REPLIES["recipient"])
        if not verdict.final:
            # Counted here, not at the server's reply: with PIPELINING the
            # next RCPT is asked before this one is answered.
            self.recipients += 1
        return verdict

    def serverReply(self, command, code, text):
        """Count the server's refusals (5xx) of recipients, for invalid-recipients-count-gt."""
        if command == b"RCPT" and 500 <= code < 600:
            self.invalid += 1

    # -- the message ----------------------------------------------------------------

    def header(self, name, value):
        """Feed one header field to the MIME reader."""
        self._feed(name + b":" + value + b"\r\n")

    def endOfHeaders(self):
        """The header block is over."""
        self._feed(b"\r\n")

    def body(self, chunk):
        """Feed a body piece to the MIME reader."""
        self._feed(chunk)

    def messageData(self, data):
        """Feed the next octets of the message (header block and body as they came) to the MIME reader."""
        self._feed(data)

    def _feed(self, data):
        if not self.message:
            return None
        if self._reader is None:
            from mailguard.mime import MimeReader

            self._state = _MessageState(self.message)
            # Measuring every line of every part is the reader's largest cost:
            # only when a match asks for the longest body line.
            measure = any(c.key == "body-line-length-gt" for m in self.message for c in m.criteria)
            self._reader = MimeReader(decode_text=bool(self._state._body), text_blocks=True, measure_lines=measure,
                                      decode_headers=bool(self._state._header))
        self._state.take(self._reader.feed(data))
        return None

    def endOfMessage(self):
        """The message is whole: decide the message matches."""
        from mailguard.filters import ACCEPT, Verdict

        if not self.message:
            return Verdict(ACCEPT)
        if self._reader is None:
            self._feed(b"")
        self._state.take(self._reader.close())
        self._reader = None
        state, self._state = self._state, None
        facts = dict(self.facts)
        facts_count = {"recipient-count-gt": self.recipients, "invalid-recipients-count-gt": self.invalid}

        def test(c):
            if c.key in ("recipient-count-gt", "invalid-recipients-count-gt"):
                return facts_count[c.key] > c.value
            if c.key in ("sender-address", "sender-address-length-gt"):
                return facts.get(c, False)
            if c.key == "recipient-address":
                return facts.get(c, False)
            return state.holds(c)

        return self._verdict(decide([m for m in self.message if _holds(m, test)]), "message", REPLIES["message"])

    def abort(self):
        """The transaction ended without a verdict: forget it."""
        self._reader = None
        self._new_transaction()

    def close(self):
        """The session is over."""
        self._reader = None


#: Characters of header fields held to be searched together (`_MessageState`).
HELD_FIELDS = 65536


class _MessageState:
    """What the message criteria have seen of a message so far (each regex criterion: matched or not)."""

    __slots__ = ("regex", "header_size", "longest_header", "to_fields", "body_size", "longest_body",
                 "encodings", "filename_lengths", "_header", "_body", "_type", "_filename", "_fields", "_held")

    def __init__(self, matches):
        keys = {}
        for m in matches:
            for c in m.criteria:
                keys.setdefault(c.key, []).append(c)
        self._header = tuple(keys.get("header", ()))
        self._body = tuple(keys.get("body", ()))
        self._type = tuple(keys.get("mime-content-type", ()))
        self._filename = tuple(keys.get("mime-filename", ()))
        self.regex = set()  # criteria whose regex matched
        self.header_size = self.longest_header = self.to_fields = 0
        self.body_size = self.longest_body = 0
        self.encodings = set()
        self.filename_lengths = 0
        self._fields = []  # texts of the message's header fields not yet searched (header regexes)
        self._held = 0  # their characters

    def _search(self, criteria, text):
        for c in criteria:
            if c not in self.regex and c.value.search(text) is not None:
                self.regex.add(c)

    def take(self, events):
        """Note what the reader's events say, for the criteria that need it."""
        handlers = _STATE_HANDLERS
        for e in events:
            handler = handlers.get(e.__class__.__name__)
            if handler is not None:
                handler(self, e)

    def _text_block(self, e):
        for c in self._body:
            if c not in self.regex and c.value.search_lines(e.text):
                self.regex.add(c)

    def _text_line(self, e):
        if self._body:
            self._search(self._body, e.text)

    def _header_field(self, e):
        if e.part != 0:
            return
        if e.name.lower() == "to":
            self.to_fields += 1
        if self._header:
            # Searched a block of fields at a time (a search per field and
            # regex was most of a small message's cost), at most about
            # HELD_FIELDS characters held.
            text = e.text
            self._fields.append(text)
            self._held += len(text)
            if self._held > HELD_FIELDS:
                self._search_fields()

    def _search_fields(self):
        fields = self._fields
        if fields:
            joined = "\n".join(fields)
            for c in self._header:
                if c not in self.regex and c.value.search_any(fields, joined):
                    self.regex.add(c)
            fields.clear()
        self._held = 0

    def _part_start(self, e):
        if e.part == 0 and self._fields:
            self._search_fields()  # the message's header block is over
        if self._type:
            self._search(self._type, e.content_type)
        self.encodings.add(e.encoding if e.encoding in MIME_ENCODINGS else "others")
        if e.filename is not None:
            if self._filename:
                self._search(self._filename, e.filename)
            self.filename_lengths = max(self.filename_lengths, len(e.filename.encode("utf-8", "replace")))

    def _message_end(self, e):
        self.header_size = e.header_size
        self.longest_header = e.longest_header_line
        self.body_size = e.body_size
        self.longest_body = e.longest_body_line

    def holds(self, c):
        key = c.key
        if key in ("header", "body", "mime-content-type", "mime-filename"):
            return c in self.regex
        if key == "mime-encoding":
            return bool(self.encodings & c.value)
        value = {
            "header-length-gt": self.header_size,
            "header-line-length-gt": self.longest_header,
            "header-to-fields-count-gt": self.to_fields,
            "body-length-gt": self.body_size,
            "body-line-length-gt": self.longest_body,
            "mime-filename-length-gt": self.filename_lengths,
        }[key]
        return value > c.value


#: The reader's events (`mailguard.mime`, by class name) and what `_MessageState` notes of each.
_STATE_HANDLERS = {
    "TextBlock": _MessageState._text_block,
    "TextLine": _MessageState._text_line,
    "Header": _MessageState._header_field,
    "PartStart": _MessageState._part_start,
    "MessageEnd": _MessageState._message_end,
}
