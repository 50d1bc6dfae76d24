"""Assemble the running gateway from a policy: listeners, tracker, inspectors, backends.

`makeService` is what ``twistd mailguard`` calls.  Each ``[listener]``
becomes a listening endpoint whose factory chain is
`TrackingFactory` -> `InspectorFactory` -> backend client endpoint; a
listener with ``backend = embedded`` also gets its own embedded backend.
"""

from twisted.application import service, strports
from twisted.internet import endpoints
from twisted.logger import Logger

from mailguard.inspectors import inspector_factory
from mailguard.policy import EMBEDDED
from mailguard.relay import InspectorFactory
from mailguard.tracker import ProxyHeaderFactory, SessionTracker, TrackerService, TrackingFactory

log = Logger(namespace="mailguard")


class _LateEndpoint:
    """A client endpoint that exists only once the embedded backend has started."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.endpoint = None

    def connect(self, factory):
        """Connect to the embedded backend."""
        return self.endpoint.connect(factory)


class EmbeddedBackendService(service.Service):
    """Run an embedded backend for one listener, reachable only from inside the gateway.

    Nothing listens: each session connects through its own socket pair
    (`mailguard.embedded.InProcessEndpoint`), so no other process can reach
    the backend and skip inspection.
    """

    def __init__(self, reactor, maildir, endpoint):
        self.reactor = reactor
        self.maildir = maildir
        self.endpoint = endpoint

    def startService(self):
        """Create the backend and point the listener's backend endpoint at it."""
        from mailguard.embedded import EmbeddedBackendFactory, InProcessEndpoint

        service.Service.startService(self)
        factory = EmbeddedBackendFactory(maildir=self.maildir, record=False)
        self.endpoint.endpoint = InProcessEndpoint(self.reactor, factory)
        log.info("Embedded backend delivering into {maildir}", maildir=self.maildir)


def listener_factory(listener, tracker, reactor, backend, backend_name=None):
    """The factory chain of one listener: tracker -> inspector -> ``backend``.

    ``backend`` is a Twisted client endpoint (anything with ``connect``).
    """
    inspectors = inspector_factory(listener.rule.protocol)
    factory = InspectorFactory(listener, inspectors, backend, tracker, reactor, backend_name=backend_name)
    tracking = TrackingFactory(tracker, listener, factory)
    if _proxied(listener.listen):
        # Our own PROXY reader: admission must see the real client.
        return ProxyHeaderFactory(tracking)
    return tracking


def _proxied(description):
    return description.lower().startswith("haproxy:")


def listen_description(description):
    """The endpoint to bind for a ``listen`` value (``haproxy:`` is handled by the tracker)."""
    return description[len("haproxy:") :] if _proxied(description) else description


def _listen_service(reactor, description, rule, factory):
    """The listening service of one listener; ``ssl:`` gets the gateway's TLS context."""
    from mailguard.tls import implicit_tls_endpoint

    endpoint = implicit_tls_endpoint(reactor, description, rule.tls_ciphers)
    if endpoint is None:
        return strports.service(description, factory, reactor=reactor)
    from twisted.application.internet import StreamServerEndpointService

    listening = StreamServerEndpointService(endpoint, factory)
    # As strports.service does: a port that cannot be bound stops start-up.
    listening._raiseSynchronously = True
    return listening


def build_service(policy, reactor, worker=None):
    """Return the `MultiService` running every listener of ``policy``.

    The service's ``tracker`` attribute is the gateway's `SessionTracker`.
    ``worker`` is ``(index, count)`` in a worker process (``[global]
    workers``): listeners then share their ports with SO_REUSEPORT and the
    thresholds are this worker's share.  Stopping the service drains: it
    stops accepting and lets sessions finish, for a bounded time.
    """
    from mailguard import workers

    top = service.MultiService()
    settings = policy.settings
    if worker is not None:
        settings = workers.worker_settings(settings, worker[1])
    tracker = SessionTracker(settings, reactor)
    top.tracker = tracker
    workers.DrainService(tracker, reactor).setServiceParent(top)
    TrackerService(tracker).setServiceParent(top)
    if settings.status is not None:
        from mailguard.status import status_service

        status, labels = settings.status, None
        if worker is not None:
            status, labels = workers.worker_status(status, worker[0]), {"worker": str(worker[0])}
        status_service(status, tracker, reactor, labels).setServiceParent(top)
    _prepare_spool(policy)
    for listener in policy.listeners:
        if listener.backend == EMBEDDED:
            backend = _LateEndpoint(reactor)
            EmbeddedBackendService(reactor, listener.maildir, backend).setServiceParent(top)
            name = "embedded (%s)" % listener.maildir
        else:
            backend = endpoints.clientFromString(reactor, listener.backend)
            name = listener.backend
        factory = listener_factory(listener, tracker, reactor, backend, name)
        listen = listen_description(listener.listen)
        if worker is not None:
            workers.ReusePortService(reactor, listen, factory).setServiceParent(top)
        else:
            _listen_service(reactor, listen, listener.rule, factory).setServiceParent(top)
    return top


def _prepare_spool(policy):
    """Create the private spool directory (removing stale files) when a rule has message filters.

    Raise `PolicyError` naming ``[global] spool-directory`` when it cannot be made.
    """
    import os

    from mailguard.filtering import chain_of, prepare_spool
    from mailguard.policy import PolicyError

    if not any(chain_of(listener.rule) for listener in policy.listeners):
        return
    directory = policy.settings.spool_directory or os.path.abspath("var/spool")
    try:
        prepare_spool(directory)
    except OSError as e:
        raise PolicyError(policy.path, "global", "spool-directory",
                          "cannot create %s: %s" % (directory, e.strerror or e)) from None


def makeService(options):
    """Build the gateway service for ``twistd mailguard`` from its options."""
    import sys

    from twisted.internet import reactor

    from mailguard.inspectors import registry
    from mailguard.policy import PolicyError, load_policy

    try:
        # The installed inspector plugins (built-ins included) are the known protocols.
        policy = load_policy(options["config"], protocols=registry())
    except PolicyError as e:
        # One line, no traceback: twistd would print a long one otherwise.
        sys.stderr.write("%s\n" % e)
        sys.exit(1)
    from mailguard.matching import unused_matches

    for name in unused_matches(policy):
        sys.stderr.write("%s: [match %s]: warning: no rule uses this match\n" % (options["config"], name))
    debug = options.get("debug")
    if debug:
        # --debug adds to the policy's [global] debug.
        from dataclasses import replace

        policy = replace(policy, settings=replace(policy.settings, debug=policy.settings.debug | frozenset(debug)))
    if policy.settings.workers > 1:
        from mailguard import workers

        try:
            workers.check_policy(policy)
        except workers.WorkersError as e:
            sys.stderr.write("%s\n" % e)
            sys.exit(1)
        return workers.WorkerPool(reactor, options["config"], policy.settings.workers, debug or ())
    try:
        return build_service(policy, reactor)
    except PolicyError as e:
        sys.stderr.write("%s\n" % e)
        sys.exit(1)
