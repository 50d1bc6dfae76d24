"""The built-in inspector factories, and the registry of every installed one.

The factories here (smtp, esmtp, mailguard, tcp, pop3, imap) are only
classes: they become available the way any third-party protocol does, as
plugin objects in a module of the ``mailguard.plugins`` package
(``mailguard/plugins/mailguard_builtin.py``).  `load_registry` finds them all
with ``twisted.plugin.getPlugins`` in ``mailguard.plugins`` and
``twisted.plugins``; `registry` is that result, loaded once per process.

Nothing here imports the reactor, and the inspectors themselves are
imported only when a session needs one.
"""

import re
from types import MappingProxyType

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailguard.interfaces import IInspectorFactory
from mailguard.policy import PolicyError

_NO_OPTIONS = MappingProxyType({})

#: The `mailguard.replies` entry an SMTP factory refuses a session with, by reason.
_SMTP_REFUSALS = {"overload": "try_later", "unreachable": "backend_unreachable"}

#: The reasons `IInspectorFactory.refusalReply` is asked about.
REFUSALS = ("overload", "unreachable")

_BOOLEANS = {
    "on": True, "yes": True, "true": True, "1": True,
    "off": False, "no": False, "false": False, "0": False,
}


def parse_on_off(value):
    """Parse on/off (or yes/no, true/false, 1/0) in any case; ValueError otherwise."""
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise ValueError("expected on or off (or yes/no, true/false, 1/0)") from None


@implementer(IPlugin, IInspectorFactory)
class SMTPInspectorFactory:
    """Builds `mailguard.smtp.SMTPInspector` sessions in one SMTP mode."""

    options = _NO_OPTIONS

    def __init__(self, name):
        self.name = name

    def validateOption(self, key, value):
        """SMTP's keys are core policy keys: there is nothing of its own to validate."""
        raise ValueError("not a key of protocol %s" % self.name)

    def buildInspector(self, rule):
        """A new SMTP inspector for ``rule`` in this factory's mode."""
        from mailguard.commands import MODES
        from mailguard.smtp import build

        return build(rule, MODES[self.name])

    def refusalReply(self, reason):
        """``421 4.7.0 Too many connections ...`` or ``421 4.4.1 ... unreachable``."""
        from mailguard.replies import reply

        name = _SMTP_REFUSALS.get(reason)
        return b"" if name is None else reply(name)


@implementer(IPlugin, IInspectorFactory)
class TCPInspectorFactory:
    """Builds `mailguard.tcp.TCPInspector` sessions."""

    name = "tcp"
    options = _NO_OPTIONS

    def validateOption(self, key, value):
        """tcp has no keys of its own."""
        raise ValueError("not a key of protocol tcp")

    def buildInspector(self, rule):
        """A new byte relay for ``rule``."""
        from mailguard.tcp import TCPInspector

        return TCPInspector(rule)

    def refusalReply(self, reason):
        """A byte relay has no words: a refused client is just closed."""
        return b""


@implementer(IPlugin, IInspectorFactory)
class MailboxInspectorFactory:
    """Builds POP3 (`mailguard.pop3`) or IMAP (`mailguard.imap`) inspectors.

    Both add one rule key, ``secure-login = on|off`` (default off): refuse
    logins before the client leg is encrypted.
    """

    options = MappingProxyType({"secure-login": "off"})

    def __init__(self, name, module, cls):
        self.name = name
        self._module = module
        self._cls = cls

    def validateOption(self, key, value):
        """``secure-login`` is on or off."""
        if key != "secure-login":
            raise ValueError("not a key of protocol %s" % self.name)
        return parse_on_off(value)

    def buildInspector(self, rule):
        """A new inspector for one session under ``rule``."""
        import importlib

        return getattr(importlib.import_module(self._module), self._cls)(rule)

    def refusalReply(self, reason):
        """The protocol module's own refusal (``REFUSALS``): POP3 ``-ERR``, IMAP ``* BYE``."""
        import importlib

        return importlib.import_module(self._module).REFUSALS.get(reason, b"")


def pop3_factory():
    """The ``pop3`` factory (RFC 1939 / 2449 allowlist)."""
    return MailboxInspectorFactory("pop3", "mailguard.pop3", "POP3Inspector")


def imap_factory():
    """The ``imap`` factory (RFC 9051 allowlist, literals handled)."""
    return MailboxInspectorFactory("imap", "mailguard.imap", "IMAPInspector")


# -- the registry ----------------------------------------------------------------

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")


class PluginError(PolicyError):
    """The installed inspector plugins cannot be used (a name clash, a bad name).

    A `PolicyError`, so that ``twistd mailguard`` and ``mailguard check``
    report it on one line like any policy mistake.
    """

    def __init__(self, problem):
        super().__init__("mailguard.plugins", None, None, problem)


def _describe(factory):
    cls = type(factory)
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def plugin_packages():
    """The packages searched for inspector plugins: ``mailguard.plugins``, ``twisted.plugins``."""
    import mailguard.plugins
    import twisted.plugins

    return (mailguard.plugins, twisted.plugins)


def discover(interface, packages, kind, what):
    """Every installed provider of ``interface`` in ``packages``, by name, as a read-only mapping.

    ``kind`` names the plugins in errors (``inspector``, ``filter``) and
    ``what`` their names (``protocol``, ``filter``).  Raise `PluginError`
    when a name is not a lower-case word, or two different providers claim
    one.  A plugin module that fails to import is logged by
    ``twisted.plugin`` and skipped.
    """
    from twisted.plugin import getPlugins

    found = {}
    for package in plugin_packages() if packages is None else packages:
        for factory in getPlugins(interface, package):
            name = getattr(factory, "name", None)
            if not isinstance(name, str) or _NAME.match(name) is None:
                raise PluginError(
                    "%s plugin %s has an invalid %s name %r "
                    "(expected lower-case letters, digits, '-', '_' or '.')" % (kind, _describe(factory), what, name)
                )
            other = found.get(name)
            if other is not None and other is not factory:
                raise PluginError(
                    "%s %r is provided twice: by %s and by %s" % (what, name, _describe(other), _describe(factory))
                )
            found[name] = factory
    return MappingProxyType(dict(sorted(found.items())))


def load_registry(packages=None):
    """Discover every installed `IInspectorFactory`; return a read-only mapping by name.

    ``packages`` defaults to `plugin_packages`; errors as `discover` says.
    """
    return discover(IInspectorFactory, packages, "inspector", "protocol")


_registry = None


def registry():
    """The installed factories by name, discovered on first use (`load_registry`)."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry


def inspector_factory(name):
    """Return the `IInspectorFactory` registered under ``name``."""
    return registry()[name]


def refusal_reply(factory, reason):
    """What ``factory``'s protocol writes to a client it refuses for ``reason`` (see `REFUSALS`).

    A factory without ``refusalReply`` (a plugin written before it) gets
    ``b""``: its clients are closed without a word, never answered in
    another protocol's language.  Raise `PluginError` when the factory
    returns anything but bytes.
    """
    refuse = getattr(factory, "refusalReply", None)
    if refuse is None:
        return b""
    data = refuse(reason)
    if not isinstance(data, bytes):
        raise PluginError(
            "inspector plugin %s: refusalReply(%r) returned %r, expected bytes" % (_describe(factory), reason, data)
        )
    return data
