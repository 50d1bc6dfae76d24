"""The built-in inspector protocols, registered like any plugin.

Each name below is a ``twisted.plugin`` plugin providing
`mailguard.interfaces.IInspectorFactory`; ``protocol = NAME`` in a policy
selects it.  Importing this module imports no inspector and no reactor.
"""

from mailguard.inspectors import (
    SMTPInspectorFactory,
    TCPInspectorFactory,
    imap_factory,
    pop3_factory,
)

smtp = SMTPInspectorFactory("smtp")
esmtp = SMTPInspectorFactory("esmtp")
mailguard = SMTPInspectorFactory("mailguard")
tcp = TCPInspectorFactory()
pop3 = pop3_factory()
imap = imap_factory()
