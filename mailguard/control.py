"""The control socket: ``mailguard clear session ID`` and ``mailguard debug smtp on|off`` in a running gateway.

A unix socket (mode 0600, so only the gateway's own user can use it) at
``[global] control-socket``; with workers, worker ``i`` listens on that path
plus ``.i``.  The protocol is one line per command and one line per
answer, ``OK ...`` or ``ERR ...``:

    clear session 3        -> OK session 3 cleared
    debug smtp on          -> OK debug smtp on
    anything else          -> ERR unknown command (expected: clear session ID, debug smtp on|off)

It never goes through the HTTP status endpoint, which is read-only.
"""

import os

from twisted.application import service
from twisted.internet import protocol
from twisted.protocols import basic

#: Commands the control socket understands, for its error answer.
USAGE = "clear session ID, debug smtp on|off"


def control_path(path, worker=None):
    """The socket path of the gateway (``worker`` None) or of worker ``worker``."""
    return path if worker is None else "%s.%d" % (path, worker)


def socket_name(path):
    """What to bind or connect to for ``path``: relative to the current directory when that is shorter.

    A unix socket's name is limited to 107 bytes; a gateway running deep in
    a directory tree still binds its default ``var/run/mailguard.sock``.
    """
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return relative if len(relative) < len(path) else path


def answer(tracker, line):
    """Carry out one command line (text) on ``tracker``; return the one-line answer."""
    words = line.split()
    lowered = [w.lower() for w in words]
    if len(words) == 3 and lowered[:2] == ["clear", "session"]:
        if tracker.clear(words[2]):
            return "OK session %s cleared" % words[2]
        return "ERR no session %s" % words[2]
    if len(words) == 3 and lowered[:2] == ["debug", "smtp"] and lowered[2] in ("on", "off"):
        tracker.set_tracing(lowered[2] == "on")
        return "OK debug smtp %s" % lowered[2]
    return "ERR unknown command (expected: %s)" % USAGE


class ControlProtocol(basic.LineOnlyReceiver):
    """One control connection: a line in, a line out, as many as the client sends."""

    delimiter = b"\n"
    MAX_LENGTH = 1024

    def lineReceived(self, line):
        """Answer one command."""
        text = line.decode("utf-8", "replace").strip()
        self.sendLine(answer(self.factory.tracker, text).encode("utf-8"))

    def lineLengthExceeded(self, line):
        """A line longer than any command: answer and hang up."""
        self.sendLine(b"ERR line too long")
        self.transport.loseConnection()


class ControlFactory(protocol.ServerFactory):
    """Builds `ControlProtocol` connections acting on one tracker."""

    protocol = ControlProtocol
    noisy = False

    def __init__(self, tracker):
        self.tracker = tracker


class ControlService(service.Service):
    """Listens on the control socket (mode 0600) while the gateway runs.

    The directory is created (mode 0700) if missing; a socket left by a
    gateway that died is replaced (Twisted's pid lock tells the two apart).
    A socket that cannot be bound stops start-up, like a listener.
    """

    def __init__(self, path, tracker, reactor, owner=None):
        self.path = path
        self.tracker = tracker
        self.reactor = reactor
        self.port = None
        # The directory is made now, while the gateway may still be root:
        # owned by the user twistd switches to (``owner``, ``(uid, gid)``),
        # who binds the socket in it once running.
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if owner is not None and owner != (None, None):
                uid, gid = owner
                os.chown(directory, -1 if uid is None else uid, -1 if gid is None else gid)

    #: With ``wait``: how often, and how many times, to try a socket another process still holds.
    RETRY_SECONDS = 1.0
    RETRIES = 120

    def startService(self):
        """Bind the socket, readable and writable by this user only.

        With ``wait`` (a worker started by a reload, while the worker it
        replaces drains and still holds the socket), a socket held by a live
        process is tried again every `RETRY_SECONDS` until it is free.
        """
        service.Service.startService(self)
        self._listen(self.RETRIES if self.wait else 0)

    #: Set by the gateway in worker processes (see `startService`).
    wait = False
    _retry = None

    def _listen(self, tries):
        from twisted.internet.error import CannotListenError

        self._retry = None
        if not self.running:
            return
        old = os.umask(0o177)
        try:
            self.port = self.reactor.listenUNIX(
                socket_name(self.path), ControlFactory(self.tracker), mode=0o600, wantPID=True)
        except CannotListenError:
            if tries <= 0:
                raise
            self._retry = self.reactor.callLater(self.RETRY_SECONDS, self._listen, tries - 1)
        finally:
            os.umask(old)

    def stopService(self):
        """Stop listening; Twisted removes the socket."""
        service.Service.stopService(self)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
            self._retry = None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def send(path, command, timeout=5.0):
    """Send one command line to the control socket at ``path``; return its answer line.

    @raise OSError: when nothing listens there (or it does not answer in time).
    """
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_name(path))
        s.sendall(command.encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace").strip()
