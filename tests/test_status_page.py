"""Tests for the status page (/), /status.json, the alert and rate rings behind them, and the check warning."""

import atexit
import base64
import io
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import redirect_stderr, redirect_stdout

from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from mailguard.cli import main as cli_main
from mailguard.events import Alert, MessageSent
from mailguard.policy import GlobalSettings
from mailguard.status import (
    CONTENT_SECURITY_POLICY,
    StatusJSONPage,
    StatusRoot,
    StatusSource,
    exposure,
    gateway_view,
    registry_for,
    status_site,
    worker_view,
)
from mailguard.statuspage import render_page
from mailguard.tracker import ALERT_RING, SAMPLE_COUNT, SAMPLE_INTERVAL, WATCH_SECONDS, SessionTracker
from tests.test_plugin import TWISTD, free_port
from tests.test_tracker import Harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The stable top-level keys of /status.json (the README documents each).
STATUS_KEYS = {
    "schema", "time", "version", "policy", "started", "uptime", "listeners", "thresholds", "workers", "mode",
    "aggressive_workers", "aggressive_reasons", "sessions_by_state", "incomplete", "one_minute_rate",
    "blocked_hosts", "totals", "rates", "message_sizes", "sessions", "alerts", "counters",
}


def view_of(source):
    """The gateway view ``source`` gives (synchronously: no peers)."""
    out = []
    source.gateway().addCallback(out.append)
    return out[0]


class AlertRingTests(SynchronousTestCase):
    """The tracker keeps the last alerts in a bounded ring."""

    def test_newest_first_and_bounded(self):
        """Only the last ALERT_RING alerts are kept, newest first, with tag, client and text."""
        h = Harness()
        session = h.admit("10.0.0.7")
        for i in range(ALERT_RING + 25):
            h.clock.advance(1)
            h.tracker.alert(session, Alert("SMTP_INVALID_COMMAND", "bad %d" % i))
        ring = h.tracker.alert_ring()
        self.assertEqual(len(ring), ALERT_RING)
        self.assertEqual(ring[0][1:], ("SMTP_INVALID_COMMAND", "10.0.0.7:40000", "bad %d" % (ALERT_RING + 24)))
        self.assertEqual(ring[-1][3], "bad 25")
        self.assertGreater(ring[0][0], ring[-1][0])

    def test_tracker_alerts_formatted(self):
        """The tracker's own alerts (HOST_TCP_ALERT_ON) are kept with their host and formatted text."""
        h = Harness(max_incomplete_host=1)
        h.admit("10.0.0.1")
        h.connect("10.0.0.1")
        (when, tag, client, text), = h.tracker.alert_ring()
        self.assertEqual((tag, client), ("HOST_TCP_ALERT_ON", "10.0.0.1"))
        self.assertEqual(text, "HOST_TCP_ALERT_ON: Max tcp half-open connections (1) exceeded for host 10.0.0.1")

    def test_session_text_not_formatted(self):
        """An inspector's alert text is kept as it is, braces and all."""
        h = Harness()
        h.tracker.alert(h.admit(), Alert("SMTP_INVALID_REPLY", "invalid reply from server: {host}"))
        self.assertEqual(h.tracker.alert_ring()[0][3], "invalid reply from server: {host}")


class SamplerTests(SynchronousTestCase):
    """The rate samples: one timer on the tracker's clock, only while the status is asked for."""

    def test_nothing_until_watched(self):
        """A tracker nobody asked for its status samples nothing and schedules nothing for it."""
        h = Harness()
        h.admit()
        h.clock.advance(3600)
        self.assertEqual(len(h.tracker.samples), 0)
        self.assertIsNone(h.tracker._sampler)

    def test_one_timer_and_it_stops(self):
        """Watching arms one timer; asking again arms no second; it stops WATCH_SECONDS after the last ask."""
        clock = Clock()
        tracker = SessionTracker(GlobalSettings(), clock)
        tracker.watch()
        tracker.watch()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(SAMPLE_INTERVAL)
        self.assertEqual(len(tracker.samples), 2)
        for _ in range(WATCH_SECONDS // SAMPLE_INTERVAL + 2):
            clock.advance(SAMPLE_INTERVAL)
        self.assertEqual(clock.getDelayedCalls(), [])
        taken = len(tracker.samples)
        clock.advance(600)
        self.assertEqual(len(tracker.samples), taken)

    def test_page_left_open_stays_bounded(self):
        """A page refreshing every 1.5 s for longer than the charts span keeps SAMPLE_COUNT samples and one timer."""
        h = Harness()
        source = StatusSource(h.tracker, h.clock, registry_for(h.tracker))
        session = h.admit()
        for i in range(int(SAMPLE_COUNT * SAMPLE_INTERVAL * 1.3 / 1.5)):
            if i % 7 == 0:
                h.tracker.event(session, MessageSent(500))
                h.tracker.alert(session, Alert("SMTP_INVALID_COMMAND", "bad"))
            view_of(source)
            h.clock.advance(1.5)
        self.assertEqual(len(h.tracker.samples), SAMPLE_COUNT)
        self.assertEqual(len(h.tracker.recent_alerts), ALERT_RING)
        self.assertEqual(len([c for c in h.clock.getDelayedCalls() if c.func == h.tracker._take_sample]), 1)
        self.assertLessEqual(len(view_of(source)["rates"]["points"]), SAMPLE_COUNT)

    def test_stop_cancels(self):
        """Stopping the tracker cancels the sampler."""
        clock = Clock()
        tracker = SessionTracker(GlobalSettings(), clock)
        tracker.watch()
        tracker.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_rates(self):
        """Rates are per second between samples; the last point runs up to the moment of the request."""
        h = Harness()
        source = StatusSource(h.tracker, h.clock, registry_for(h.tracker))
        view_of(source)
        for _ in range(10):
            h.admit()
        h.tracker.event(None, MessageSent(100))
        h.clock.advance(SAMPLE_INTERVAL)
        h.tracker.event(None, MessageSent(100))
        h.clock.advance(1)
        points = view_of(source)["rates"]["points"]
        self.assertEqual([(p["admitted"], p["messages"], p["live"]) for p in points],
                         [(10 / SAMPLE_INTERVAL, 1 / SAMPLE_INTERVAL, False), (0.0, 1.0, True)])


class ViewTests(SynchronousTestCase):
    """/status.json: one worker's view, and the gateway's merged from the workers'."""

    def test_keys(self):
        """The gateway view has the documented keys, the session rows TLS on each leg."""
        h = Harness()
        h.admit("10.0.0.9")
        view = view_of(StatusSource(h.tracker, h.clock, registry_for(h.tracker)))
        self.assertEqual(set(view), STATUS_KEYS)
        self.assertEqual(view["schema"], 1)
        (row,) = view["sessions"]
        self.assertEqual((row["initiator"], row["tls_client"], row["tls_server"], row["worker"]),
                         ("10.0.0.9:40000", False, False, None))
        json.dumps(view)

    def test_tls_on_each_leg(self):
        """A leg whose transport runs TLS (STARTTLS done, or implicit TLS) shows as such in its row."""
        from twisted.internet.interfaces import ISSLTransport
        from zope.interface import directlyProvides

        class Transport:
            TLS = False

        class Leg:
            pass

        h = Harness()
        session = h.admit()
        leg = Leg()
        leg.transport, leg.server = Transport(), Leg()
        leg.server.transport = Transport()
        session.leg = leg
        row = lambda: worker_view(h.tracker)["sessions"][0]  # noqa: E731
        self.assertEqual((row()["tls_client"], row()["tls_server"]), (False, False))
        leg.transport.TLS = True
        directlyProvides(leg.server.transport, ISSLTransport)
        self.assertEqual((row()["tls_client"], row()["tls_server"]), (True, True))

    def test_merge_workers(self):
        """Two workers' views add up; an unreachable worker is listed with why; alerts merge newest first."""
        a, b = Harness(), Harness()
        a.admit("10.0.0.1")
        b.admit("10.0.0.2")
        b.admit("10.0.0.3")
        a.tracker.alert(a.tracker.sessions[1], Alert("SMTP_INVALID_COMMAND", "first"))
        b.clock.advance(1)
        b.tracker.alert(b.tracker.sessions[1], Alert("SMTP_INVALID_COMMAND", "second"))
        views = [worker_view(a.tracker, worker=0), worker_view(b.tracker, worker=1),
                 {"worker": 2, "up": False, "endpoint": "tcp:9:interface=127.0.0.1", "error": "refused"}]
        view = gateway_view(StatusSource(a.tracker, a.clock).info, views, 1001.0)
        self.assertEqual([(w["worker"], w["up"], w["sessions"]) for w in view["workers"]],
                         [(0, True, 1), (1, True, 2), (2, False, 0)])
        self.assertEqual(view["workers"][2]["error"], "refused")
        self.assertEqual(sorted((r["worker"], r["initiator"]) for r in view["sessions"]),
                         [(0, "10.0.0.1:40000"), (1, "10.0.0.2:40000"), (1, "10.0.0.3:40001")])
        self.assertEqual(view["totals"]["admitted"], 3)
        self.assertEqual(view["incomplete"], 3)
        self.assertEqual([a["text"] for a in view["alerts"]], ["second", "first"])

    def test_other_counters(self):
        """Counters other features put in the registry show in their section; absent ones read "not configured"."""
        h = Harness()
        registry = registry_for(h.tracker)
        source = StatusSource(h.tracker, h.clock, registry)
        page = render_page(view_of(source))
        # Content-rule hits and milter figures are per process: other tests
        # of this process may already have configured those sections.
        before = page.count("not configured")
        matches = Counter("mailguard_matches", "Rule matches.", ["match", "action"], registry=registry)
        matches.labels("virus-names", "reject").inc(3)
        view = view_of(source)
        self.assertIn({"labels": {"action": "reject", "match": "virus-names"}, "value": 3.0},
                      view["counters"]["mailguard_matches_total"])
        page = render_page(view)
        self.assertLessEqual(page.count("not configured"), before)
        self.assertIn("<td>virus-names</td><td>3</td>", page.replace('<td>reject</td>', ''))


class PeerTests(TestCase):
    """A worker asks the other workers over HTTP; one that does not answer is listed, not fatal."""

    @defer.inlineCallbacks
    def test_unreachable_worker(self):
        """A worker whose status port refuses connections shows as unreachable, with why."""
        from twisted.internet import reactor

        tracker = SessionTracker(GlobalSettings(), reactor)
        self.addCleanup(tracker.stop)
        dead = "tcp:%d:interface=127.0.0.1" % free_port()
        source = StatusSource(tracker, reactor, registry_for(tracker), worker=0, peers=[(1, dead)])
        view = yield source.gateway()
        self.assertEqual([(w["worker"], w["up"]) for w in view["workers"]], [(0, True), (1, False)])
        self.assertEqual(view["workers"][1]["endpoint"], dead)
        self.assertIn("refused", view["workers"][1]["error"].lower())
        self.assertIn("unreachable: ", render_page(view))


class PageTests(SynchronousTestCase):
    """The page and /status.json as the site serves them."""

    def test_escaped(self):
        """Text from the outside world (alert text, addresses) reaches the page escaped."""
        h = Harness()
        session = h.admit()
        h.tracker.alert(session, Alert("SMTP_INVALID_REPLY", "invalid reply from server: <script>x</script>"))
        page = render_page(view_of(StatusSource(h.tracker, h.clock)))
        self.assertNotIn("<script>x", page)
        self.assertIn("&lt;script&gt;x&lt;/script&gt;", page)

    def test_snapshot_without_javascript(self):
        """The served page already holds the session table, the mode and the charts."""
        h = Harness()
        h.admit("192.0.2.44")
        page = render_page(view_of(StatusSource(h.tracker, h.clock)))
        self.assertIn("<td>192.0.2.44:40000</td>", page)
        self.assertIn('<span id="mode" class="mode-normal">normal</span>', page)
        self.assertIn('id="chart-messages"', page)
        self.assertIn('<script src="static/status.js" defer></script>', page)
        self.assertNotIn("http://", page.replace('xmlns="http://', ""))

    def test_site(self):
        """The site serves /, /status.json and its static files, the page with a same-origin-only policy."""
        h = Harness()
        site = status_site(h.tracker, h.clock)
        self.addCleanup(h.tracker.stop)
        request = DummyRequest([b""])
        root = site.resource
        self.assertIsInstance(root.getChildWithDefault(b"", request), StatusRoot)
        self.assertIsInstance(root.getStaticEntity(b"status.json"), StatusJSONPage)
        root.render_GET(request)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-security-policy"),
                         [CONTENT_SECURITY_POLICY])
        self.assertIn(b"<table id=\"session-table\">", b"".join(request.written))
        static = root.getStaticEntity(b"static")
        for name in (b"status.js", b"status.css"):
            self.assertGreater(len(static.getStaticEntity(name).render_GET(DummyRequest([name]))), 1000)
        request = DummyRequest([b"status.json"])
        request.args = {b"scope": [b"worker"]}
        self.assertIsNone(json.loads(root.getStaticEntity(b"status.json").render_GET(request))["worker"])

    def test_read_only(self):
        """Nothing but GET (and HEAD) is served: a POST is refused."""
        from twisted.web.error import UnsupportedMethod

        h = Harness()
        site = status_site(h.tracker, h.clock)
        request = DummyRequest([b""])
        request.method = b"POST"
        with self.assertRaises(UnsupportedMethod):
            site.resource.getStaticEntity(b"status.json").render(request)


class CheckWarningTests(SynchronousTestCase):
    """`mailguard check` warns when the status endpoint is reachable beyond loopback."""

    def check(self, status):
        """Run `mailguard check` on a policy with ``status``; return (code, stderr)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[global]\nstatus = %s\n[inspect R]\nprotocol = esmtp\n[listener l]\n"
                    "listen = tcp:2525:interface=127.0.0.1\nbackend = tcp:host=127.0.0.1:port=25\ninspect = R\n"
                    % status)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(["check", "-c", path])
        return code, err.getvalue(), path

    def test_warns_on_every_interface(self):
        """A status endpoint without an interface is reported, exit status still 0."""
        code, err, path = self.check("tcp:8025")
        self.assertEqual(code, 0)
        self.assertEqual(
            err,
            "warning: %s: [global] status: tcp:8025 is reachable beyond loopback (every interface) and shows"
            " client addresses: bind it to 127.0.0.1 or a unix: socket, or put it behind an authenticating"
            " reverse proxy\n" % path,
        )

    def test_loopback_and_unix_are_quiet(self):
        """Loopback (IPv4, IPv6) and unix: endpoints raise no warning; a public address does."""
        self.assertEqual(self.check("tcp:8025:interface=127.0.0.1")[:2], (0, ""))
        self.assertIsNone(exposure(r"tcp6:8025:interface=\:\:1"))
        self.assertIsNone(exposure("unix:/run/mailguard/status.sock"))
        self.assertEqual(exposure("tcp:8025:interface=192.0.2.1"), "192.0.2.1")


# -- the real page in a real browser -------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class WebDriver:
    """A minimal client of the W3C WebDriver HTTP API, talking to a chromedriver we start."""

    def __init__(self):
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="mailguard-chromium-")
        self.process = subprocess.Popen([CHROMEDRIVER, "--port=%d" % self.port],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.quit()
                raise OSError("chromedriver did not become ready")
            time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--user-data-dir=" + self.profile, "--window-size=1400,1800"]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        """One WebDriver command; its ``value``."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path), data=data, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError("WebDriver %s %s: %s" % (method, path, e.read()[:500])) from None

    def command(self, method, path, body=None):
        """A command of our browser session."""
        return self.call(method, "/session/%s%s" % (self.session, path), body)

    def get(self, url):
        """Load ``url``."""
        self.command("POST", "/url", {"url": url})

    def js(self, script, *args):
        """Run ``script`` (a function body) in the page; its return value."""
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def javascript(self, enabled):
        """Turn the page's JavaScript on or off (Chrome DevTools protocol)."""
        self.command("POST", "/goog/cdp/execute",
                     {"cmd": "Emulation.setScriptExecutionDisabled", "params": {"value": not enabled}})

    def screenshot(self, path):
        """Save a PNG of the window."""
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.command("GET", "/screenshot")))

    def wait(self, script, what, seconds=30):
        """Poll ``script`` until it returns something true; that value."""
        deadline = time.monotonic() + seconds
        while True:
            value = self.js(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the page to show %s (last: %r)" % (what, value))
            time.sleep(0.25)

    def quit(self):
        """End the browser session and chromedriver."""
        try:
            if getattr(self, "session", None):
                self.call("DELETE", "/session/%s" % self.session)
        except Exception:
            pass
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)
        shutil.rmtree(self.profile, ignore_errors=True)


class Gateway:
    """``twistd -n mailguard`` in a directory of its own, delivering to the embedded backend."""

    def __init__(self, workdir, global_lines, workers=1):
        self.workdir = workdir
        self.port, self.status = free_port(), free_port(workers)  # a status port per worker
        while abs(self.status - self.port) <= workers:
            self.status = free_port(workers)
        os.makedirs(workdir)
        with open(os.path.join(workdir, "policy.ini"), "w") as f:
            f.write("[global]\nworkers = %d\nstatus = tcp:%d:interface=127.0.0.1\n%s\n"
                    "[inspect MAIL]\nprotocol = esmtp\n[listener mail]\n"
                    "listen = tcp:%d:interface=127.0.0.1\nbackend = embedded\ninspect = MAIL\n"
                    % (workers, self.status, global_lines, self.port))
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.log = open(os.path.join(workdir, "twistd.log"), "wb")
        self.process = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "mailguard", "-c", "policy.ini"],
                                        cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                for i in range(workers):
                    self.fetch("/sessions", self.status + i)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("the gateway did not start: " + self.output())
                time.sleep(0.1)

    def url(self, path="/", port=None):
        """The URL of ``path`` on the status endpoint (of the worker on ``port``)."""
        return "http://127.0.0.1:%d%s" % (port or self.status, path)

    def fetch(self, path, port=None):
        """GET ``path`` from the status endpoint."""
        with urllib.request.urlopen(self.url(path, port), timeout=5) as response:
            return response.read()

    def delivered(self):
        """How many messages the embedded backend has stored."""
        new = os.path.join(self.workdir, "var", "maildir", "new")
        return len(os.listdir(new)) if os.path.isdir(new) else 0

    def output(self):
        """What twistd has logged so far."""
        with open(os.path.join(self.workdir, "twistd.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")[-3000:]

    def stop(self):
        """SIGTERM, then SIGKILL if it does not end."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.log.close()


def session_count(driver):
    """How many rows the page's session table shows (its "No sessions" row not counted)."""
    return driver.js("return document.querySelectorAll('#session-table tbody tr:not(.empty)').length;")


def send(port, count, subject):
    """Send ``count`` messages through the gateway on ``port``, one connection each."""
    for i in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@example.org", ["b@example.org"],
                            b"Subject: %s %d\r\n\r\n%s\r\n" % (subject.encode(), i, b"x" * 2000))


_driver = None
_failed = None


def browser():
    """The module's Chromium (through chromedriver), started on first use and quit when the process exits.

    A browser that would not start is tried once: every test needing it then
    fails with the same error.
    """
    global _driver, _failed
    if _failed is not None:
        raise _failed
    if _driver is None:
        missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
        if missing:
            raise SkipTest("%s not installed (Debian packages chromium and chromium-driver; .ci/run installs them)"
                           % ", ".join(missing))
        try:
            _driver = WebDriver()
        except (OSError, AssertionError) as e:
            _failed = e
            raise
        atexit.register(_driver.quit)
    return _driver


class BrowserTests(TestCase):
    """The page in headless Chromium, driven through chromedriver, against a real twistd."""

    timeout = 240

    def setUp(self):
        """The module's browser (started by the first test that needs it)."""
        self.driver = browser()

    def gateway(self, global_lines, workers=1):
        """A running gateway, stopped at the end of the test."""
        gateway = Gateway(os.path.abspath(self.mktemp()), global_lines, workers)
        self.addCleanup(gateway.stop)
        return gateway

    @defer.inlineCallbacks
    def test_live_page(self):
        """Sessions, a chart that moves after more mail, an alert after an illegal command, then aggressive mode."""
        gateway = yield deferToThread(
            self.gateway, "one-minute-high = 9\none-minute-low = 8\nmax-incomplete-high = 50\n"
                          "max-incomplete-low = 40\nmax-incomplete-host = 50\nalert = on\n")
        yield deferToThread(self.scenario, gateway)

    def scenario(self, gateway):
        """The blocking part of `test_live_page` (run in a thread)."""
        driver = self.driver
        clients = []
        try:
            for name in ("first.example", "second.example"):
                client = smtplib.SMTP("127.0.0.1", gateway.port, timeout=10)
                clients.append(client)
                self.assertEqual(client.ehlo(name)[0], 250)
            driver.javascript(True)
            driver.get(gateway.url())
            driver.wait("return document.getElementById('updated').textContent.indexOf('live') === 0",
                        "the first refresh")
            self.assertEqual(driver.wait(
                "var rows = document.querySelectorAll('#session-table tbody tr:not(.empty)');"
                "return rows.length === 2 && Array.from(rows).every(r => r.textContent.indexOf('SIS_OPEN') >= 0)"
                " && rows.length;", "the two open sessions"), 2)
            ports = sorted(str(c.sock.getsockname()[1]) for c in clients)
            text = driver.js("return document.querySelector('#session-table tbody').textContent;")
            for port in ports:
                self.assertIn("127.0.0.1:" + port, text)

            # The filter box and sorting work on the live table.
            driver.js("var f = document.getElementById('filter'); f.value = arguments[0];"
                      "f.dispatchEvent(new Event('input'));", ports[0])
            self.assertEqual(driver.wait("var n = document.querySelectorAll("
                                         "'#session-table tbody tr:not(.empty)').length; return n === 1 && n;",
                                         "one filtered row"), 1)
            driver.js("var f = document.getElementById('filter'); f.value = '';"
                      "f.dispatchEvent(new Event('input'));")
            ids = "return Array.from(document.querySelectorAll('#session-table tbody tr'))" \
                  ".map(r => Number(r.children[1].textContent));"
            th = "document.querySelector('#session-table th[data-key=\"id\"]').click();"
            driver.js(th)
            ascending = driver.js(ids)
            driver.js(th)
            self.assertEqual(driver.js(ids), sorted(ascending, reverse=True))
            self.assertEqual(ascending, sorted(ascending))

            # A chart that moves: messages per second go above zero after mail is sent.
            points = "return document.querySelector('#chart-messages polyline').getAttribute('points');"
            before = driver.js(points)
            send(gateway.port, 3, "chart")
            self.assertEqual(gateway.delivered(), 3)
            moved = driver.wait(
                "var p = document.querySelector('#chart-messages polyline').getAttribute('points');"
                "return p !== arguments[0] && p.split(' ').some(xy => Number(xy.split(',')[1]) < 79) && p;"
                .replace("arguments[0]", json.dumps(before)), "the messages chart rising", seconds=30)
            self.assertNotEqual(moved, before)
            # The page may have drawn the chart between two of the messages: wait for the count.
            glance = driver.wait("var g = document.getElementById('glance').innerHTML;"
                                 "return g.indexOf('Messages</dt><dd>3</dd>') >= 0 && g;", "3 messages counted")
            self.assertIn("Messages</dt><dd>3</dd>", glance)

            # An alert after an illegal command.
            code, _ = clients[0].docmd("FOO", "bar")
            self.assertEqual(code // 100, 5)
            alert = driver.wait("var t = document.querySelector('#alerts table tbody tr');"
                                "return t && t.textContent.indexOf('SMTP_INVALID_COMMAND') >= 0 && t.textContent;",
                                "the SMTP_INVALID_COMMAND alert")
            self.assertIn("127.0.0.1:" + str(clients[0].sock.getsockname()[1]), alert)
            self.assertNotIn("bar", alert.split("SMTP_INVALID_COMMAND", 1)[1].split("127.0.0.1")[0])

            # Aggressive mode once the one-minute threshold is crossed.
            refused = None
            for i in range(20):
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
                    banner = s.recv(200)
                if banner.startswith(b"421"):
                    refused = i
                    break
            self.assertIsNotNone(refused, "no connection was refused")
            mode = driver.wait("var m = document.getElementById('mode').textContent;"
                               "return m.indexOf('aggressive') === 0 && m;", "the aggressive mode")
            self.assertEqual(mode, "aggressive (ALERT_ON: one-minute)")
            driver.wait("return document.querySelector('#alerts tbody').textContent.indexOf('ALERT_ON') >= 0;",
                        "the ALERT_ON alert")
            driver.wait("return document.querySelector('#chart-sessions polyline[data-series=\"refused:one-minute\"]')"
                        ".getAttribute('points').split(' ').some(xy => Number(xy.split(',')[1]) < 79);",
                        "the refusals in the sessions chart", seconds=30)
            artefact = os.path.abspath("status-page.png")
            driver.screenshot(artefact)
            with open(artefact, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            if os.environ.get("MAILGUARD_SCREENSHOT"):
                shutil.copy(artefact, os.environ["MAILGUARD_SCREENSHOT"])

        finally:
            for client in clients:
                try:
                    client.close()
                except OSError:
                    pass

    @defer.inlineCallbacks
    def test_same_rendering(self):
        """The page's script draws every section exactly as the server renders it, from the same view."""
        from mailguard import statuspage

        a, b = Harness(max_incomplete_host=1), Harness()
        first = a.admit("10.0.0.1")
        a.connect("10.0.0.1")
        source = StatusSource(a.tracker, a.clock, registry_for(a.tracker))
        view_of(source)
        first.client_bytes, first.server_bytes = 123456, 7890
        a.tracker.alert(first, Alert("SMTP_INVALID_REPLY", "invalid reply from server: <b>\"x\" & 'y' \u00e9"))
        for i in range(7):
            a.admit("10.0.1.%d" % i)
            a.tracker.event(first, MessageSent(300 * i ** 4))
            a.clock.advance(1.7)
        b.admit("10.0.0.2")
        b.tracker.watch()
        b.clock.advance(SAMPLE_INTERVAL + 0.3)
        Counter("mailguard_matches", "Matches.", ["match", "action"], registry=source.registry).labels(
            "virus", "reject").inc(2.5)
        views = [worker_view(a.tracker, source.registry, 0), worker_view(b.tracker, None, 1),
                 {"worker": 2, "up": False, "endpoint": "tcp:9", "error": "Connection refused <&>"}]
        view = json.loads(json.dumps(gateway_view(source.info, views, a.clock.seconds())))
        expected = statuspage.sections(view)

        gateway = yield deferToThread(self.gateway, "")

        def scenario():
            self.driver.get(gateway.url())
            self.driver.wait("return window.mailguardStatus !== undefined;", "the script")
            return self.driver.js("return window.mailguardStatus.sections(arguments[0]);", view)

        drawn = yield deferToThread(scenario)
        self.assertEqual(sorted(drawn), sorted(expected))
        for name in expected:
            self.assertEqual(drawn[name], expected[name], name)
        self.assertIn("&lt;b&gt;&quot;x&quot; &amp; &#x27;y&#x27; \u00e9", expected["alerts"])
        self.assertIn("unreachable: Connection refused &lt;&amp;&gt;", expected["workers"])
        self.assertIn("<td>virus</td><td>2.5</td>", expected["matches"].replace("<td>reject</td>", ""))

    @defer.inlineCallbacks
    def test_without_javascript(self):
        """With JavaScript off, the served page shows the sessions and the mode as they were at load."""
        gateway = yield deferToThread(self.gateway, "")

        def scenario():
            client = smtplib.SMTP("127.0.0.1", gateway.port, timeout=10)
            try:
                client.ehlo("nojs.example")
                self.driver.javascript(False)
                try:
                    self.driver.get(gateway.url())
                    return self.driver.js("return [document.getElementById('updated').textContent,"
                                          " document.querySelector('#session-table tbody').textContent,"
                                          " document.getElementById('mode').textContent,"
                                          " document.getElementById('filter').hidden];"), \
                        client.sock.getsockname()[1]
                finally:
                    self.driver.javascript(True)
            finally:
                client.close()

        # Script execution is off in the page: only what the server rendered is there.
        (updated, table, mode, filter_hidden), port = yield deferToThread(scenario)
        self.assertTrue(updated.startswith("snapshot at "), updated)
        self.assertIn("127.0.0.1:%d" % port, table)
        self.assertIn("SIS_OPEN", table)
        self.assertEqual(mode, "normal")
        self.assertTrue(filter_hidden)

    @defer.inlineCallbacks
    def test_workers(self):
        """With two workers, the page of either shows both workers and every session of the gateway."""
        gateway = yield deferToThread(self.gateway, "", 2)

        def scenario():
            clients = []
            try:
                for i in range(6):
                    client = smtplib.SMTP("127.0.0.1", gateway.port, timeout=10)
                    clients.append(client)
                    client.ehlo("w%d.example" % i)
                self.driver.get(gateway.url(port=gateway.status + 1))
                workers = self.driver.wait(
                    "var rows = document.querySelectorAll('#workers tbody tr.up');"
                    "return rows.length === 2 && Array.from(rows).map(r => r.children[0].textContent);",
                    "both workers up")
                count = self.driver.wait("var n = document.querySelectorAll("
                                         "'#session-table tbody tr:not(.empty)').length; return n === 6 && n;",
                                         "the six sessions")
                per_worker = [len(json.loads(gateway.fetch("/status.json?scope=worker", gateway.status + i))
                                  ["sessions"]) for i in (0, 1)]
                merged = json.loads(gateway.fetch("/status.json"))
                return workers, count, per_worker, merged
            finally:
                for client in clients:
                    client.close()

        workers, count, per_worker, merged = yield deferToThread(scenario)
        self.assertEqual(workers, ["0", "1"])
        self.assertEqual(count, 6)
        self.assertEqual(sum(per_worker), 6)
        self.assertEqual(sorted(w["worker"] for w in merged["workers"]), [0, 1])
        self.assertEqual(len(merged["sessions"]), 6)
        self.assertEqual(sorted({r["worker"] for r in merged["sessions"]}), sorted(
            i for i, n in enumerate(per_worker) if n))
