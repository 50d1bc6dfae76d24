"""Tests for the status endpoint (/metrics, /sessions) and the `mailguard show` commands."""

import io
import re
import json
import os
import subprocess
import sys
import urllib.request

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, endpoints, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from mailguard import cli
from mailguard.events import Alert
from mailguard.policy import GlobalSettings, Listener, PolicyError, Rule, parse_policy
from mailguard.service import build_service, listener_factory
from mailguard.status import MetricsPage, SessionsPage, StatusRoot, registry_for, status_site
from mailguard.tracker import SessionTracker
from tests.backends import RecordingBackend, listenBackend
from tests.clients import LockstepClient, wait_for
from tests.test_tracker import Harness
from tests.clients import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POLICY = """\
[global]
max-incomplete-high = 500
max-incomplete-low = 400
one-minute-high = 500
one-minute-low = 400
max-incomplete-host = 50
block-time = 0
synwait-time = 30
finwait-time = 5
idle-time = 3600
alert = on
audit-trail = off
{status}

[inspect OUT-IN]
protocol = esmtp
max-data = 20000000
audit-trail = on

[inspect RAW]
protocol = tcp
alert = off
timeout = 60

[listener mail]
listen = tcp:2525:interface=127.0.0.1
backend = tcp:host=127.0.0.1:port=2526
inspect = OUT-IN

[listener raw]
listen = tcp:2626:interface=127.0.0.1
backend = tcp:host=127.0.0.1:port=2627
inspect = RAW
"""


def samples(text):
    """The samples of a Prometheus text exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out




class MetricsTests(SynchronousTestCase):
    """The collector reads the tracker at scrape time."""

    def scenario(self):
        """A tracker with an incomplete, an open and a closed session, a refusal and an alert."""
        h = Harness(max_incomplete_host=1)
        incomplete = h.admit("10.0.0.1")
        opened = h.admit("10.0.0.2")
        h.clock.advance(0.02)
        opened.set_responder(IPv4Address("TCP", "192.0.2.9", 25))
        h.tracker.opened(opened)
        opened.client_bytes, opened.server_bytes = 100, 200
        opened.leg.inspector.commands = 4
        opened.leg.inspector.verbs.update({b"EHLO": 1, b"MAIL": 2})
        done = h.admit("10.0.0.3")
        done.client_bytes, done.server_bytes = 10, 20
        done.leg.inspector.verbs.update({b"MAIL": 1})
        h.tracker.closed(done)
        h.connect("10.0.0.1")
        h.tracker.alert(opened, Alert("SMTP_INVALID_COMMAND", "bad"))
        self.assertEqual(incomplete.state, "incomplete")
        return h

    def scrape(self, tracker):
        """One scrape of the tracker's private registry."""
        return samples(prometheus_client.generate_latest(registry_for(tracker)).decode())

    def test_names_and_values(self):
        """Sessions by state, totals, refusals, bytes, commands, alerts and connect times are exposed."""
        h = self.scenario()
        got = self.scrape(h.tracker)
        expected = {
            ("mailguard_sessions", (("state", "incomplete"),)): 1,
            ("mailguard_sessions", (("state", "open"),)): 1,
            ("mailguard_sessions", (("state", "closing"),)): 0,
            ("mailguard_sessions_total", ()): 3,
            ("mailguard_refused_total", (("reason", "max-incomplete-host"),)): 1,
            ("mailguard_refused_total", (("reason", "max-incomplete"),)): 0,
            ("mailguard_refused_total", (("reason", "one-minute"),)): 0,
            ("mailguard_refused_total", (("reason", "block-time"),)): 0,
            ("mailguard_bytes_total", (("direction", "from_client"),)): 110,
            ("mailguard_bytes_total", (("direction", "from_server"),)): 220,
            ("mailguard_commands_total", (("verb", "EHLO"),)): 1,
            ("mailguard_commands_total", (("verb", "MAIL"),)): 3,
            ("mailguard_client_commands_total", ()): 4,
            ("mailguard_illegal_commands_total", ()): 1,
            ("mailguard_alerts_total", (("tag", "HOST_TCP_ALERT_ON"),)): 1,
            ("mailguard_alerts_total", (("tag", "SMTP_INVALID_COMMAND"),)): 1,
            ("mailguard_backend_connect_seconds_count", ()): 1,
            ("mailguard_backend_connect_seconds_bucket", (("le", "0.01"),)): 0,
            ("mailguard_backend_connect_seconds_bucket", (("le", "0.05"),)): 1,
            ("mailguard_one_minute_sessions", ()): 3,
            ("mailguard_aggressive", ()): 0,
            ("mailguard_blocked_hosts", ()): 0,
        }
        self.assertEqual({key: got.get(key) for key in expected}, expected)

    def test_counters_survive_session_end(self):
        """Bytes and commands of a session stay counted once it has left the table."""
        h = self.scenario()
        before = self.scrape(h.tracker)
        for session in list(h.tracker.sessions.values()):
            h.tracker.closed(session)
            h.tracker.server_closed(session)
        after = self.scrape(h.tracker)
        self.assertEqual(h.tracker.sessions, {})
        for key in [("mailguard_bytes_total", (("direction", "from_client"),)),
                    ("mailguard_commands_total", (("verb", "MAIL"),)),
                    ("mailguard_client_commands_total", ())]:
            self.assertEqual(after[key], before[key])

    def test_read_at_scrape_time(self):
        """A scrape sees the counters as they are at that moment."""
        h = self.scenario()
        session = h.tracker.sessions[2]
        session.client_bytes += 1000
        got = self.scrape(h.tracker)
        self.assertEqual(got["mailguard_bytes_total", (("direction", "from_client"),)], 1110)

    def test_aggressive_gauge_follows_the_clock(self):
        """A scrape sees aggressive mode end once the one-minute rate has decayed, with no new connection."""
        h = Harness(one_minute_high=2, one_minute_low=1)
        for _ in range(2):
            h.tracker.opened(h.admit())
        h.connect()
        self.assertEqual(self.scrape(h.tracker)["mailguard_aggressive", ()], 1)
        h.clock.advance(61)
        self.assertEqual(self.scrape(h.tracker)["mailguard_aggressive", ()], 0)
        self.assertEqual(h.tracker.alerts["ALERT_OFF"], 1)

    def test_private_registry(self):
        """The gateway's metrics are not in prometheus_client's global registry."""
        self.scenario()
        self.assertNotIn(b"mailguard_", prometheus_client.generate_latest(prometheus_client.REGISTRY))


class PageTests(SynchronousTestCase):
    """The resources of the status site, rendered directly."""

    def test_metrics_page(self):
        """/metrics is the Prometheus text format with its content type."""
        h = Harness()
        h.admit()
        request = DummyRequest([b"metrics"])
        body = MetricsPage(registry_for(h.tracker)).render_GET(request)
        self.assertEqual(samples(body.decode())["mailguard_sessions", (("state", "incomplete"),)], 1)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [prometheus_client.CONTENT_TYPE_LATEST.encode()],
        )

    def test_sessions_page(self):
        """/sessions is the tracker's snapshot as JSON."""
        h = Harness()
        h.admit()
        request = DummyRequest([b"sessions"])
        body = SessionsPage(h.tracker).render_GET(request)
        self.assertEqual(json.loads(body), h.tracker.snapshot())
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])

    def test_index(self):
        """/ lists the pages."""
        body = StatusRoot().render_GET(DummyRequest([b""]))
        self.assertIn(b"/metrics", body)
        self.assertIn(b"/sessions", body)

    def test_site(self):
        """The site serves /metrics and /sessions and writes no access log."""
        site = status_site(Harness().tracker, reactor)
        self.assertIsInstance(site.resource.getStaticEntity(b"metrics"), MetricsPage)
        self.assertIsInstance(site.resource.getStaticEntity(b"sessions"), SessionsPage)
        self.assertIsNone(site.log(DummyRequest([b"metrics"])))


class StatusKeyTests(SynchronousTestCase):
    """[global] status in the policy and in the service."""

    def test_absent_is_off(self):
        """Without a status key there is no status endpoint."""
        # Building binds the listeners: port 0, never one another test may hold.
        policy = parse_policy(POLICY.format(status="").replace("tcp:2525", "tcp:0").replace("tcp:2626", "tcp:0"))
        self.assertIsNone(policy.settings.status)
        service = build_service(policy, reactor)
        self.assertFalse([s for s in service if isinstance(getattr(s, "factory", None), server.Site)])

    def test_endpoint(self):
        """A status key is kept as written and becomes a web service of the gateway."""
        policy = parse_policy(POLICY.format(status="status = tcp:0:interface=127.0.0.1").replace("tcp:2525", "tcp:0").replace("tcp:2626", "tcp:0"))
        self.assertEqual(policy.settings.status, "tcp:0:interface=127.0.0.1")
        service = build_service(policy, reactor)
        (web,) = [s for s in service if isinstance(getattr(s, "factory", None), server.Site)]
        self.assertIs(web.factory.resource.getStaticEntity(b"sessions").tracker, service.tracker)

    def test_bad_endpoint(self):
        """A status key that is not a server endpoint description is a one-line policy error."""
        with self.assertRaises(PolicyError) as cm:
            parse_policy(POLICY.format(status="status = http://localhost:8025"))
        self.assertTrue(str(cm.exception).startswith("<policy>: [global] status: bad value 'http://localhost:8025'"))


class ShowInspectTests(SynchronousTestCase):
    """`mailguard show inspect all`."""

    def run_cli(self, *argv):
        """Run the command line; return (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def policy_file(self, status=""):
        """Write the test policy; return its path."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(POLICY.format(status=status))
        return path

    def test_show_inspect_all(self):
        """The configuration is printed in the shape of IOS `show ip inspect all`."""
        code, out, err = self.run_cli("show", "inspect", "all", "-c", self.policy_file("status = tcp:8025:interface=127.0.0.1"))
        self.assertEqual((code, err), (0, ""))
        # The rules' key = value lines and the log/control lines are tested in test_cli.
        shape = [line for line in out.splitlines()
                 if not re.match(r"    [a-z0-9-]+ = ", line) and not line.startswith(("Log format", "Control socket"))]
        self.assertEqual(
            shape,
            [
                "Session audit trail is disabled",
                "Session alert is enabled",
                "one-minute (sampling period) thresholds are [400:500] connections",
                "max-incomplete sessions thresholds are [400:500]",
                "max-incomplete tcp connections per host is 50. Block-time 0 minute.",
                "tcp synwait-time is 30 sec -- tcp finwait-time is 5 sec",
                "tcp idle-time is 3600 sec",
                "Status endpoint is tcp:8025:interface=127.0.0.1",
                "Debugging is off",
                "Inspection Rule Configuration",
                " Inspection name OUT-IN",
                "    esmtp max-data 20000000 alert is on audit-trail is on timeout 3600",
                " Inspection name RAW",
                "    tcp alert is off audit-trail is off timeout 60",
                "Listener Configuration",
                " Listener mail",
                "  Listening on tcp:2525:interface=127.0.0.1, backend tcp:host=127.0.0.1:port=2526",
                "  Inspection rule is OUT-IN",
                "    esmtp max-data 20000000 alert is on audit-trail is on timeout 3600",
                " Listener raw",
                "  Listening on tcp:2626:interface=127.0.0.1, backend tcp:host=127.0.0.1:port=2627",
                "  Inspection rule is RAW",
                "    tcp alert is off audit-trail is off timeout 60",
            ],
        )

    def test_bad_policy(self):
        """A policy that does not load: its one-line error and exit 1."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[global]\nblock-time = soon\n")
        code, out, err = self.run_cli("show", "inspect", "all", "-c", path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("block-time", err)

    def test_show_sessions_without_status_key(self):
        """`show sessions` with a policy that has no status key: one line on stderr, exit 1."""
        code, out, err = self.run_cli("show", "sessions", "-c", self.policy_file())
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("[global] status is not set", err)

    def test_show_sessions_nothing_answers(self):
        """`show sessions` when nothing listens at the status endpoint: one line on stderr, exit 1."""
        path = self.policy_file("status = tcp:%d:interface=127.0.0.1" % free_port())
        code, out, err = self.run_cli("show", "sessions", "-c", path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("no answer from the status endpoint", err)

    def test_status_targets(self):
        """Where `show sessions` connects for each kind of status endpoint."""
        self.assertEqual(cli.status_target("tcp:8025:interface=127.0.0.1"), ("url", "http://127.0.0.1:8025"))
        self.assertEqual(cli.status_target("tcp:port=8025"), ("url", "http://127.0.0.1:8025"))
        self.assertEqual(cli.status_target("tcp:8025:interface=0.0.0.0"), ("url", "http://127.0.0.1:8025"))
        self.assertEqual(cli.status_target(r"tcp6:8025:interface=\:\:1"), ("url", "http://[::1]:8025"))
        self.assertEqual(cli.status_target("unix:/run/mailguard.sock"), ("unix", "/run/mailguard.sock"))
        self.assertRaises(ValueError, cli.status_target, "ssl:8443:privateKey=k.pem")

    def test_session_lines(self):
        """One IOS-like line per session, and the details with --detail."""
        table = {
            "aggressive": False,
            "incomplete": 0,
            "one_minute_rate": 1,
            "blocked_hosts": [],
            "sessions": [
                {"id": 12, "initiator": "127.0.0.1:40312", "responder": "127.0.0.1:2526", "protocol": "esmtp",
                 "state_name": "SIS_OPEN", "client_bytes": 1834, "server_bytes": 412, "age": 72.5, "idle": 1.2,
                 "listener": "mail", "rule": "OUT-IN", "commands": 7, "phase": "COMMAND"},
            ],
        }
        line = "Session 12 (127.0.0.1:40312)=>(127.0.0.1:2526) esmtp SIS_OPEN bytes [1834:412] age 00:01:12"
        self.assertEqual(cli.session_lines(table), [line])
        self.assertEqual(
            cli.session_lines(table, detail=True),
            [
                line,
                "  Created 00:01:12, Last heard 00:00:01",
                "  Bytes sent (initiator:responder) [1834:412]",
                "  Listener mail, rule OUT-IN, commands 7, phase COMMAND",
                "Half-open 0, 1-min rate 1, aggressive no, blocked hosts: none",
            ],
        )
        self.assertEqual(cli.session_lines({"sessions": []}), ["No sessions"])


class LiveStatusTests(TestCase):
    """The status endpoint of a gateway with a live session, over real HTTP."""

    timeout = 60

    @defer.inlineCallbacks
    def test_metrics_and_show_sessions(self):
        """/metrics and `mailguard show sessions` both show an open session."""
        backend = RecordingBackend()
        bport = listenBackend(self, backend)
        rule = Rule(name="LIVE", protocol="esmtp")
        listener = Listener(name="live", listen="tcp:0", backend="tcp:127.0.0.1:%d" % bport, rule=rule)
        tracker = SessionTracker(GlobalSettings(), reactor)
        gateway = reactor.listenTCP(
            0,
            listener_factory(listener, tracker, reactor, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", bport)),
            interface="127.0.0.1",
        )
        self.addCleanup(gateway.stopListening)
        status = reactor.listenTCP(0, status_site(tracker, reactor), interface="127.0.0.1")
        self.addCleanup(status.stopListening)
        self.addCleanup(lambda: wait_for(lambda: not tracker.sessions))
        sport = status.getHost().port

        client = yield deferToThread(LockstepClient, gateway.getHost().port)
        self.addCleanup(client.close)
        reply = yield deferToThread(client.command, b"EHLO client.example")
        self.assertTrue(reply.startswith(b"250"), reply)

        def get(path):
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (sport, path), timeout=10) as response:
                return response.read()

        metrics = samples((yield deferToThread(get, "/metrics")).decode())
        self.assertEqual(metrics["mailguard_sessions", (("state", "open"),)], 1)
        self.assertEqual(metrics["mailguard_sessions_total", ()], 1)
        self.assertEqual(metrics["mailguard_commands_total", (("verb", "EHLO"),)], 1)
        self.assertGreater(metrics["mailguard_bytes_total", (("direction", "from_server"),)], 0)

        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(POLICY.format(status="status = tcp:%d:interface=127.0.0.1" % sport))

        def show(*extra):
            return subprocess.run(
                [sys.executable, "-m", "mailguard.cli", "show", "sessions", "-c", path, *extra],
                cwd=ROOT, capture_output=True, text=True, timeout=30,
            )

        result = yield deferToThread(show)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        (line,) = result.stdout.splitlines()
        self.assertRegex(
            line,
            r"^Session \d+ \(127\.0\.0\.1:\d+\)=>\(127\.0\.0\.1:%d\) esmtp SIS_OPEN bytes \[\d+:\d+\] age \d\d:\d\d:\d\d$"
            % bport,
        )
        result = yield deferToThread(show, "--detail")
        self.assertEqual(result.returncode, 0)
        self.assertIn("  Listener live, rule LIVE, commands 1, phase COMMAND", result.stdout.splitlines())


class MessageSizeMetricTests(SynchronousTestCase):
    """The message-size histogram."""

    def test_sizes_counted(self):
        """Each message the inspector sends to the backend lands in the size histogram."""
        from prometheus_client import generate_latest
        from twisted.internet.task import Clock

        from mailguard.events import MessageSent
        from mailguard.policy import GlobalSettings
        from mailguard.status import registry_for
        from mailguard.tracker import SessionTracker

        tracker = SessionTracker(GlobalSettings(), Clock())
        tracker.event(None, MessageSent(2048))
        tracker.event(None, MessageSent(100))
        text = generate_latest(registry_for(tracker)).decode()
        self.assertIn('mailguard_message_size_bytes_bucket{le="1024.0"} 1.0', text)
        self.assertIn('mailguard_message_size_bytes_bucket{le="10240.0"} 2.0', text)
        self.assertIn("mailguard_message_size_bytes_sum 2148.0", text)
