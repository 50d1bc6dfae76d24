"""Command-line options and service maker behind the ``mailguard`` twistd plugin."""

from twisted.python import usage


class Options(usage.Options):
    """``twistd mailguard`` options."""

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
