"""Command-line options and service maker behind the ``mailguard`` twistd plugin."""

from twisted.python import usage


class Options(usage.Options):
    """``twistd mailguard`` options; ``--help`` names mailguard's version, ``--version`` prints it."""

    @property
    def longdesc(self):
        """The text after the options in ``--help``: mailguard's version."""
        from mailguard.cli import version

        return "mailguard %s: an inspecting SMTP/ESMTP gateway. See mailguard --help for its tools." % version()

    def opt_version(self):
        """Print mailguard's version and exit."""
        from mailguard.cli import version

        print("mailguard %s" % version())
        raise SystemExit(0)

    optParameters = [
        ["config", "c", "etc/policy.ini", "The policy file (INI)."],
        ["debug", None, "", "Debug traces to log, e.g. smtp (added to the policy's [global] debug)."],
    ]

    def postOptions(self):
        """Turn ``--debug`` into a set of facilities, refusing unknown ones."""
        from mailguard.policy import GLOBAL_KEYS

        try:
            self["debug"] = GLOBAL_KEYS["debug"].parse(self["debug"] or "", None)
        except Exception as e:
            # The policy's own wording, e.g. "bad value 'x': expected ...".
            raise usage.UsageError("--debug: %s" % e)


def makeService(options):
    """Build the gateway from the policy named by ``--config``."""
    from mailguard.service import makeService as make

    return make(options)
