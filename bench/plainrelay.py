"""Row (b) of the benchmark: a plain Twisted TCP relay (``twisted.protocols.portforward``).

    python bench/plainrelay.py LISTEN_PORT BACKEND_PORT [--no-nodelay]

Listens on 127.0.0.1:LISTEN_PORT and forwards every connection to
127.0.0.1:BACKEND_PORT, with portforward's producer/consumer coupling of the
two legs.  TCP_NODELAY is set on both legs (as mailguard does), because
without it the baseline itself stalls ~40 ms on each reply that follows a
large write, and every ratio against it would flatter the gateway.  No
logging: the relay does nothing but move bytes, which is the point of the
row.
"""

import argparse
import sys

from twisted.internet import endpoints
from twisted.protocols import portforward


#: Set TCP_NODELAY on both legs (``--no-nodelay`` clears it).
NODELAY = True


def _nodelay(transport):
    if not NODELAY:
        return
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass


class NoDelayClient(portforward.ProxyClient):
    """The backend leg, with TCP_NODELAY."""

    def connectionMade(self):
        """Set TCP_NODELAY, then couple the legs as portforward does."""
        _nodelay(self.transport)
        super().connectionMade()


class NoDelayClientFactory(portforward.ProxyClientFactory):
    """Builds the backend leg; quiet (portforward's factory logs every connection)."""

    protocol = NoDelayClient
    noisy = False


class NoDelayServer(portforward.ProxyServer):
    """The client leg, with TCP_NODELAY."""

    clientProtocolFactory = NoDelayClientFactory

    def connectionMade(self):
        """Set TCP_NODELAY, then connect the backend leg as portforward does."""
        _nodelay(self.transport)
        super().connectionMade()


class NoDelayFactory(portforward.ProxyFactory):
    """portforward's ProxyFactory with the TCP_NODELAY legs."""

    protocol = NoDelayServer
    noisy = False


def main(argv=None):
    """Run the relay until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("listen", type=int)
    parser.add_argument("backend", type=int)
    parser.add_argument("--no-nodelay", action="store_true", help="leave Nagle on (portforward as shipped)")
    args = parser.parse_args(argv)

    global NODELAY
    NODELAY = not args.no_nodelay
    from twisted.internet import reactor

    factory = NoDelayFactory("127.0.0.1", args.backend)
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.listen, backlog=4096, interface="127.0.0.1")
    d = endpoint.listen(factory)

    def failed(f):
        sys.stderr.write("plainrelay: cannot listen: %s\n" % f.getErrorMessage())
        reactor.stop()

    d.addErrback(failed)
    reactor.run()


if __name__ == "__main__":
    main()
