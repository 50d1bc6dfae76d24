"""Several worker processes sharing the listening ports (``[global] workers = N``).

The process twistd starts becomes a supervisor: it binds every listening
socket (before twistd daemonizes or drops privileges) but accepts on none.
Each listener gets N SO_REUSEPORT sockets, one per worker slot, so the
kernel spreads new connections evenly across the slots; the supervisor
starts N workers (``python -m mailguard.workers``) and hands worker ``i``
the sockets of slot ``i``.  A worker that dies is
started again, with its reason in the log; SIGTERM to the supervisor is
passed on, and each worker drains: it stops accepting, lets its sessions
finish for up to `DRAIN_SECONDS`, then closes what is left.  A worker whose
supervisor is gone, however it died, notices (its standard input, a pipe
from the supervisor, reaches its end) and drains the same way.

SIGHUP to the supervisor reloads: the new policy is checked, a new
generation of workers starts on it with the same sockets, and once all of
them accept, the old generation drains.  The sockets stay open in the
supervisor throughout, so no connection queued on them is lost.

The policy's thresholds are gateway-wide: each worker enforces its share
(the value divided by N, rounded up), which is what the kernel's even
spreading of connections makes add up to the configured totals.  Worker
``i``'s status endpoint is the configured port plus ``i``; its metrics
carry a ``worker`` label.
"""

import dataclasses
import json
import math
import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

log = Logger(namespace="mailguard")

#: How long a stopping worker lets its sessions finish.
DRAIN_SECONDS = 30
#: How long the supervisor waits before starting a dead worker again.
RESTART_DELAY = 1.0

#: How long a new generation of workers may take to accept, on a reload.
READY_SECONDS = 60
#: The file descriptor numbers a worker gets: its log channel, its ready pipe, then the sockets.
LOG_FD = 3
READY_FD = 4
FIRST_SOCKET_FD = 5


class WorkersError(Exception):
    """The policy cannot run with several workers; ``str()`` says why, on one line."""


def split_tcp(description):
    """``(kind, port, options)`` of a ``tcp:`` / ``tcp6:`` server description, or None."""
    from mailguard.endpoints import parse

    d = parse(description)
    port = d.get("port", 0)
    if d.proxied or d.kind not in ("tcp", "tcp6") or port is None or not port.isdigit():
        return None
    names = ("port", "interface", "backlog") if d.kind == "tcp" else ("port", "backlog", "interface")
    options = dict(zip(names[1:], d.args[1:]))
    options.update(d.kwargs)
    options.pop("port", None)
    return d.kind, int(port), options


def check_policy(policy):
    """Refuse, on one line, what several workers cannot share."""
    for listener in policy.listeners:
        from mailguard.endpoints import PROXY_PREFIX, proxied

        listen = listener.listen
        if proxied(listen):
            listen = listen[len(PROXY_PREFIX):]
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
    from mailguard.endpoints import escape

    kind, port, options = split_tcp(description)
    rest = "".join(":%s=%s" % (k, escape(v)) for k, v in options.items())
    return "%s:%d%s" % (kind, port + index, rest)


def adopt(reactor, description, fd, factory):
    """Accept on the listening socket ``fd`` the supervisor bound for ``description``.

    The port is taken off the reactor until its service starts; closing it
    closes this worker's copy only (the supervisor's stays open).
    """
    from mailguard.endpoints import tcp_address

    family = socket.AF_INET6 if tcp_address(description).family == "tcp6" else socket.AF_INET
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)  # adoptStreamPort keeps a copy of its own
    from mailguard.service import idle

    return idle(port)


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
    def __init__(self, pool, index, generation):
        self.pool = pool
        self.index = index
        self.generation = generation
        self.ready = False
        self.ended = defer.Deferred()
        self.transport = None
        self.reader = None

    def childDataReceived(self, fd, data):
        if fd == LOG_FD:
            # The worker's log channel: its events, published here.
            if self.reader is None:
                from mailguard.logs import EventReader

                self.reader = EventReader(self.index)
            self.reader.feed(data)
        elif fd == READY_FD and not self.ready and data:
            self.ready = True
            self.pool.workerReady(self)

    def processEnded(self, reason):
        self.ended.callback(None)
        self.pool.workerEnded(self, reason)


class WorkerPool(service.Service):
    """The supervisor: binds the sockets, starts ``count`` workers on them, restarts the dead, reloads.

    Made by `mailguard.service.makeService` before twistd daemonizes: the
    sockets are bound here, so a bind failure stops start-up with one line.
    """

    def __init__(self, reactor, config, policy, debug=()):
        self.reactor = reactor
        self.config = os.path.abspath(config)
        self.policy = policy
        self.count = policy.settings.workers
        self.debug = tuple(debug)
        #: Where a worker writes its own lines once it has lost the supervisor (twistd's --logfile).
        self.fallback_log = None
        self.workers = {}  # (generation, index) -> _WorkerProcess
        self.generation = 0
        self.restarts = 0
        self._stopping = False
        self._reloading = None
        self.sockets = {}  # listen text -> one bound port per worker slot (never read here)
        from mailguard.service import AddressLocks

        self.locks = AddressLocks()
        self.locks.acquire(policy)
        self.status = [self._bind_status(policy, i) for i in range(self.count)] if policy.settings.status else []
        self.sockets = self._bind_listeners(policy, {})

    def _bind_status(self, policy, index):
        from mailguard.policy import PolicyError
        from mailguard.service import bind

        try:
            return bind(self.reactor, worker_status(policy.settings.status, index), protocol.Factory())
        except ValueError as e:
            raise PolicyError(policy.path, "global", "status", str(e)) from None

    def _bind_listeners(self, policy, kept):
        """The sockets of ``policy``'s listeners: those in ``kept`` reused, the others bound now."""
        from mailguard.policy import PolicyError
        sockets = {}
        try:
            for listener in policy.listeners:
                if listener.listen in kept:
                    sockets[listener.listen] = kept[listener.listen]
                    continue
                sockets[listener.listen] = slots = []
                try:
                    for _ in range(self.count):
                        slots.append(_bind_shared(self.reactor, listener.listen, slots[0] if slots else None))
                except ValueError as e:
                    raise PolicyError(policy.path, "listener " + listener.name, "listen", str(e)) from None
        except BaseException:
            for listen, slots in sockets.items():
                if listen not in kept:
                    _close(slots)
            raise
        return sockets

    def startService(self):
        """Start every worker; SIGHUP reloads from now on."""
        from mailguard.service import install_reload_signal

        service.Service.startService(self)
        self.locks.write_pid()  # the daemon's pid, after twistd's fork
        for index in range(self.count):
            self._spawn(index, self.generation, self.sockets)
        install_reload_signal(self.reactor, self.reload)

    def _spawn(self, index, generation, sockets):
        if self._stopping:
            return
        fds = {0: "w", 1: 1, 2: 2, LOG_FD: "r", READY_FD: "r"}
        given = {}
        for number, (listen, slots) in enumerate(sorted(sockets.items()), FIRST_SOCKET_FD):
            fds[number] = slots[index].fileno()
            given[listen] = number
        if self.status:
            fds[FIRST_SOCKET_FD + len(given)] = self.status[index].fileno()
            given["status"] = FIRST_SOCKET_FD + len(given)
        args = [sys.executable, "-m", "mailguard.workers", "--config", self.config,
                "--index", str(index), "--count", str(self.count), "--sockets", json.dumps(given),
                "--log-fd", str(LOG_FD)]
        if self.fallback_log:
            args += ["--fallback-log", self.fallback_log]
        for facility in self.debug:
            args += ["--debug", facility]
        proc = _WorkerProcess(self, index, generation)
        proc.sockets = sockets
        transport = self.reactor.spawnProcess(proc, sys.executable, args, env=os.environ.copy(), childFDs=fds)
        proc.transport = transport
        self.workers[generation, index] = proc
        log.info("Worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def workerReady(self, proc):
        """A worker accepts: when the whole new generation of a reload does, the old one drains."""
        reload = self._reloading
        if reload is None or proc.generation != reload["generation"]:
            return
        if all(p.ready for (g, _), p in self.workers.items() if g == reload["generation"]):
            self._finish_reload()

    def workerEnded(self, proc, reason):
        """A worker exited: start it again unless it was told to stop (logged with its reason)."""
        if self.workers.get((proc.generation, proc.index)) is proc:
            del self.workers[proc.generation, proc.index]
        if self._stopping or getattr(proc, "retired", False):
            return
        reload = self._reloading
        if reload is not None and proc.generation == reload["generation"] and not proc.ready:
            self._abandon_reload("a new worker ended before accepting (%s)" % reason.getErrorMessage())
            return
        self.restarts += 1
        log.warn("WORKER_EXITED: worker {index} ended ({why}); restarting", tag="WORKER_EXITED",
                 index=proc.index, why=reason.getErrorMessage())
        self.reactor.callLater(RESTART_DELAY, self._respawn, proc)

    def _respawn(self, proc):
        if proc.generation == self.generation and (proc.generation, proc.index) not in self.workers:
            self._spawn(proc.index, proc.generation, self.sockets)

    # -- reload -------------------------------------------------------------------------

    def reload(self):
        """Check the policy file again; if it passes, replace the workers by new ones on it.

        The old workers drain only once every new one accepts; a policy that
        fails, or new workers that do not come up, leave the old ones serving.
        """
        from mailguard.inspectors import registry
        from mailguard.policy import PolicyError, load_policy
        from mailguard.service import _same_process_shape, check_addresses

        if self._stopping:
            return False
        if self._reloading is not None:
            log.warn("POLICY_RELOAD_FAILED: {error}", tag="POLICY_RELOAD_FAILED",
                     error="%s: a reload is already under way" % self.config)
            return False
        try:
            policy = load_policy(self.config, protocols=registry())
            _same_process_shape(self.policy, policy)
            check_addresses(policy)
            try:
                check_policy(policy)
            except WorkersError as e:
                raise PolicyError(policy.path, None, None, str(e).split(": ", 1)[-1]) from None
            new_locks = self.locks.acquire(policy)
            try:
                sockets = self._bind_listeners(policy, self.sockets)
            except PolicyError:
                self.locks.release(new_locks)
                raise
        except PolicyError as e:
            log.warn("POLICY_RELOAD_FAILED: {error}", tag="POLICY_RELOAD_FAILED", error=str(e))
            return False
        generation = self.generation + 1
        self._reloading = {"generation": generation, "policy": policy, "sockets": sockets,
                           "timer": self.reactor.callLater(READY_SECONDS, self._abandon_reload,
                                                           "new workers not accepting after %d s" % READY_SECONDS)}
        for index in range(self.count):
            self._spawn(index, generation, sockets)
        return True

    def _finish_reload(self):
        reload, self._reloading = self._reloading, None
        if reload["timer"].active():
            reload["timer"].cancel()
        old_sockets = self.sockets
        self.generation, self.policy, self.sockets = reload["generation"], reload["policy"], reload["sockets"]
        self.locks.keep_only(self.policy)
        retiring = [p for (g, _), p in self.workers.items() if g != self.generation]
        for proc in retiring:
            proc.retired = True
            _signal(proc, "TERM")
        removed = [slots for listen, slots in old_sockets.items() if listen not in self.sockets]
        if removed:
            # Closed once the old workers, their last users, have drained.
            done = defer.DeferredList([p.ended for p in retiring])
            done.addCallback(lambda _: [_close(slots) for slots in removed])
        log.info("POLICY_RELOADED: {path} ({count} workers started, {old} draining)", tag="POLICY_RELOADED",
                 path=self.config, count=self.count, old=len(retiring))

    def _abandon_reload(self, why):
        reload, self._reloading = self._reloading, None
        if reload is None:
            return
        if reload["timer"].active():
            reload["timer"].cancel()
        for (g, _), proc in list(self.workers.items()):
            if g == reload["generation"]:
                proc.retired = True
                _signal(proc, "KILL")
        for listen, slots in reload["sockets"].items():
            if listen not in self.sockets:
                _close(slots)
        self.locks.keep_only(self.policy)
        log.warn("POLICY_RELOAD_FAILED: {error}", tag="POLICY_RELOAD_FAILED", error="%s: %s" % (self.config, why))

    def stopService(self):
        """SIGTERM every worker (they drain), SIGKILL any still alive after the drain bound."""
        service.Service.stopService(self)
        self._stopping = True
        waits = []
        for proc in list(self.workers.values()):
            waits.append(proc.ended)
            _signal(proc, "TERM")
        for slots in list(self.sockets.values()) + [self.status]:
            _close(slots)
        if not waits:
            return None

        def kill():
            for proc in list(self.workers.values()):
                _signal(proc, "KILL")

        timer = self.reactor.callLater(DRAIN_SECONDS + 10, kill)
        d = defer.DeferredList(waits)
        d.addCallback(lambda _: timer.cancel() if timer.active() else None)
        return d


def _bind_shared(reactor, description, first=None):
    """One SO_REUSEPORT socket for a worker slot of the ``tcp:``/``tcp6:`` listener ``description``.

    ``first`` is the listener's first slot: the others take its port (the
    one the kernel chose, for port 0).  The socket is not read here.
    """
    from twisted.internet import error
    from twisted.internet.tcp import makeBinding

    from mailguard.endpoints import EndpointError, bind_description, tcp_address
    from mailguard.service import idle, listen_error

    address = tcp_address(bind_description(description))
    port = first.getHost().port if first is not None else address.port
    binding = makeBinding(address.interface, port, reuseAddress=True, reusePort=True)
    try:
        return idle(reactor.listenTCP(binding, protocol.Factory(), backlog=address.backlog))
    except error.CannotListenError as e:
        raise EndpointError(listen_error(e, description)) from None


def _close(ports):
    for port in ports:
        port.stopListening()


def _signal(proc, name):
    try:
        proc.transport.signalProcess(name)
    except Exception:  # already gone
        pass


class _Supervisor:
    """Reads the worker's end of the pipe from its supervisor: its end means the supervisor is gone."""

    def __init__(self, reactor, fd=0):
        self.reactor = reactor
        self.fd = fd
        self.stopping = False
        os.set_blocking(fd, False)
        reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self):
        self.stopping = True

    def fileno(self):
        """The pipe's file descriptor."""
        return self.fd

    def doRead(self):
        """Nothing is ever written: end of file (or an error) is the supervisor's death."""
        from twisted.internet import main

        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return main.CONNECTION_DONE
        return None

    def connectionLost(self, reason):
        """Drain and exit, as on SIGTERM."""
        if self.stopping:
            return  # already draining (SIGTERM); the supervisor closes its end when done
        log.warn("SUPERVISOR_LOST: the supervisor is gone; draining and exiting", tag="SUPERVISOR_LOST")
        # After a SIGTERM that may be under way (its stop runs first).
        self.reactor.callLater(0.2, self._stop)

    def _stop(self):
        from twisted.internet.error import ReactorNotRunning

        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def logPrefix(self):
        """For Twisted's log lines about this reader."""
        return "supervisor"


def _fallback(path):
    """An observer appending text lines to ``path`` (opened on first use), or None for standard output."""
    if not path:
        return None
    from twisted.logger import textFileLogObserver

    opened = []

    def observe(event):
        if not opened:
            try:
                opened.append(textFileLogObserver(open(path, "a", encoding="utf-8")))
            except OSError:
                opened.append(textFileLogObserver(sys.__stdout__))
        opened[0](event)

    return observe


def main(argv=None):
    """Run one worker: the whole chain on the supervisor's sockets, until SIGTERM or its death."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mailguard.workers")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--sockets", required=True, help="JSON: listen text (or status) -> file descriptor")
    parser.add_argument("--debug", action="append", default=[])
    parser.add_argument("--log-fd", type=int, default=None, help="send every log event to the supervisor here")
    parser.add_argument("--fallback-log", default=None,
                        help="the supervisor's log file, written directly once the supervisor is gone")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from mailguard.inspectors import registry
    from mailguard.policy import PolicyError, load_policy
    from mailguard.service import _with_debug, build_service

    sockets = json.loads(args.sockets)
    try:
        policy = _with_debug(load_policy(args.config, protocols=registry()), args.debug)
        missing = [listener.listen for listener in policy.listeners if listener.listen not in sockets]
        if missing:
            raise PolicyError(policy.path, None, None, "changed under the supervisor (no socket for %s)" % missing[0])
        top = build_service(policy, reactor, worker=(args.index, args.count), sockets=sockets)
    except PolicyError as e:
        sys.stderr.write("%s\n" % e)
        return 1
    if args.log_fd is not None:
        # The supervisor writes them where twistd logs, in the policy's format.
        from mailguard.logs import forwarding_observer

        forwarder = forwarding_observer(args.log_fd, _fallback(args.fallback_log))
        forwarder.batch_with(reactor)
        globalLogBeginner.beginLoggingTo([forwarder])
    else:
        forwarder = None
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.addReader(_Supervisor(reactor))
    # The supervisor's SIGTERM drains; Twisted's handler stops the reactor,
    # which runs the services' stopService (and so the drain) first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal's hang-up is the supervisor's to handle

    def ready():
        try:
            os.write(READY_FD, b"ready\n")
            os.close(READY_FD)
        except OSError:
            pass

    reactor.callWhenRunning(ready)
    reactor.run()
    if forwarder is not None:
        forwarder.flush()  # what the last turns logged (the drain, the shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
