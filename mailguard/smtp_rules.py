"""SMTP rules that are pure functions of a rule and what the server said (sans-IO).

The EHLO reply rule lives here: which ESMTP keywords a client may see
(`filter_ehlo`).  The per-command allowlists, parameter checks and line
limits are in `mailguard.commands`; the inspector (`mailguard.smtp`) applies
both and keeps the state.
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EhloView:
    """What the client is shown of an EHLO reply.

    ``reply`` is the re-terminated reply to relay; ``keywords`` maps each
    keyword the client may now use to its parameters (upper-cased);
    ``removed`` lists, in the server's order, the keywords taken out.
    """

    reply: bytes
    keywords: dict
    removed: tuple


def _offered(texts):
    """Each keyword of the reply (upper-cased), once: its line's text and its parameters."""
    offered = {}
    for text in texts[1:]:
        words = text.split()
        if words:
            offered.setdefault(words[0].upper(), (text, words[1:]))
    return offered


def _allowed(kw, offered, allowed, tls):
    """Whether the rule lets keyword ``kw`` through."""
    if kw == b"STARTTLS":
        return tls == "passthrough"  # terminate offers the gateway's own, strip none
    if kw.decode("ascii", "replace") not in allowed:
        return False
    # BINARYMIME is only usable with BDAT (RFC 3030).
    return kw != b"BINARYMIME" or (b"CHUNKING" in offered and "CHUNKING" in allowed)


def _size(params, max_data):
    """SIZE as the client is told it: the server's own limit, capped at ``max-data``."""
    limit = max_data
    if params and params[0].isdigit() and int(params[0]) > 0:
        limit = min(int(params[0]), limit)
    return b"SIZE %d" % limit, (b"%d" % limit,)


def filter_ehlo(code, texts, rule, tls, offer_starttls, hide_auth=False, masked=lambda kw: False):
    """Apply a rule to an EHLO reply (``code`` and its lines' ``texts``); return an `EhloView`.

    Only keywords in ``rule.ehlo_keywords`` pass; SIZE is capped at
    ``rule.max_data``; AUTH is hidden with ``hide_auth`` (``auth-requires-tls``
    before the client's STARTTLS) without counting as removed; a keyword
    ``masked`` says yes to (a content rule's ``ehlo-reply-parameter``) is
    treated as never offered; the gateway's own STARTTLS is added with
    ``offer_starttls`` (``tls = terminate`` before TLS).
    """
    offered = {kw: v for kw, v in _offered(texts).items() if not masked(kw)}
    keywords = {}
    kept = [texts[0]]
    removed = []
    for kw, (text, params) in offered.items():
        if kw == b"AUTH" and hide_auth:
            continue  # offered again in the EHLO reply inside TLS
        if not _allowed(kw, offered, rule.ehlo_keywords, tls):
            removed.append(kw)
            continue
        params = tuple(w.upper() for w in params)
        if kw == b"SIZE":
            text, params = _size(params, rule.max_data)
        keywords[kw] = params
        kept.append(text)
    if offer_starttls:
        keywords[b"STARTTLS"] = ()
        kept.append(b"STARTTLS")
    digits = b"%d" % code
    lines = [digits + b"-" + t + b"\r\n" for t in kept[:-1]]
    lines.append(digits + b" " + kept[-1] + b"\r\n")
    return EhloView(b"".join(lines), keywords, tuple(removed))
