"""Scale-out behind HAProxy: two gateways behind Debian's haproxy speaking PROXY v2."""

import os
import shutil
import smtplib
import subprocess
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from mailguard.policy import GlobalSettings, Rule
from tests.backends import RecordingBackend, listenBackend
from tests.clients import wait_for
from tests.harness import start_gateway
from tests.test_gateway import GatewayTestCase
from tests.test_plugin import free_port

HAPROXY_CONFIG = """
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{front}
    default_backend gateways
backend gateways
    balance roundrobin
    server gw1 127.0.0.1:{gw1} send-proxy-v2
    server gw2 127.0.0.1:{gw2} send-proxy-v2
"""


class HAProxyScaleOutTests(GatewayTestCase):
    """HAProxy in TCP mode in front of two mailguard instances."""

    timeout = 60

    def gateway_behind_proxy(self, backend_port, settings):
        rule = Rule(name="H", protocol="esmtp", audit_trail=True)
        return start_gateway(self, rule, backend_port, settings, listen="haproxy:tcp:0")

    @defer.inlineCallbacks
    def test_two_gateways(self):
        """A message goes through each gateway; the audit trail and per-host accounting see the real client."""
        if shutil.which("haproxy") is None:
            raise SkipTest("haproxy is not installed (apt-get install haproxy; .ci/run does)")
        backend = RecordingBackend()
        bport = listenBackend(self, backend)
        settings = GlobalSettings(max_incomplete_host=5)
        (t1, p1), (t2, p2) = self.gateway_behind_proxy(bport, settings), self.gateway_behind_proxy(bport, settings)
        front = free_port()
        config = os.path.join(os.path.abspath(self.mktemp()) + ".cfg")
        with open(config, "w") as f:
            f.write(HAPROXY_CONFIG.format(front=front, gw1=p1, gw2=p2))
        proc = subprocess.Popen(["haproxy", "-db", "-f", config], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

        def stop():
            proc.terminate()
            proc.wait(30)

        self.addCleanup(stop)

        def send_two():
            deadline = time.monotonic() + 20
            ports = []
            for i in range(2):
                while True:
                    try:
                        client = smtplib.SMTP("127.0.0.1", front, timeout=10)
                        break
                    except (OSError, smtplib.SMTPServerDisconnected):
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise
                        time.sleep(0.1)
                with client:
                    ports.append(client.sock.getsockname()[1])
                    client.sendmail("a@example.org", ["b@example.org"], b"Subject: %d\r\n\r\nvia haproxy\r\n" % i)
            return ports

        ports = yield deferToThread(send_two)
        yield wait_for(lambda: len(self.alerts("SESS_AUDIT_TRAIL")) >= 2)
        self.assertEqual(len(backend.messages), 2)
        initiators = sorted(e["initiator"] for e in self.alerts("SESS_AUDIT_TRAIL"))
        self.assertEqual(initiators, sorted("127.0.0.1:%d" % p for p in ports))
        # Round robin: each gateway carried one session, and counted it for the real client.
        self.assertEqual((t1.admitted_total, t2.admitted_total), (1, 1))
