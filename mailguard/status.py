"""The status endpoint of a running gateway: the status page, ``/status.json``, ``/metrics``, ``/sessions``.

Enabled by ``[global] status = <server endpoint description>``.  Everything
is read from the `SessionTracker` at request time: the data path only keeps
the counters it already keeps (bytes per chunk, one update per session), so
metrics cost nothing until scraped.  The page (``/``) and ``/status.json``
also start the tracker's rate sampler (`SessionTracker.watch`): one timer,
running only while they are asked for, over a bounded ring.

With workers, each worker's page asks the other workers for their own view
(``/status.json?scope=worker``) and shows the whole gateway.

Each gateway has its own `prometheus_client.CollectorRegistry`; the process-wide default registry is
never touched.  ``prometheus_client.twisted`` is not used: importing it
installs a reactor.
"""

import json
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.application import strports
from twisted.web import resource, server

from mailguard.tracker import (
    ALERT_RING, CONNECT_BUCKETS, REFUSAL_REASONS, SAMPLE_COUNT, SAMPLE_INTERVAL, SIZE_BUCKETS, STATES,
)

#: The paths the endpoint serves, with what they hold (the index page lists them).
PATHS = {
    b"": "the status page (HTML)",
    b"status.json": "the gateway's status as JSON (the page's data; keys documented in the README)",
    b"metrics": "Prometheus metrics (text format 0.0.4)",
    b"sessions": "the session table and the tracker's mode, as JSON",
    b"milters": "each milter's state, connections, verdicts and answer times, as JSON",
}

#: The version of the ``/status.json`` layout; it changes only when a key changes meaning or goes.
STATUS_SCHEMA = 1

#: Seconds a worker waits for another worker's view.
PEER_TIMEOUT = 2.0


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
    from mailguard.milterclient import MilterCollector

    milters = MilterCollector()
    registry.register(LabelledCollector(milters, labels) if labels else milters)
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


# -- /status.json: one worker's view, and the whole gateway's ------------------------------

#: Metric families the tracker's collector yields; every other counter of the
#: registry (content-rule matches, milter verdicts, ...) is shown generically.
_TRACKER_FAMILIES = frozenset((
    "mailguard_sessions", "mailguard_refused", "mailguard_shed", "mailguard_timeouts", "mailguard_bytes",
    "mailguard_commands", "mailguard_client_commands", "mailguard_illegal_commands", "mailguard_alerts",
))


def _version():
    """The installed mailguard's version, or ``unknown`` when run from a source tree only."""
    from importlib import metadata

    try:
        return metadata.version("mailguard")
    except metadata.PackageNotFoundError:
        return "unknown"


def gateway_info(settings, policy=None, loaded=None):
    """What the page shows of the configuration: version, policy file, listeners, thresholds."""
    if policy is not None:
        settings = policy.settings
    listeners = []
    for listener in getattr(policy, "listeners", ()):
        listeners.append({
            "name": listener.name,
            "listen": listener.listen,
            "backend": listener.backend,
            "rule": listener.rule.name,
            "protocol": listener.rule.protocol,
            "tls": getattr(listener.rule, "tls", None),
        })
    return {
        "version": _version(),
        "policy": {"path": getattr(policy, "path", None), "loaded": loaded},
        "listeners": listeners,
        "thresholds": {
            "max_incomplete_high": settings.max_incomplete_high,
            "max_incomplete_low": settings.max_incomplete_low,
            "one_minute_high": settings.one_minute_high,
            "one_minute_low": settings.one_minute_low,
            "max_incomplete_host": settings.max_incomplete_host,
            "block_time": settings.block_time,
        },
    }


def _tls(transport):
    """Whether a leg's transport runs TLS (STARTTLS done, or an implicit-TLS listener)."""
    if transport is None:
        return False
    from twisted.internet.interfaces import ISSLTransport

    return bool(getattr(transport, "TLS", False)) or ISSLTransport.providedBy(transport)


def _session_row(session, now, worker):
    """A row of the page's session table: `Session.as_dict` plus the worker and TLS on each leg."""
    row = session.as_dict(now)
    leg = session.leg
    server = getattr(leg, "server", None)
    row["tls_client"] = _tls(getattr(leg, "transport", None))
    row["tls_server"] = _tls(getattr(server, "transport", None))
    row["worker"] = worker
    return row


def _rate_point(before, after):
    """Per-second rates between two `SessionTracker.sample` tuples."""
    elapsed = after[0] - before[0]
    if elapsed <= 0:
        elapsed = 1.0

    def rate(a, b):
        return round(max(0, b - a) / elapsed, 3)

    refused = {reason: rate(a, b) for reason, a, b in zip(REFUSAL_REASONS, before[2], after[2])}
    return {
        "since": before[0],
        "time": after[0],
        "admitted": rate(before[1], after[1]),
        "refused": refused,
        "refused_total": round(sum(refused.values()), 3),
        "messages": rate(before[3], after[3]),
        "bytes_from_client": rate(before[4], after[4]),
        "bytes_from_server": rate(before[5], after[5]),
    }


def _rates(samples, live):
    """The rate series over the kept samples; the last point runs up to ``live`` (now)."""
    points = []
    samples = list(samples)
    for before, after in zip(samples, samples[1:]):
        points.append(dict(_rate_point(before, after), live=False))
    if samples and live[0] > samples[-1][0]:
        points.append(dict(_rate_point(samples[-1], live), live=True))
    return points


def _sizes(tracker):
    """The message-size histogram as ``[{"le": bound or None, "count": n}]`` (not cumulative)."""
    bounds = list(SIZE_BUCKETS) + [None]
    return [{"le": bound, "count": count} for bound, count in zip(bounds, tracker.size_buckets)]


def _extra_counters(registry):
    """Every counter of ``registry`` that is not the tracker's own, by sample name, labels without ``worker``."""
    out = {}
    if registry is None:
        return out
    for family in registry.collect():
        if family.type != "counter" or family.name in _TRACKER_FAMILIES:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = {k: v for k, v in sample.labels.items() if k != "worker"}
            out.setdefault(sample.name, []).append({"labels": labels, "value": sample.value})
    return out


def worker_view(tracker, registry=None, worker=None):
    """One process's status (``/status.json?scope=worker``): its table, counters, rates and alerts."""
    now = tracker.clock.seconds()
    reason = tracker.check_mode()
    live = tracker.sample()
    from_client, from_server = live[4], live[5]
    return {
        "worker": worker,
        "up": True,
        "pid": os.getpid(),
        "time": now,
        "started": tracker.started,
        "uptime": max(0.0, now - tracker.started),
        "mode": "normal" if reason is None else "aggressive",
        "aggressive_reason": reason,
        "sessions_by_state": tracker.state_counts(),
        "incomplete": tracker.incomplete_count(),
        "one_minute_rate": tracker.one_minute_rate(),
        "blocked_hosts": tracker.blocked_hosts(),
        "totals": {
            "admitted": tracker.admitted_total,
            "refused": {reason: tracker.refused[reason] for reason in REFUSAL_REASONS},
            "shed": tracker.shed_total,
            "messages": live[3],
            "bytes_from_client": from_client,
            "bytes_from_server": from_server,
            "alerts": sum(tracker.alerts.values()),
        },
        "rates": _rates(tracker.samples, live),
        "message_sizes": _sizes(tracker),
        "sessions": [_session_row(s, now, worker) for s in tracker.sessions.values()],
        "alerts": [
            {"time": when, "tag": tag, "client": client, "text": text, "worker": worker}
            for when, tag, client, text in tracker.alert_ring()
        ],
        "counters": _extra_counters(registry),
    }


def _merge_rates(views):
    """The gateway's rate series: the workers' points summed per sample interval."""
    if len(views) == 1:
        return list(views[0].get("rates", []))
    buckets = {}
    live = None
    for view in views:
        mine = {}
        for point in view.get("rates", []):
            if point.get("live"):
                live = _add_point(live, point)
            else:
                mine[round(point["time"] / SAMPLE_INTERVAL)] = point
        for key, point in mine.items():
            buckets[key] = _add_point(buckets.get(key), point)
    points = [buckets[key] for key in sorted(buckets)]
    if live is not None:
        points.append(live)
    return points


def _add_point(total, point):
    """The sum of two rate points (``total`` may be None)."""
    if total is None:
        return dict(point, refused=dict(point["refused"]))
    out = dict(total, time=max(total["time"], point["time"]), since=min(total["since"], point["since"]))
    for key in ("admitted", "refused_total", "messages", "bytes_from_client", "bytes_from_server"):
        out[key] = round(total[key] + point[key], 3)
    out["refused"] = {r: round(total["refused"].get(r, 0) + point["refused"].get(r, 0), 3)
                      for r in set(total["refused"]) | set(point["refused"])}
    return out


def gateway_view(info, views, now):
    """The whole gateway's status (``/status.json``) from the workers' views (unreachable ones included)."""
    up = [v for v in views if v.get("up")]
    workers = []
    for v in views:
        workers.append({
            "worker": v.get("worker"),
            "up": bool(v.get("up")),
            "pid": v.get("pid"),
            "endpoint": v.get("endpoint"),
            "error": v.get("error"),
            "mode": v.get("mode"),
            "sessions": len(v.get("sessions", [])),
            "incomplete": v.get("incomplete", 0),
            "one_minute_rate": v.get("one_minute_rate", 0),
            "uptime": v.get("uptime"),
        })
    aggressive = [v.get("worker") for v in up if v.get("mode") == "aggressive"]
    totals = {"admitted": 0, "refused": dict.fromkeys(REFUSAL_REASONS, 0), "shed": 0, "messages": 0,
              "bytes_from_client": 0, "bytes_from_server": 0, "alerts": 0}
    sizes = None
    counters = {}
    for v in up:
        for key, value in v["totals"].items():
            if key == "refused":
                for reason, n in value.items():
                    totals["refused"][reason] = totals["refused"].get(reason, 0) + n
            else:
                totals[key] += value
        if sizes is None:
            sizes = [dict(bucket) for bucket in v["message_sizes"]]
        else:
            for bucket, other in zip(sizes, v["message_sizes"]):
                bucket["count"] += other["count"]
        for name, rows in v.get("counters", {}).items():
            merged = counters.setdefault(name, {})
            for row in rows:
                key = tuple(sorted(row["labels"].items()))
                merged[key] = merged.get(key, 0) + row["value"]
    by_state = dict.fromkeys(STATES, 0)
    for v in up:
        for state, n in v["sessions_by_state"].items():
            by_state[state] = by_state.get(state, 0) + n
    alerts = sorted((a for v in up for a in v["alerts"]), key=lambda a: a["time"], reverse=True)[:ALERT_RING]
    started = min((v["started"] for v in up), default=now)
    return {
        "schema": STATUS_SCHEMA,
        "time": now,
        "version": info["version"],
        "policy": info["policy"],
        "started": started,
        "uptime": max(0.0, now - started),
        "listeners": info["listeners"],
        "thresholds": info["thresholds"],
        "workers": workers,
        "mode": "aggressive" if aggressive else "normal",
        "aggressive_workers": aggressive,
        "aggressive_reasons": sorted({v["aggressive_reason"] for v in up if v.get("aggressive_reason")}),
        "sessions_by_state": by_state,
        "incomplete": sum(v["incomplete"] for v in up),
        "one_minute_rate": sum(v["one_minute_rate"] for v in up),
        "blocked_hosts": sorted({h for v in up for h in v["blocked_hosts"]}),
        "totals": totals,
        "rates": {"interval": SAMPLE_INTERVAL, "window": SAMPLE_INTERVAL * SAMPLE_COUNT, "points": _merge_rates(up)},
        "message_sizes": sizes or [{"le": b, "count": 0} for b in list(SIZE_BUCKETS) + [None]],
        "sessions": [row for v in up for row in v["sessions"]],
        "alerts": alerts,
        "counters": {
            name: [{"labels": dict(key), "value": value} for key, value in sorted(rows.items())]
            for name, rows in sorted(counters.items())
        },
    }


class StatusSource:
    """Where the page and ``/status.json`` get their data: this tracker, and the other workers.

    ``peers`` is a list of ``(index, status endpoint description)`` of the
    other workers (empty without workers).
    """

    def __init__(self, tracker, reactor, registry=None, info=None, worker=None, peers=()):
        self.tracker = tracker
        self.reactor = reactor
        self.registry = registry
        self.info = info or gateway_info(tracker.settings)
        self.worker = worker
        self.peers = list(peers)

    def local(self):
        """This process's view; asking for it keeps the rate sampler running."""
        self.tracker.watch()
        return worker_view(self.tracker, self.registry, self.worker)

    def gateway(self):
        """A Deferred firing with the whole gateway's view (the other workers asked in parallel)."""
        from twisted.internet import defer

        views = [defer.succeed(self.local())]
        for index, description in self.peers:
            views.append(self._peer(index, description))
        d = defer.gatherResults(views)
        d.addCallback(lambda got: gateway_view(
            self.info, sorted(got, key=lambda v: v.get("worker") or 0), self.tracker.clock.seconds()))
        return d

    def _peer(self, index, description):
        """Another worker's view, or an entry saying why it did not answer."""
        from twisted.web.client import Agent, readBody

        from mailguard.cli import status_target

        def failed(failure):
            return {"worker": index, "up": False, "endpoint": description, "error": failure.getErrorMessage()}

        try:
            kind, where = status_target(description)
        except ValueError as e:
            return _succeed({"worker": index, "up": False, "endpoint": description, "error": str(e)})
        agent = Agent(self.reactor, connectTimeout=PEER_TIMEOUT)
        d = agent.request(b"GET", (where + "/status.json?scope=worker").encode("ascii"))
        d.addCallback(readBody)
        d.addCallback(lambda body: dict(json.loads(body), endpoint=description))
        d.addTimeout(PEER_TIMEOUT, self.reactor)
        d.addErrback(failed)
        return d


def _succeed(value):
    """A Deferred that has fired with ``value``."""
    from twisted.internet import defer

    return defer.succeed(value)


def _no_store(request, content_type):
    """Headers of a live answer: its type, never cached, never sniffed."""
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")


def _answer(request, d, render):
    """Finish ``request`` with ``render(value)`` once ``d`` fires (unless the client has gone)."""
    gone = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(value):
        if not gone:
            request.write(render(value))
            request.finish()

    def failed(failure):
        if not gone:
            request.setResponseCode(500)
            request.write(b"status unavailable\n")
            request.finish()

    d.addCallback(done).addErrback(failed)
    return server.NOT_DONE_YET


class StatusJSONPage(resource.Resource):
    """``/status.json``: the whole gateway; ``?scope=worker``: this process only."""

    isLeaf = True

    def __init__(self, source):
        resource.Resource.__init__(self)
        self.source = source

    def render_GET(self, request):
        """The view as JSON."""
        _no_store(request, b"application/json")
        if request.args.get(b"scope") == [b"worker"]:
            return _json(self.source.local())
        return _answer(request, self.source.gateway(), _json)


class MiltersPage(resource.Resource):
    """``/milters``: every milter's figures (`mailguard.milterclient.MilterFilterFactory.snapshot`) as JSON."""

    isLeaf = True

    def render_GET(self, request):
        """The figures now."""
        from mailguard.milterclient import default_factory

        _no_store(request, b"application/json")
        return _json(default_factory().snapshot())


def _json(value):
    """``value`` as the body of a JSON answer."""
    return json.dumps(value, sort_keys=True).encode("utf-8") + b"\n"


#: What the page's scripts, styles and charts may load: this endpoint only.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    b" base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class StatusRoot(resource.Resource):
    """``/``: the status page, rendered with the figures of the moment (it works without JavaScript)."""

    def __init__(self, source=None):
        resource.Resource.__init__(self)
        self.source = source

    def getChild(self, path, request):
        """``/`` itself is this page; any other unknown path is a 404."""
        if path == b"":
            return self
        return resource.NoResource()

    def render_GET(self, request):
        """The page (or, without a tracker, a plain-text index of the paths)."""
        if self.source is None:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            lines = ["mailguard status"] + ["/%s: %s" % (path.decode(), what) for path, what in PATHS.items()]
            return ("\n".join(lines) + "\n").encode("utf-8")
        _no_store(request, b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        from mailguard.statuspage import render_page

        return _answer(request, self.source.gateway(), lambda view: render_page(view).encode("utf-8"))


class StaticFile(resource.Resource):
    """A file of ``mailguard/static``, read once when the site is built."""

    isLeaf = True

    def __init__(self, data, content_type):
        resource.Resource.__init__(self)
        self.data = data
        self.content_type = content_type

    def render_GET(self, request):
        """The file."""
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self.data


#: The page's own files, served under ``/static/``.
STATIC_FILES = {
    b"status.js": b"text/javascript; charset=utf-8",
    b"status.css": b"text/css; charset=utf-8",
}


def static_resource():
    """``/static/``: the page's script and style sheet (package resources)."""
    from importlib import resources

    folder = resources.files("mailguard") / "static"
    static = resource.Resource()
    for name, content_type in STATIC_FILES.items():
        static.putChild(name, StaticFile((folder / name.decode()).read_bytes(), content_type))
    return static


class StatusSite(server.Site):
    """A `Site` that writes no access log: a scrape every few seconds would flood it."""

    def log(self, request):
        """Do not log requests."""


def exposure(description):
    """Where the status endpoint ``description`` is reachable beyond loopback (a phrase), or None.

    ``unix:`` sockets and loopback interfaces are private; a TCP or TLS
    endpoint without ``interface`` listens on every interface.
    """
    import ipaddress

    from mailguard.cli import _split_description

    kind, args, kwargs = _split_description(description)
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    interface = kwargs.get("interface")
    if not interface:
        return "every interface"
    if interface.lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(interface.split("%")[0]).is_loopback:
            return None
    except ValueError:
        pass
    return interface


def status_site(tracker, reactor, labels=None, policy=None, worker=None, peers=()):
    """The HTTP site of the status endpoint for ``tracker``.

    ``policy`` (for the page's configuration summary), ``worker`` (this
    worker's index) and ``peers`` (the other workers' ``(index, status
    description)``) are optional.
    """
    registry = registry_for(tracker, labels)
    info = gateway_info(tracker.settings, policy, loaded=tracker.clock.seconds())
    source = StatusSource(tracker, reactor, registry, info, worker, peers)
    root = StatusRoot(source)
    root.putChild(b"metrics", MetricsPage(registry))
    root.putChild(b"sessions", SessionsPage(tracker))
    root.putChild(b"status.json", StatusJSONPage(source))
    root.putChild(b"static", static_resource())
    root.putChild(b"milters", MiltersPage())
    site = StatusSite(root, reactor=reactor)
    site.displayTracebacks = False
    site.noisy = False
    return site


def status_service(description, tracker, reactor, labels=None, policy=None, worker=None, peers=()):
    """A service serving the status endpoint on ``description`` (a server endpoint string).

    Built with `strports.service`, so a port that cannot be bound stops
    start-up instead of being merely logged.
    """
    site = status_site(tracker, reactor, labels, policy, worker, peers)
    return strports.service(description, site, reactor=reactor)
