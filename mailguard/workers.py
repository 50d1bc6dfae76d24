"""Several worker processes sharing the listening ports (``[global] workers = N``).

The process twistd starts becomes a supervisor: it runs no listener itself
but starts N workers (``python -m mailguard.workers``), each running the
whole chain on SO_REUSEPORT listeners so the kernel spreads connections
across them.  A worker that dies is started again; SIGTERM to the
supervisor is passed on, and each worker drains: it stops accepting, lets
its sessions finish for up to `DRAIN_SECONDS`, then closes what is left.

The policy's thresholds are gateway-wide: each worker enforces its share
(the value divided by N, rounded up), which is what the kernel's even
spreading of connections makes add up to the configured totals.  Worker
``i``'s status endpoint is the configured port plus ``i``; its metrics
carry a ``worker`` label.
"""

import dataclasses
import math
import os
import re
import signal
import sys

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

log = Logger(namespace="mailguard")

#: How long a stopping worker lets its sessions finish.
DRAIN_SECONDS = 30
#: How long the supervisor waits before starting a dead worker again.
RESTART_DELAY = 1.0

_TCP = re.compile(r"(tcp6?):(\d+)((?::.*)?)$", re.I)


class WorkersError(Exception):
    """The policy cannot run with several workers; ``str()`` says why, on one line."""


def split_tcp(description):
    """``(kind, port, options)`` of a ``tcp:`` / ``tcp6:`` server description, or None."""
    m = _TCP.match(description)
    if m is None:
        return None
    options = {}
    for word in re.split(r"(?<!\\):", m.group(3))[1:]:
        key, _, value = word.partition("=")
        options[key] = value.replace("\\:", ":")
    return m.group(1).lower(), int(m.group(2)), options


def check_policy(policy):
    """Refuse, on one line, what several workers cannot share."""
    for listener in policy.listeners:
        listen = listener.listen
        if listen.lower().startswith("haproxy:"):
            listen = listen[len("haproxy:") :]
        if split_tcp(listen) is None:
            raise WorkersError(
                "%s: [listener %s] listen: workers > 1 needs a tcp: or tcp6: listener (SO_REUSEPORT), not %r"
                % (policy.path, listener.name, listener.listen)
            )
    status = policy.settings.status
    if status is not None and split_tcp(status) is None:
        raise WorkersError(
            "%s: [global] status: workers > 1 needs a tcp: status endpoint (worker i uses its port + i)"
            % policy.path
        )


def worker_settings(settings, count):
    """Each worker's share of the gateway-wide thresholds."""
    share = lambda value: max(1, math.ceil(value / count))  # noqa: E731
    return dataclasses.replace(
        settings,
        max_incomplete_high=share(settings.max_incomplete_high),
        max_incomplete_low=share(settings.max_incomplete_low),
        one_minute_high=share(settings.one_minute_high),
        one_minute_low=share(settings.one_minute_low),
        max_incomplete_host=share(settings.max_incomplete_host),
    )


def worker_status(description, index):
    """Worker ``index``'s status endpoint: the configured port plus ``index``."""
    kind, port, options = split_tcp(description)
    rest = "".join(":%s=%s" % (k, v.replace(":", "\\:")) for k, v in options.items())
    return "%s:%d%s" % (kind, port + index, rest)


class ReusePortService(service.Service):
    """Listen on a ``tcp:``/``tcp6:`` description with SO_REUSEPORT, shared with the other workers."""

    def __init__(self, reactor, description, factory):
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port = None

    def startService(self):
        """Bind (fatal on failure, like strports) and listen."""
        from twisted.internet.tcp import makeBinding

        service.Service.startService(self)
        kind, port, options = split_tcp(self.description)
        interface = options.get("interface", "::" if kind == "tcp6" else "")
        binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
        self.port = self.reactor.listenTCP(binding, self.factory, backlog=int(options.get("backlog", 50)))

    def stopService(self):
        """Stop accepting."""
        service.Service.stopService(self)
        if self.port is not None:
            return self.port.stopListening()


class DrainService(service.Service):
    """On stop, let the tracker's sessions finish (bounded), then abort the rest."""

    def __init__(self, tracker, clock, seconds=DRAIN_SECONDS):
        self.tracker = tracker
        self.clock = clock
        self.seconds = seconds

    def stopService(self):
        """Wait for the session table to empty, at most ``seconds``."""
        service.Service.stopService(self)
        if not self.tracker.sessions:
            return None
        log.info("Draining {count} sessions (at most {seconds} s)", count=len(self.tracker.sessions),
                 seconds=self.seconds)
        done = defer.Deferred()
        deadline = self.clock.seconds() + self.seconds

        def check():
            if not self.tracker.sessions:
                done.callback(None)
            elif self.clock.seconds() >= deadline:
                for session in list(self.tracker.sessions.values()):
                    if session.leg is not None:
                        session.leg.abortSession()
                done.callback(None)
            else:
                self.clock.callLater(0.1, check)

        check()
        return done


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool, index):
        self.pool = pool
        self.index = index
        self.ended = defer.Deferred()
        self.reader = None

    def childDataReceived(self, fd, data):
        # The worker's log channel (fd 3): its events, published here.
        if fd == 3:
            if self.reader is None:
                from mailguard.logs import EventReader

                self.reader = EventReader(self.index)
            self.reader.feed(data)

    def processEnded(self, reason):
        self.ended.callback(None)
        self.pool.workerEnded(self.index, reason)


class WorkerPool(service.Service):
    """The supervisor: starts ``count`` workers, restarts the dead, stops them on shutdown."""

    def __init__(self, reactor, config, count, debug=()):
        self.reactor = reactor
        self.config = os.path.abspath(config)
        self.count = count
        self.debug = tuple(debug)
        self.workers = {}
        self.restarts = 0
        self._stopping = False

    def startService(self):
        """Start every worker."""
        service.Service.startService(self)
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index):
        if self._stopping:
            return
        args = [sys.executable, "-m", "mailguard.workers", "--config", self.config,
                "--index", str(index), "--count", str(self.count), "--log-fd", "3"]
        for facility in self.debug:
            args += ["--debug", facility]
        proc = _WorkerProcess(self, index)
        transport = self.reactor.spawnProcess(
            proc, sys.executable, args, env=os.environ.copy(), childFDs={0: "w", 1: 1, 2: 2, 3: "r"}
        )
        proc.transport = transport
        self.workers[index] = proc
        log.info("Worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def workerEnded(self, index, reason):
        """A worker exited: start it again unless the gateway is stopping."""
        self.workers.pop(index, None)
        if self._stopping:
            return
        self.restarts += 1
        log.warn("WORKER_EXITED: worker {index} ended ({why}); restarting", tag="WORKER_EXITED", index=index,
                 why=reason.getErrorMessage())
        self.reactor.callLater(RESTART_DELAY, self._spawn, index)

    def stopService(self):
        """SIGTERM every worker (they drain), SIGKILL any still alive after the drain bound."""
        service.Service.stopService(self)
        self._stopping = True
        waits = []
        for proc in list(self.workers.values()):
            waits.append(proc.ended)
            try:
                proc.transport.signalProcess("TERM")
            except Exception:  # already gone
                pass
        if not waits:
            return None

        def kill():
            for proc in list(self.workers.values()):
                try:
                    proc.transport.signalProcess("KILL")
                except Exception:
                    pass

        timer = self.reactor.callLater(DRAIN_SECONDS + 10, kill)
        d = defer.DeferredList(waits)
        d.addCallback(lambda _: timer.cancel() if timer.active() else None)
        return d


def main(argv=None):
    """Run one worker: the whole chain on SO_REUSEPORT listeners, until SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mailguard.workers")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--debug", action="append", default=[])
    parser.add_argument("--log-fd", type=int, default=None, help="send every log event to the supervisor here")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from mailguard.inspectors import registry
    from mailguard.policy import PolicyError, load_policy
    from mailguard.service import build_service

    try:
        policy = load_policy(args.config, protocols=registry())
    except PolicyError as e:
        sys.stderr.write("%s\n" % e)
        return 1
    if args.log_fd is not None:
        # The supervisor writes them where twistd logs, in the policy's format.
        from mailguard.logs import forwarding_observer

        globalLogBeginner.beginLoggingTo([forwarding_observer(args.log_fd)])
    else:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    if args.debug:
        import dataclasses as dc

        policy = dc.replace(policy, settings=dc.replace(
            policy.settings, debug=policy.settings.debug | frozenset(args.debug)))
    top = build_service(policy, reactor, worker=(args.index, args.count))
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    # The supervisor's SIGTERM drains; Twisted's handler stops the reactor,
    # which runs the services' stopService (and so the drain) first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
