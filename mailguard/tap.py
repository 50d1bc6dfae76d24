"""Command-line options and service maker behind the ``mailguard`` twistd plugin."""

from twisted.python import usage


class Options(usage.Options):
    """``twistd mailguard`` options."""

    optParameters = [
        ["config", "c", "etc/policy.ini", "The policy file (INI)."],
    ]


def makeService(options):
    """Build the gateway from the policy named by ``--config``."""
    from mailguard.service import makeService as make

    return make(options)
