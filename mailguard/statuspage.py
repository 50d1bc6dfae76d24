"""The status page as HTML, rendered on the server from a ``/status.json`` view.

The page is complete without JavaScript: it shows the figures of the
moment it was served.  ``static/status.js`` then redraws the same parts
from ``/status.json`` every refresh; the two renderings produce the same
elements (ids, classes, the charts' polylines), so the page looks the
same either way.  Every value is escaped; the page holds no message
content, no addresses beyond the session table's and never AUTH data.
"""

import functools
import html
import string
import time
from importlib import resources

from mailguard.tracker import REFUSAL_REASONS, STATES

#: The rate charts: (id, title, unit, [(key, label), ...]); a key with a colon is ``refused:<reason>``.
CHARTS = (
    ("sessions", "Sessions per second", "/s", (
        ("admitted", "admitted"),
        ("refused:max-incomplete", "refused max-incomplete"),
        ("refused:one-minute", "refused one-minute"),
        ("refused:max-incomplete-host", "refused max-incomplete-host"),
        ("refused:block-time", "refused block-time"),
    )),
    ("messages", "Messages per second", "/s", (("messages", "messages"),)),
    ("bytes", "Bytes per second", "B/s", (("bytes_from_client", "from clients"),
                                          ("bytes_from_server", "from servers"))),
)

#: The session table's columns: (key, heading).
SESSION_COLUMNS = (
    ("worker", "Worker"),
    ("id", "Id"),
    ("initiator", "Initiator"),
    ("responder", "Responder"),
    ("listener", "Listener"),
    ("rule", "Rule"),
    ("state_name", "State"),
    ("age", "Age"),
    ("idle", "Idle"),
    ("client_bytes", "Bytes in"),
    ("server_bytes", "Bytes out"),
    ("tls_client", "TLS client"),
    ("tls_server", "TLS server"),
    ("commands", "Commands"),
    ("phase", "Phase"),
)

#: Chart geometry (SVG user units).
WIDTH, HEIGHT = 300, 80
#: The shortest time (seconds) a chart's x axis spans.
MIN_SPAN = 30


def esc(value):
    """``value`` as escaped HTML text (None as a dash)."""
    return html.escape("-" if value is None else str(value), quote=True)


def fmt_time(seconds):
    """A Unix time as ``YYYY-MM-DD HH:MM:SS UTC``."""
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def fmt_duration(seconds):
    """Seconds as ``HH:MM:SS`` (days as ``Nd HH:MM:SS``)."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    text = "%02d:%02d:%02d" % (rest // 3600, rest // 60 % 60, rest % 60)
    return "%dd %s" % (days, text) if days else text


def fmt_number(value):
    """A rate or count, short: integers as they are, fractions with up to two decimals."""
    if value is None:
        return "-"
    if float(value).is_integer():
        return str(int(value))
    return ("%.2f" % value).rstrip("0").rstrip(".")


def fmt_bytes(value):
    """Octets with a binary unit (B, KiB, MiB, GiB)."""
    value = float(value or 0)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return fmt_number(round(value, 2)) + " " + unit
        value /= 1024
    return fmt_number(round(value, 2)) + " GiB"


def _dl(pairs):
    """A definition list of (escaped-by-us term, ready HTML) pairs."""
    return "<dl>" + "".join("<dt>%s</dt><dd>%s</dd>" % (esc(k), v) for k, v in pairs) + "</dl>"


def mode_text(view):
    """``normal``, or ``aggressive (ALERT_ON: reasons)``."""
    if view["mode"] != "aggressive":
        return "normal"
    return "aggressive (ALERT_ON: %s)" % ", ".join(view.get("aggressive_reasons") or ["?"])


def glance(view):
    """The gateway at a glance: version, policy, uptime, mode, sessions against the thresholds."""
    t = view["thresholds"]
    states = view["sessions_by_state"]
    totals = view["totals"]
    policy = view["policy"]
    pairs = [
        ("Version", esc(view["version"])),
        ("Policy", "%s, loaded %s" % (esc(policy.get("path")), esc(fmt_time(policy.get("loaded"))))),
        ("Uptime", esc(fmt_duration(view["uptime"]))),
        ("Mode", '<span class="mode-%s">%s</span>' % (esc(view["mode"]), esc(mode_text(view)))),
        ("Half-open", "%s of max-incomplete %s:%s" % (
            esc(view["incomplete"]), esc(t["max_incomplete_low"]), esc(t["max_incomplete_high"]))),
        ("1-min rate", "%s of one-minute %s:%s" % (
            esc(view["one_minute_rate"]), esc(t["one_minute_low"]), esc(t["one_minute_high"]))),
        ("Sessions", esc(", ".join("%s %s" % (states.get(state, 0), state) for state in STATES))),
        ("Blocked hosts", esc(", ".join(view["blocked_hosts"]) or "none")),
        ("Admitted", esc(totals["admitted"])),
        ("Refused", esc(", ".join("%s %s" % (totals["refused"].get(r, 0), r) for r in REFUSAL_REASONS))),
        ("Messages", esc(totals["messages"])),
        ("Bytes", "%s from clients, %s from servers" % (
            esc(fmt_bytes(totals["bytes_from_client"])), esc(fmt_bytes(totals["bytes_from_server"])))),
    ]
    rows = "".join(
        "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>"
        % (esc(l["name"]), esc(l["listen"]), esc(l["backend"]), esc(l["rule"]), esc(l["protocol"]))
        for l in view["listeners"]
    )
    listeners = (
        '<table class="listeners"><thead><tr><th>Listener</th><th>Listen</th><th>Backend</th><th>Rule</th>'
        "<th>Protocol</th></tr></thead><tbody>%s</tbody></table>" % rows
        if rows else ""
    )
    return _dl(pairs) + listeners


def workers(view):
    """The workers and their state."""
    rows = []
    for w in view["workers"]:
        state = ("up, " + (w.get("mode") or "")) if w["up"] else "unreachable: " + (w.get("error") or "")
        rows.append(
            '<tr class="%s"><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>'
            % ("up" if w["up"] else "down", esc("-" if w["worker"] is None else w["worker"]), esc(w.get("pid")),
               esc(state), esc(w["sessions"]), esc(w["incomplete"]), esc(w["one_minute_rate"]),
               esc(fmt_duration(w.get("uptime"))))
        )
    return (
        '<table class="workers"><thead><tr><th>Worker</th><th>Pid</th><th>State</th><th>Sessions</th>'
        "<th>Half-open</th><th>1-min rate</th><th>Uptime</th></tr></thead><tbody>%s</tbody></table>"
        % "".join(rows)
    )


def _value(point, key):
    """A chart line's value in a rate point (``refused:<reason>`` reads the refusals by reason)."""
    if key.startswith("refused:"):
        return point["refused"].get(key[len("refused:"):], 0)
    return point.get(key, 0)


def chart(view, chart_id, title, unit, lines):
    """One SVG line chart of the rate series (the last 15 minutes, newest on the right)."""
    points = view["rates"]["points"]
    window = view["rates"]["window"]
    end = points[-1]["time"] if points else view["time"]
    # The x axis spans the data kept, from one minute up to the whole window.
    span = max(MIN_SPAN, min(window, end - points[0]["since"])) if points else window
    top = max([_value(p, key) for p in points for key, _ in lines] + [0])
    scale = top if top > 0 else 1
    polylines, legend = [], []
    for i, (key, label) in enumerate(lines):
        coords = []
        for p in points:
            # A step per point: its rate held from the sample before to its own.
            y = HEIGHT - _value(p, key) * (HEIGHT - 4) / scale
            for t in (p["since"], p["time"]):
                x = WIDTH - (end - t) * WIDTH / span
                if x >= 0:
                    coords.append("%.1f,%.1f" % (x, y))
        polylines.append('<polyline class="s%d" data-series="%s" points="%s"/>' % (i, esc(key), " ".join(coords)))
        now = _value(points[-1], key) if points else 0
        legend.append('<li class="s%d">%s <b>%s</b></li>' % (i, esc(label), esc(fmt_number(now) + " " + unit)))
    return (
        '<figure class="chart" id="chart-%s"><figcaption>%s <small>%s</small></figcaption>'
        '<svg viewBox="0 0 %d %d" preserveAspectRatio="none" role="img" aria-label="%s">%s</svg>'
        "<ul>%s</ul></figure>"
        % (esc(chart_id), esc(title), esc("max %s %s, last %s" % (fmt_number(top), unit, fmt_duration(span))),
           WIDTH, HEIGHT, esc(title),
           "".join(polylines), "".join(legend))
    )


def charts(view):
    """Every rate chart."""
    return "".join(chart(view, *spec) for spec in CHARTS)


def sizes(view):
    """The message-size histogram, as a bar table."""
    buckets = view["message_sizes"]
    top = max([b["count"] for b in buckets] + [1])
    rows = []
    for b in buckets:
        label = "> %s" % fmt_bytes(buckets[-2]["le"]) if b["le"] is None else "<= %s" % fmt_bytes(b["le"])
        width = int(round(100 * b["count"] / top))
        rows.append('<tr><td>%s</td><td class="bar"><meter min="0" max="100" value="%d"></meter></td><td>%s</td></tr>'
                    % (esc(label), width, esc(b["count"])))
    return '<table class="sizes"><tbody>%s</tbody></table>' % "".join(rows)


def cell(row, key):
    """One cell of the session table, as text."""
    value = row.get(key)
    if key in ("age", "idle"):
        return fmt_duration(value)
    if key in ("tls_client", "tls_server"):
        return "yes" if value else "no"
    if key == "worker" and value is None:
        return "-"
    return "-" if value is None else str(value)


def session_head():
    """The session table's heading row (its cells sort the table when JavaScript runs)."""
    return "<tr>%s</tr>" % "".join('<th data-key="%s">%s</th>' % (esc(k), esc(h)) for k, h in SESSION_COLUMNS)


def session_rows(view):
    """The session table's rows (oldest session first)."""
    rows = []
    for row in view["sessions"]:
        rows.append("<tr>%s</tr>" % "".join("<td>%s</td>" % esc(cell(row, k)) for k, _ in SESSION_COLUMNS))
    if not rows:
        rows.append('<tr class="empty"><td colspan="%d">No sessions</td></tr>' % len(SESSION_COLUMNS))
    return "".join(rows)


def alerts(view):
    """The last alerts, newest first."""
    rows = "".join(
        "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>"
        % (esc(fmt_time(a["time"])), esc("-" if a.get("worker") is None else a["worker"]), esc(a["tag"]),
           esc(a.get("client")), esc(a["text"]))
        for a in view["alerts"]
    )
    if not rows:
        return '<p class="none">No alerts</p>'
    return ('<table class="alerts"><thead><tr><th>Time</th><th>Worker</th><th>Tag</th><th>Client</th>'
            "<th>Text</th></tr></thead><tbody>%s</tbody></table>" % rows)


#: Sections drawn from counters other features add to the registry: (element id, sample name).
COUNTER_SECTIONS = (
    ("matches", "mailguard_matches_total"),
    ("milters", "mailguard_milter_verdicts_total"),
)


def counter_table(rows):
    """A counter's samples as a table, one column per label, or "not configured" without any."""
    if not rows:
        return '<p class="none">not configured</p>'
    keys = sorted({k for r in rows for k in r["labels"]})
    head = "".join("<th>%s</th>" % esc(k) for k in keys) + "<th>count</th>"
    body = "".join(
        "<tr>%s<td>%s</td></tr>" % ("".join("<td>%s</td>" % esc(r["labels"].get(k)) for k in keys),
                                    esc(fmt_number(r["value"])))
        for r in rows
    )
    return '<table class="counter"><thead><tr>%s</tr></thead><tbody>%s</tbody></table>' % (head, body)


def other_counters(view):
    """The registry's other counters, each under its name."""
    known = {name for _, name in COUNTER_SECTIONS}
    parts = ["<h3>%s</h3>%s" % (esc(name), counter_table(rows))
             for name, rows in sorted(view["counters"].items()) if name not in known]
    return "".join(parts) or '<p class="none">none</p>'


@functools.lru_cache(maxsize=1)
def _template():
    """The page's skeleton (``static/index.html``), read once."""
    return string.Template((resources.files("mailguard") / "static" / "index.html").read_text("utf-8"))


def sections(view):
    """The parts of the page a refresh redraws, by name (``static/status.js`` has the same ``sections``)."""
    parts = {
        "mode": mode_text(view),
        "glance": glance(view),
        "workers": workers(view),
        "charts": charts(view),
        "sizes": sizes(view),
        "session_rows": session_rows(view),
        "alerts": alerts(view),
        "counters": other_counters(view),
    }
    for element, name in COUNTER_SECTIONS:
        parts[element] = counter_table(view["counters"].get(name))
    return parts


def render_page(view):
    """The whole page for a ``/status.json`` view."""
    values = sections(view)
    values.update(
        mode_class=esc("mode-" + view["mode"]),
        mode_text=esc(values.pop("mode")),
        time=esc(fmt_time(view["time"])),
        session_count=esc(len(view["sessions"])),
        session_head=session_head(),
    )
    return _template().substitute(values)
