"""The built-in inspector factories: smtp, esmtp, mailguard and tcp."""

from zope.interface import implementer

from mailguard.interfaces import IInspectorFactory


@implementer(IInspectorFactory)
class SMTPInspectorFactory:
    """Builds `mailguard.smtp.SMTPInspector` sessions in one SMTP mode."""

    def __init__(self, name):
        self.name = name

    def buildInspector(self, rule):
        """A new SMTP inspector for ``rule`` in this factory's mode."""
        from mailguard.commands import MODES
        from mailguard.smtp import SMTPInspector

        return SMTPInspector(rule, MODES[self.name])


@implementer(IInspectorFactory)
class TCPInspectorFactory:
    """Builds `mailguard.tcp.TCPInspector` sessions."""

    name = "tcp"

    def buildInspector(self, rule):
        """A new byte relay for ``rule``."""
        from mailguard.tcp import TCPInspector

        return TCPInspector(rule)


BUILTIN = {
    "smtp": SMTPInspectorFactory("smtp"),
    "esmtp": SMTPInspectorFactory("esmtp"),
    "mailguard": SMTPInspectorFactory("mailguard"),
    "tcp": TCPInspectorFactory(),
}


def inspector_factory(name):
    """Return the `IInspectorFactory` registered under ``name``."""
    return BUILTIN[name]
