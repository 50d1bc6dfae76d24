"""Assemble the running gateway from a policy: listeners, tracker, inspectors, backends.

`makeService` is what ``twistd mailguard`` calls.  Each ``[listener]``
becomes a listening endpoint whose factory chain is
`TrackingFactory` -> `InspectorFactory` -> backend client endpoint; a
listener with ``backend = embedded`` also gets its own embedded backend.

Every socket is bound while the service is built, before twistd
daemonizes or drops privileges: a port in use, out of range or reserved
to root, a Maildir that cannot be created, stop start-up with one line
naming file, section, key and problem.  The bound sockets are read only
once the service starts.  SIGHUP reloads the policy (`Gateway.reload`).
"""

import os
import signal
import sys
import tempfile

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import Logger

from mailguard import endpoints as descriptions
from mailguard.inspectors import inspector_factory
from mailguard.policy import EMBEDDED, PolicyError
from mailguard.relay import InspectorFactory
from mailguard.tracker import ProxyHeaderFactory, SessionTracker, TrackerService, TrackingFactory

log = Logger(namespace="mailguard")

_ERRNO_WORDS = {
    98: "address already in use (another program, or another gateway, listens there)",
    13: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    99: "address not available on this host",
}


def bind(reactor, description, factory, ciphers=None):
    """Listen on ``description`` now, but read the socket only once started; return the port.

    The port is made by Twisted's endpoint for the description (with the
    gateway's default accept backlog, `mailguard.endpoints.BACKLOG`), then
    taken off the reactor until `ListenerService` starts it: a socket bound
    before twistd forks and drops privileges keeps its address and port.
    An ``ssl:`` listener gets the gateway's own TLS context (``ciphers``,
    TLS 1.2 at least, session resumption: `mailguard.tls.implicit_tls_endpoint`).

    @raise mailguard.endpoints.EndpointError: the one-sentence reason it
        cannot listen.
    """
    from twisted.internet import error

    text = descriptions.bind_description(description)
    outcome = []
    try:
        from mailguard.tls import DEFAULT_CIPHERS, implicit_tls_endpoint

        endpoint = implicit_tls_endpoint(reactor, text, ciphers or DEFAULT_CIPHERS)
        if endpoint is None:
            endpoint = endpoints.serverFromString(reactor, text)
        endpoint.listen(factory).addBoth(outcome.append)
    except Exception as e:  # a parser that raises instead of failing the Deferred
        outcome.append(e)
    if not outcome:
        raise descriptions.EndpointError("%s: endpoints that do not listen at once are not supported"
                                         % descriptions.parse(text).kind)
    result = outcome[0]
    if hasattr(result, "value"):  # a Failure
        result = result.value
    if isinstance(result, error.CannotListenError):
        raise descriptions.EndpointError(listen_error(result, text))
    if isinstance(result, IndexError) and descriptions.parse(text).kind == "systemd":
        raise descriptions.EndpointError("systemd passed no socket for %s (is the gateway started by a "
                                         "socket unit, with LISTEN_FDS?)" % text)
    if isinstance(result, BaseException):
        raise descriptions.EndpointError(str(result).splitlines()[0] if str(result) else type(result).__name__)
    return idle(result)


def listen_error(failure, description):
    """The sentence for a `CannotListenError` on ``description``: where, and why in words."""
    where = descriptions.tcp_address(description)
    errno = getattr(failure.socketError, "errno", None)
    reason = _ERRNO_WORDS.get(errno) or getattr(failure.socketError, "strerror", None) or str(failure.socketError)
    return "cannot listen on %s: %s" % (where or description, reason)


def idle(port):
    """Take a freshly listening ``port`` off the reactor until `ListenerService` starts it.

    Its factory is stopped too (a web site's clock, for instance), so a
    service that is built and never started leaves nothing behind.
    """
    port.stopReading()
    port.factory.doStop()
    return port


class ListenerService(service.Service):
    """One bound listening port: read from once started, closed on stop."""

    def __init__(self, port, description, factory):
        self.port = port
        self.description = description
        self.factory = factory
        #: The TLS settings of an ssl: listener since its last reload (None before one).
        self.tls_options = None

    def startService(self):
        """Start accepting on the socket bound at build time."""
        service.Service.startService(self)
        self.port.factory.doStart()
        self.port.startReading()

    def stopService(self):
        """Stop accepting (sessions already accepted go on)."""
        service.Service.stopService(self)
        return self.port.stopListening()

    def replace_factory(self, factory, tls_options=None):
        """New connections get ``factory``'s protocols from now on; accepted ones keep theirs.

        For an ``ssl:`` listener ``tls_options`` (read again from the
        certificate and key files) make a new TLS wrapper for new connections.
        """
        port, old = self.port, self.factory
        if port.factory is old:
            port.factory = factory
        elif tls_options is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            port.factory = TLSMemoryBIOFactory(tls_options, False, factory)
            self.tls_options = tls_options
        else:
            port.factory.wrappedFactory = factory
        self.factory = factory
        factory.doStart()
        old.doStop()


class EmbeddedBackendService(service.Service):
    """An embedded backend for one listener, reachable only from inside the gateway.

    Nothing listens: each session connects through its own socket pair
    (`mailguard.embedded.InProcessEndpoint`), so no other process can reach
    the backend and skip inspection.  The Maildir is created when the
    service is built (before twistd drops privileges).
    """

    def __init__(self, reactor, maildir, owner=None):
        from mailguard.embedded import EmbeddedBackendFactory, InProcessEndpoint

        self.reactor = reactor
        self.maildir = maildir
        _make_maildir(maildir, owner)
        self.factory = EmbeddedBackendFactory(maildir=maildir, record=False)
        self.endpoint = InProcessEndpoint(reactor, self.factory)

    def connect(self, factory):
        """Connect to this backend (the listener's backend endpoint)."""
        return self.endpoint.connect(factory)

    def startService(self):
        """Say where mail goes."""
        service.Service.startService(self)
        log.info("Embedded backend delivering into {maildir}", maildir=self.maildir)


def _make_maildir(path, owner=None):
    """Create the Maildir ``path`` (and its parents); chown it to ``owner`` ``(uid, gid)``."""
    from mailguard.embedded import make_maildir

    make_maildir(path)
    if owner is not None and owner != (None, None):
        uid, gid = owner
        for folder in (path, os.path.join(path, "cur"), os.path.join(path, "new"), os.path.join(path, "tmp")):
            os.chown(folder, -1 if uid is None else uid, -1 if gid is None else gid)
def listener_factory(listener, tracker, reactor, backend, backend_name=None):
    """The factory chain of one listener: tracker -> inspector -> ``backend``.

    ``backend`` is a Twisted client endpoint (anything with ``connect``).
    """
    inspectors = inspector_factory(listener.rule.protocol)
    factory = InspectorFactory(listener, inspectors, backend, tracker, reactor, backend_name=backend_name)
    tracking = TrackingFactory(tracker, listener, factory)
    if descriptions.proxied(listener.listen):
        # Our own PROXY reader: admission must see the real client.
        return ProxyHeaderFactory(tracking)
    return tracking


def check_addresses(policy):
    """Raise `PolicyError` when two listeners (or a listener and the status endpoint) share an address.

    What can be known without binding: the kernel would refuse the second.
    """
    pairs = [("listener " + listener.name, listener.listen) for listener in policy.listeners]
    if policy.settings.status:
        pairs.append(("global", policy.settings.status))
    clash = descriptions.overlapping(pairs)
    if clash is not None:
        (first, address), (second, other) = clash
        key = "status" if second == "global" else "listen"
        raise PolicyError(policy.path, second, key,
                          "%s is already the address of [%s] (%s)" % (other, first, address))


class AddressLocks:
    """One lock file per TCP address the gateway listens on, held while it runs: one gateway per address.

    Binding alone would refuse a second gateway too, but could not say who
    holds the address; the lock file names the running gateway's pid.  The
    locks live in `LOCK_DIR` and are kept across twistd's fork (the
    daemon's pid is written once it runs, by `write_pid`).
    """

    def __init__(self):
        self.held = {}  # address text -> file descriptor

    @staticmethod
    def _path(address):
        return os.path.join(LOCK_DIR, "mailguard-%s.lock" % str(address).replace("/", "_"))

    def _addresses(self, policy):
        out = {}
        for listener in policy.listeners:
            address = descriptions.tcp_address(listener.listen)
            if address is not None and address.port != 0:
                out[str(address)] = ("listener " + listener.name, "listen")
        return out

    def acquire(self, policy):
        """Lock every address of ``policy`` not yet held; return the new ones.

        @raise PolicyError: another running gateway holds one (it is named).
        """
        import fcntl

        new = {}
        try:
            for address, (section, key) in self._addresses(policy).items():
                if address in self.held:
                    continue
                path = self._path(address)
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                except OSError as e:
                    raise PolicyError(policy.path, section, key, "cannot open the lock file %s: %s (set "
                                      "MAILGUARD_LOCK_DIR)" % (path, e.strerror or e)) from None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                    os.close(fd)
                    raise PolicyError(policy.path, section, key, "%s is served by the running gateway with pid %s "
                                      "(lock %s)" % (address, holder, path)) from None
                new[address] = fd
        except BaseException:
            for fd in new.values():
                os.close(fd)
            raise
        self.held.update(new)
        self.write_pid(new)
        return new

    def keep_only(self, policy):
        """Release the locks of addresses ``policy`` no longer listens on."""
        wanted = self._addresses(policy)
        for address in [a for a in self.held if a not in wanted]:
            os.close(self.held.pop(address))

    def release(self, addresses):
        """Release the locks just acquired for ``addresses`` (a reload that failed)."""
        for address in addresses:
            fd = self.held.pop(address, None)
            if fd is not None:
                os.close(fd)

    def write_pid(self, which=None):
        """Write this process's pid into the lock files (again after twistd daemonizes)."""
        for fd in (which or self.held).values():
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)


#: Where `AddressLocks` keeps its lock files.
LOCK_DIR = os.environ.get("MAILGUARD_LOCK_DIR") or tempfile.gettempdir()


class Gateway(service.MultiService):
    """The running gateway: a tracker and the listeners of one policy, reloadable.

    ``tracker`` is the gateway's `SessionTracker`; ``listeners`` maps each
    ``listen`` text to its `ListenerService`.  ``worker`` is ``(index,
    count)`` in a worker process, ``sockets`` then maps ``listen`` texts to
    the listening file descriptors the supervisor handed down.
    """

    def __init__(self, reactor, policy, worker=None, owner=None, sockets=None):
        from mailguard import workers

        service.MultiService.__init__(self)
        self.reactor = reactor
        self.path = policy.path
        self.worker = worker
        self.owner = owner
        self.sockets = sockets
        self.policy = None
        self.listeners = {}
        self.embedded = {}
        self.locks = AddressLocks() if worker is None else None
        self.status_source = None  # the status page's figures, when [global] status is set
        if self.locks is not None:
            self.locks.acquire(policy)
        settings = self._settings(policy)
        self.tracker = SessionTracker(settings, reactor)
        if worker is not None:
            self.tracker.set_worker(*worker)
        workers.DrainService(self.tracker, reactor).setServiceParent(self)
        TrackerService(self.tracker).setServiceParent(self)
        if settings.status is not None:
            from mailguard.status import status_site

            status, labels, index, peers = settings.status, None, None, ()
            if worker is not None:
                status, labels = workers.worker_status(status, worker[0]), {"worker": str(worker[0])}
                index = worker[0]
                peers = [(i, workers.worker_status(settings.status, i)) for i in range(worker[1]) if i != index]
            site = status_site(self.tracker, reactor, labels, policy, index, peers)
            self.status_source = site.resource.source
            try:
                if sockets is not None and "status" in sockets:
                    port = workers.adopt(reactor, status, sockets["status"], site)
                else:
                    port = bind(reactor, status, site)
            except descriptions.EndpointError as e:
                raise PolicyError(policy.path, "global", "status", str(e)) from None
            ListenerService(port, status, site).setServiceParent(self)
        if settings.control_socket is not None:
            from mailguard.control import ControlService, control_path

            path = control_path(settings.control_socket, None if worker is None else worker[0])
            if worker is None:
                _control_socket_free(policy, path)
            try:
                control = ControlService(path, self.tracker, reactor, owner)
                # A reload's new worker waits for the socket of the one it replaces.
                control.wait = worker is not None
                control.setServiceParent(self)
            except OSError as e:
                raise PolicyError(policy.path, "global", "control-socket", "cannot create the directory of %s: %s"
                                  % (path, e.strerror or e)) from None
        # A new gateway: spool files left by an earlier run are stale (with
        # workers, the supervisor removes them before any worker starts).
        _prepare_spool(policy, clean=worker is None)
        self._commit(policy, self._prepare(policy))

    def _settings(self, policy):
        from mailguard import workers

        if self.worker is not None:
            return workers.worker_settings(policy.settings, self.worker[1])
        return policy.settings

    def _prepare(self, policy):
        """Everything the policy's listeners need, made and bound; nothing yet in use.

        All or nothing: on the first problem what was made is closed again
        and `PolicyError` is raised.
        """
        made = []  # (listener, factory, ListenerService or new port, embedded service or None)
        try:
            for listener in policy.listeners:
                section = "listener " + listener.name
                embedded = None
                if listener.backend == EMBEDDED:
                    try:
                        embedded = EmbeddedBackendService(self.reactor, listener.maildir, self.owner)
                    except OSError as e:
                        raise PolicyError(policy.path, section, "maildir", "cannot create %s: %s"
                                          % (listener.maildir, e.strerror or e)) from None
                    backend, name = embedded, "embedded (%s)" % listener.maildir
                else:
                    backend = descriptions.client_endpoint(self.reactor, listener.backend)
                    name = listener.backend
                made.append([listener, None, None, embedded, None])
                try:
                    factory = listener_factory(listener, self.tracker, self.reactor, backend, name)
                except Exception as e:  # TLS files changed since the policy was checked
                    raise PolicyError(policy.path, section, "inspect", str(e) or type(e).__name__) from None
                made[-1][1] = factory
                kept = self.listeners.get(listener.listen)
                if kept is not None:
                    made[-1][2] = kept
                    made[-1][4] = _reread_tls(policy.path, section, listener)
                    continue
                try:
                    made[-1][2] = self._bind(listener.listen, factory, listener.rule.tls_ciphers)
                except descriptions.EndpointError as e:
                    raise PolicyError(policy.path, section, "listen", str(e)) from None
        except BaseException:
            for _, _, port, embedded, _ in made:
                if port is not None and not isinstance(port, ListenerService):
                    port.stopListening()
            raise
        return made

    def _bind(self, listen, factory, ciphers=None):
        if self.sockets is not None:
            from mailguard import workers

            return workers.adopt(self.reactor, listen, self.sockets[listen], factory)
        return bind(self.reactor, listen, factory, ciphers)

    def _commit(self, policy, made):
        """Put what `_prepare` made in service: new sessions get it, running ones keep theirs."""
        running = self.running
        old_listeners, old_embedded = self.listeners, self.embedded
        self.listeners, self.embedded = {}, {}
        for listener, factory, port, embedded, tls_options in made:
            if embedded is not None:
                embedded.setServiceParent(self)
                self.embedded[listener.name] = embedded
            if isinstance(port, ListenerService):
                port.replace_factory(factory, tls_options)
                del old_listeners[listener.listen]
                self.listeners[listener.listen] = port
            else:
                listening = ListenerService(port, listener.listen, factory)
                listening.setServiceParent(self)  # starts it when the gateway runs
                self.listeners[listener.listen] = listening
        for listening in old_listeners.values():
            # Removed: stop accepting; its sessions finish (the tracker drains them).
            listening.disownServiceParent()
        for embedded in old_embedded.values():
            if running:
                # Sessions accepted before the switch may still be connecting to it.
                self.reactor.callLater(self.tracker.settings.synwait_time, embedded.disownServiceParent)
            else:
                embedded.disownServiceParent()
        self.policy = policy

    def reload(self, path=None):
        """Read the policy again and run on it; keep the old one if it does not load (logged either way).

        Returns True when the new policy is in service.
        """
        from mailguard.inspectors import registry
        from mailguard.policy import load_policy

        path = path or self.path
        try:
            policy = load_policy(path, protocols=registry())
            _same_process_shape(self.policy, policy)
            new_locks = ()
            if self.worker is None:
                check_addresses(policy)
                new_locks = self.locks.acquire(policy)
            try:
                # Sessions in progress may have messages in the spool: keep them.
                _prepare_spool(policy, clean=False)
                made = self._prepare(policy)
            except PolicyError:
                if self.locks is not None:
                    self.locks.release(new_locks)
                raise
        except PolicyError as e:
            log.warn("POLICY_RELOAD_FAILED: {error}", tag="POLICY_RELOAD_FAILED", error=str(e))
            return False
        policy = _with_debug(policy, self.debug)
        self.tracker.settings = self._settings(policy)
        self.tracker.tracing = "smtp" in policy.settings.debug
        self._commit(policy, made)
        if self.locks is not None:
            self.locks.keep_only(policy)
        if self.status_source is not None:
            # The status page shows the policy in service and when it was loaded.
            from mailguard.status import gateway_info

            self.status_source.info = gateway_info(policy.settings, policy, loaded=self.reactor.seconds())
        log.info("POLICY_RELOADED: {path} ({count} listeners)", tag="POLICY_RELOADED", path=path,
                 count=len(policy.listeners))
        return True

    #: Debug facilities from ``twistd mailguard --debug``, added to every policy loaded.
    debug = frozenset()

    def startService(self):
        """Start the listeners; SIGHUP reloads from now on (in the main thread)."""
        service.MultiService.startService(self)
        if self.worker is None:
            self.locks.write_pid()  # the daemon's pid, after twistd's fork
            install_reload_signal(self.reactor, self.reload)



def _reread_tls(path, section, listener):
    """An ``ssl:`` listener kept across a reload: its certificate and key read again (None for any other)."""
    from mailguard.tls import implicit_tls_options

    try:
        settings = implicit_tls_options(descriptions.bind_description(listener.listen), listener.rule.tls_ciphers)
    except Exception as e:  # unreadable or mismatched files: the reload fails, the old policy goes on
        raise PolicyError(path, section, "listen", str(e) or type(e).__name__) from None
    return None if settings is None else settings[1]


def install_reload_signal(reactor, reload):
    """Run ``reload()`` in the reactor on each SIGHUP."""
    try:
        signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    except ValueError:  # not the main thread (some test runners)
        pass


def _control_socket_free(policy, path):
    """Refuse, on one line, a control socket another running gateway holds (two gateways in one directory)."""
    from mailguard.control import holder

    pid = holder(path)
    if pid is not None:
        raise PolicyError(policy.path, "global", "control-socket",
                          "%s is held by the running gateway with pid %d (give each gateway its own "
                          "control-socket, or run it in its own directory)" % (path, pid))


def _prepare_spool(policy, clean=True):
    """Create the private spool directory when a rule has message filters; with ``clean``, remove stale files.

    Raise `PolicyError` naming ``[global] spool-directory`` when it cannot be made.
    """
    from mailguard.filtering import chain_of, prepare_spool

    if not any(chain_of(listener.rule) for listener in policy.listeners):
        return
    directory = policy.settings.spool_directory or os.path.abspath("var/spool")
    try:
        prepare_spool(directory, clean)
    except OSError as e:
        raise PolicyError(policy.path, "global", "spool-directory",
                          "cannot create %s: %s" % (directory, e.strerror or e)) from None


def _same_process_shape(old, new):
    """Refuse a reload that would need other processes or a different status endpoint."""
    if old is None:
        return
    if old.settings.workers != new.settings.workers:
        raise PolicyError(new.path, "global", "workers", "changing the number of workers (%d to %d) needs a "
                          "restart" % (old.settings.workers, new.settings.workers))
    if old.settings.status != new.settings.status:
        raise PolicyError(new.path, "global", "status", "moving the status endpoint needs a restart")


def _with_debug(policy, debug):
    if not debug:
        return policy
    from dataclasses import replace

    return replace(policy, settings=replace(policy.settings, debug=policy.settings.debug | frozenset(debug)))


def build_service(policy, reactor, worker=None, owner=None, sockets=None):
    """Return the `Gateway` running every listener of ``policy``, its sockets bound.

    The service's ``tracker`` attribute is the gateway's `SessionTracker`.
    ``worker`` is ``(index, count)`` in a worker process (``[global]
    workers``): listeners then accept on the sockets the supervisor passes
    down (``sockets``) and the thresholds are this worker's share.
    Stopping the service drains: it stops accepting and lets sessions
    finish, for a bounded time.

    @raise PolicyError: a listener cannot be bound, or its Maildir created.
    """
    return Gateway(reactor, policy, worker, owner, sockets)


def _owner(options):
    """``(uid, gid)`` twistd will switch to (``-u``/``-g``), or None."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    try:
        uid, gid = parent.get("uid"), parent.get("gid")
    except AttributeError:
        return None
    if uid is None and gid is None:
        return None
    return uid, gid


def makeService(options):
    """Build the gateway service for ``twistd mailguard`` from its options.

    Every failure is one line on stderr and exit status 1: a bad policy,
    two listeners on one address, a socket that cannot be bound.
    """
    from twisted.internet import reactor

    from mailguard.inspectors import registry
    from mailguard.logs import use_log_format
    from mailguard.policy import load_policy

    # [global] log-format decides what twistd's log destination receives.
    twistd = getattr(options, "parent", None)
    try:
        # The installed inspector plugins (built-ins included) are the known protocols.
        policy = load_policy(options["config"], protocols=registry())
        check_addresses(policy)
        from mailguard.matching import unused_matches

        for name in unused_matches(policy):
            sys.stderr.write("%s: [match %s]: warning: no rule uses this match\n" % (options["config"], name))
        debug = options.get("debug")
        policy = _with_debug(policy, debug)
        if policy.settings.workers > 1:
            from mailguard import workers

            try:
                workers.check_policy(policy)
            except workers.WorkersError as e:
                raise SystemExit(_fail(str(e)))
            _prepare_spool(policy)
            if policy.settings.control_socket is not None:
                from mailguard.control import control_path

                for index in range(policy.settings.workers):
                    _control_socket_free(policy, control_path(policy.settings.control_socket, index))
            pool = workers.WorkerPool(reactor, options["config"], policy, debug or ())
            logfile = twistd.get("logfile") if twistd is not None else None
            if logfile and logfile != "-":
                pool.fallback_log = os.path.abspath(logfile)
            return use_log_format(pool, policy.settings.log_format, twistd, policy.settings.log_rotate_size)
        gateway = build_service(policy, reactor, owner=_owner(options))
        gateway.debug = frozenset(debug or ())
        return use_log_format(gateway, policy.settings.log_format, twistd, policy.settings.log_rotate_size)
    except PolicyError as e:
        # One line, no traceback: twistd would print a long one otherwise.
        raise SystemExit(_fail(str(e)))


def _fail(text):
    sys.stderr.write("%s\n" % text)
    sys.stderr.flush()
    return 1
