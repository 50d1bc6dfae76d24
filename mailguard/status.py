"""The status endpoint of a running gateway: ``/metrics`` (Prometheus) and ``/sessions`` (JSON).

Enabled by ``[global] status = <server endpoint description>``.  Everything
is read from the `SessionTracker` at request time: the data path only keeps
the counters it already keeps (bytes per chunk, one update per session), so
metrics cost nothing until scraped.  Each gateway has its own
`prometheus_client.CollectorRegistry`; the process-wide default registry is
never touched.  ``prometheus_client.twisted`` is not used: importing it
installs a reactor.
"""

import json

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.application import strports
from twisted.web import resource, server

from mailguard.tracker import CONNECT_BUCKETS, REFUSAL_REASONS, SIZE_BUCKETS

#: The paths the endpoint serves, with what they hold (the index page lists them).
PATHS = {
    b"metrics": "Prometheus metrics (text format 0.0.4)",
    b"sessions": "the session table and the tracker's mode, as JSON",
}


class TrackerCollector:
    """A prometheus_client collector reading a `SessionTracker` at scrape time."""

    def __init__(self, tracker):
        self.tracker = tracker

    def collect(self):
        """Yield every metric family from the tracker's current counters."""
        tracker = self.tracker

        sessions = GaugeMetricFamily("mailguard_sessions", "Sessions in the table, by state.", labels=["state"])
        for state, count in tracker.state_counts().items():
            sessions.add_metric([state], count)
        yield sessions

        total = CounterMetricFamily("mailguard_sessions_total", "Sessions admitted since start.")
        total.add_metric([], tracker.admitted_total)
        yield total

        refused = CounterMetricFamily(
            "mailguard_refused_total",
            "Connections refused with 421 4.7.0, by the policy key that refused them.",
            labels=["reason"],
        )
        for reason in _keys(REFUSAL_REASONS, tracker.refused):
            refused.add_metric([reason], tracker.refused[reason])
        yield refused

        shed = CounterMetricFamily(
            "mailguard_shed_total", "Incomplete sessions deleted while aggressive (max-incomplete)."
        )
        shed.add_metric([], tracker.shed_total)
        yield shed

        timeouts = CounterMetricFamily(
            "mailguard_timeouts_total", "Sessions ended by a tracker timer, by timer.", labels=["timer"]
        )
        for timer in _keys(("synwait", "idle", "finwait"), tracker.timeouts):
            timeouts.add_metric([timer], tracker.timeouts[timer])
        yield timeouts

        from_client, from_server = tracker.bytes_totals()
        octets = CounterMetricFamily(
            "mailguard_bytes_total", "Bytes received by the gateway, by the side that sent them.", labels=["direction"]
        )
        octets.add_metric(["from_client"], from_client)
        octets.add_metric(["from_server"], from_server)
        yield octets

        commands = CounterMetricFamily(
            "mailguard_commands_total", "Commands that passed inspection, by verb.", labels=["verb"]
        )
        for verb, count in sorted(tracker.verb_totals().items()):
            commands.add_metric([_label(verb)], count)
        yield commands

        issued = CounterMetricFamily(
            "mailguard_client_commands_total", "Command lines issued by clients, legal or not."
        )
        issued.add_metric([], tracker.commands_total())
        yield issued

        illegal = CounterMetricFamily(
            "mailguard_illegal_commands_total", "Commands refused as illegal (SMTP_INVALID_COMMAND)."
        )
        illegal.add_metric([], tracker.alerts["SMTP_INVALID_COMMAND"])
        yield illegal

        alerts = CounterMetricFamily(
            "mailguard_alerts_total", "Alerts raised (logged or not), by tag.", labels=["tag"]
        )
        for tag, count in sorted(tracker.alerts.items()):
            alerts.add_metric([tag], count)
        yield alerts

        yield _histogram(
            "mailguard_backend_connect_seconds",
            "Time from accepting a client to the backend connection being up.",
            CONNECT_BUCKETS, tracker.connect_buckets, tracker.connect_sum,
        )
        yield _histogram(
            "mailguard_message_size_bytes",
            "Sizes (as SIZE counts them) of the messages sent to the backend.",
            SIZE_BUCKETS, tracker.size_buckets, tracker.size_sum,
        )

        admitted_last_minute = tracker.one_minute_rate()
        rate = GaugeMetricFamily("mailguard_one_minute_sessions", "Sessions admitted in the last minute.")
        rate.add_metric([], admitted_last_minute)
        yield rate

        aggressive = GaugeMetricFamily(
            "mailguard_aggressive", "1 while the tracker is aggressive (between ALERT_ON and ALERT_OFF)."
        )
        aggressive.add_metric([], 0 if tracker.check_mode() is None else 1)
        yield aggressive

        blocked = GaugeMetricFamily("mailguard_blocked_hosts", "Hosts refused under block-time.")
        blocked.add_metric([], len(tracker.blocked_hosts()))
        yield blocked

        from mailguard.matching import HITS

        matches = CounterMetricFamily(
            "mailguard_matches_total", "Content rules ([match NAME]) that fired, by match and action.",
            labels=["match", "action"],
        )
        for (name, action), count in sorted(HITS.items()):
            matches.add_metric([name, action], count)
        yield matches


def _histogram(name, documentation, bounds, counts, total):
    """A histogram family from per-bucket counts (the last one is the overflow bucket)."""
    buckets = []
    cumulative = 0
    for bound, count in zip(bounds, counts):
        cumulative += count
        buckets.append((repr(float(bound)), cumulative))
    buckets.append(("+Inf", cumulative + counts[-1]))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _keys(known, counter):
    """The known label values first (so they show as 0), then any others seen."""
    return list(known) + sorted(k for k in counter if k not in known)


def _label(value):
    """A label value from a verb (bytes or str)."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


class LabelledCollector:
    """Adds constant labels (e.g. ``worker``) to every sample of another collector."""

    def __init__(self, inner, labels):
        self.inner = inner
        self.labels = dict(labels)

    def collect(self):
        """The inner collector's families, each sample with the extra labels."""
        from prometheus_client.core import Metric

        for family in self.inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(sample.name, dict(sample.labels, **self.labels), sample.value,
                                    sample.timestamp, sample.exemplar)
            yield labelled


def registry_for(tracker, labels=None):
    """A private `CollectorRegistry` holding only ``tracker``'s metrics (with ``labels`` on each)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = TrackerCollector(tracker)
    registry.register(LabelledCollector(collector, labels) if labels else collector)
    return registry


class MetricsPage(resource.Resource):
    """``/metrics``: the registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry):
        resource.Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request):
        """Collect now and render."""
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class SessionsPage(resource.Resource):
    """``/sessions``: `SessionTracker.snapshot` as JSON."""

    isLeaf = True

    def __init__(self, tracker):
        resource.Resource.__init__(self)
        self.tracker = tracker

    def render_GET(self, request):
        """The live table, one object per session."""
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.tracker.snapshot(), sort_keys=True).encode("utf-8") + b"\n"


class StatusRoot(resource.Resource):
    """``/``: a plain-text index of the status pages."""

    def render_GET(self, request):
        """List the pages."""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        lines = ["mailguard status"] + ["/%s: %s" % (path.decode(), what) for path, what in PATHS.items()]
        return ("\n".join(lines) + "\n").encode("utf-8")


class StatusSite(server.Site):
    """A `Site` that writes no access log: a scrape every few seconds would flood it."""

    def log(self, request):
        """Do not log requests."""


def status_site(tracker, reactor, labels=None):
    """The HTTP site of the status endpoint for ``tracker``."""
    root = StatusRoot()
    root.putChild(b"metrics", MetricsPage(registry_for(tracker, labels)))
    root.putChild(b"sessions", SessionsPage(tracker))
    site = StatusSite(root, reactor=reactor)
    site.displayTracebacks = False
    site.noisy = False
    return site


def status_service(description, tracker, reactor, labels=None):
    """A service serving the status endpoint on ``description`` (a server endpoint string).

    Built with `strports.service`, so a port that cannot be bound stops
    start-up instead of being merely logged.
    """
    return strports.service(description, status_site(tracker, reactor, labels), reactor=reactor)
