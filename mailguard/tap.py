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
        """Turn ``--debug`` into a set of facilities, refusing unknown ones; refuse a pidfile a live gateway holds."""
        from mailguard.policy import GLOBAL_KEYS

        _refuse_running(getattr(self, "parent", None))

        try:
            self["debug"] = GLOBAL_KEYS["debug"].parse(self["debug"] or "", None)
        except Exception as e:
            # The policy's own wording, e.g. "bad value 'x': expected ...".
            raise usage.UsageError("--debug: %s" % e)


def _refuse_running(parent):
    """One line and exit 1 when ``--pidfile`` names a live process (a gateway already running).

    twistd would refuse too, later, with several lines; options are parsed
    before it looks, so mailguard says it first, on one line.
    """
    import os
    import sys

    path = parent.get("pidfile") if parent is not None else None
    if not path:
        return
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if pid <= 0 or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # stale: twistd removes it
    except PermissionError:
        pass  # alive, another user's
    sys.stderr.write("%s: a gateway is already running with pid %d (stop it, or give another --pidfile)\n"
                     % (path, pid))
    raise SystemExit(1)


def makeService(options):
    """Build the gateway from the policy named by ``--config``."""
    from mailguard.service import makeService as make

    return make(options)
