/* mailguard status page: redraws the server-rendered page from status.json.
 * Hand-written, no library; it only reads (GET status.json) and never sends anything else.
 * The markup mirrors mailguard/statuspage.py, which renders the same page without JavaScript. */
(function () {
  "use strict";

  var REFRESH_MS = 1500;
  var WIDTH = 300, HEIGHT = 80, MIN_SPAN = 30;
  var CHARTS = [
    ["sessions", "Sessions per second", "/s", [
      ["admitted", "admitted"],
      ["refused:max-incomplete", "refused max-incomplete"],
      ["refused:one-minute", "refused one-minute"],
      ["refused:max-incomplete-host", "refused max-incomplete-host"],
      ["refused:block-time", "refused block-time"]]],
    ["messages", "Messages per second", "/s", [["messages", "messages"]]],
    ["bytes", "Bytes per second", "B/s", [["bytes_from_client", "from clients"], ["bytes_from_server", "from servers"]]]
  ];
  var COLUMNS = ["worker", "id", "initiator", "responder", "listener", "rule", "state_name", "age", "idle",
                 "client_bytes", "server_bytes", "tls_client", "tls_server", "commands", "phase"];
  var STATES = ["incomplete", "open", "closing"];
  var REFUSAL_REASONS = ["max-incomplete", "one-minute", "max-incomplete-host", "block-time"];
  var COUNTER_SECTIONS = [["matches", "mailguard_matches_total"], ["milters", "mailguard_milter_verdicts_total"]];

  var sortKey = null, sortDir = 1, lastView = null;

  function esc(value) {
    var s = value === null || value === undefined ? "-" : String(value);
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
            .replace(/"/g, "&quot;").replace(/'/g, "&#x27;");
  }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function fmtTime(t) {
    if (t === null || t === undefined) { return "-"; }
    return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }
  function fmtDuration(s) {
    if (s === null || s === undefined) { return "-"; }
    var whole = Math.floor(s), days = Math.floor(whole / 86400), rest = whole % 86400;
    var text = pad(Math.floor(rest / 3600)) + ":" + pad(Math.floor(rest / 60) % 60) + ":" + pad(rest % 60);
    return days ? days + "d " + text : text;
  }
  function fmtNumber(v) {
    if (v === null || v === undefined) { return "-"; }
    if (Number.isInteger(v)) { return String(v); }
    return v.toFixed(2).replace(/0+$/, "").replace(/\.$/, "");
  }
  function fmtBytes(v) {
    v = Number(v || 0);
    var units = ["B", "KiB", "MiB"];
    for (var i = 0; i < units.length; i++) {
      if (v < 1024) { return fmtNumber(Math.round(v * 100) / 100) + " " + units[i]; }
      v /= 1024;
    }
    return fmtNumber(Math.round(v * 100) / 100) + " GiB";
  }

  function modeText(v) {
    if (v.mode !== "aggressive") { return "normal"; }
    return "aggressive (ALERT_ON: " + ((v.aggressive_reasons && v.aggressive_reasons.length) ? v.aggressive_reasons.join(", ") : "?") + ")";
  }

  function glance(v) {
    var t = v.thresholds, tot = v.totals, p = v.policy;
    var pairs = [
      ["Version", esc(v.version)],
      ["Policy", esc(p.path) + ", loaded " + esc(fmtTime(p.loaded))],
      ["Uptime", esc(fmtDuration(v.uptime))],
      ["Mode", '<span class="mode-' + esc(v.mode) + '">' + esc(modeText(v)) + "</span>"],
      ["Half-open", esc(v.incomplete) + " of max-incomplete " + esc(t.max_incomplete_low) + ":" + esc(t.max_incomplete_high)],
      ["1-min rate", esc(v.one_minute_rate) + " of one-minute " + esc(t.one_minute_low) + ":" + esc(t.one_minute_high)],
      ["Sessions", esc(STATES.map(function (s) { return (v.sessions_by_state[s] || 0) + " " + s; }).join(", "))],
      ["Blocked hosts", esc(v.blocked_hosts.join(", ") || "none")],
      ["Admitted", esc(tot.admitted)],
      ["Refused", esc(REFUSAL_REASONS.map(function (r) { return (tot.refused[r] || 0) + " " + r; }).join(", "))],
      ["Messages", esc(tot.messages)],
      ["Bytes", esc(fmtBytes(tot.bytes_from_client)) + " from clients, " + esc(fmtBytes(tot.bytes_from_server)) + " from servers"]
    ];
    var html = "<dl>" + pairs.map(function (kv) { return "<dt>" + esc(kv[0]) + "</dt><dd>" + kv[1] + "</dd>"; }).join("") + "</dl>";
    var rows = v.listeners.map(function (l) {
      return "<tr><td>" + [l.name, l.listen, l.backend, l.rule, l.protocol].map(esc).join("</td><td>") + "</td></tr>";
    }).join("");
    if (rows) {
      html += '<table class="listeners"><thead><tr><th>Listener</th><th>Listen</th><th>Backend</th><th>Rule</th>' +
              "<th>Protocol</th></tr></thead><tbody>" + rows + "</tbody></table>";
    }
    return html;
  }

  function workers(v) {
    var rows = v.workers.map(function (w) {
      var state = w.up ? "up, " + (w.mode || "") : "unreachable: " + (w.error || "");
      return '<tr class="' + (w.up ? "up" : "down") + '"><td>' +
        [w.worker === null ? "-" : w.worker, w.pid, state, w.sessions, w.incomplete, w.one_minute_rate,
         fmtDuration(w.uptime)].map(esc).join("</td><td>") + "</td></tr>";
    }).join("");
    return '<table class="workers"><thead><tr><th>Worker</th><th>Pid</th><th>State</th><th>Sessions</th>' +
           "<th>Half-open</th><th>1-min rate</th><th>Uptime</th></tr></thead><tbody>" + rows + "</tbody></table>";
  }

  function value(point, key) {
    if (key.indexOf("refused:") === 0) { return point.refused[key.slice(8)] || 0; }
    return point[key] || 0;
  }

  function chart(v, spec) {
    var id = spec[0], title = spec[1], unit = spec[2], lines = spec[3];
    var points = v.rates.points, win = v.rates.window;
    var end = points.length ? points[points.length - 1].time : v.time;
    var span = points.length ? Math.max(MIN_SPAN, Math.min(win, end - points[0].since)) : win;
    var top = 0;
    points.forEach(function (p) { lines.forEach(function (l) { top = Math.max(top, value(p, l[0])); }); });
    var scale = top > 0 ? top : 1;
    var polys = "", legend = "";
    lines.forEach(function (l, i) {
      var coords = [];
      points.forEach(function (p) {
        /* A step per point: its rate held from the sample before to its own. */
        var y = HEIGHT - value(p, l[0]) * (HEIGHT - 4) / scale;
        [p.since, p.time].forEach(function (t) {
          var x = WIDTH - (end - t) * WIDTH / span;
          if (x >= 0) { coords.push(x.toFixed(1) + "," + y.toFixed(1)); }
        });
      });
      polys += '<polyline class="s' + i + '" data-series="' + esc(l[0]) + '" points="' + coords.join(" ") + '"/>';
      var now = points.length ? value(points[points.length - 1], l[0]) : 0;
      legend += '<li class="s' + i + '">' + esc(l[1]) + " <b>" + esc(fmtNumber(now) + " " + unit) + "</b></li>";
    });
    return '<figure class="chart" id="chart-' + esc(id) + '"><figcaption>' + esc(title) + " <small>" +
      esc("max " + fmtNumber(top) + " " + unit + ", last " + fmtDuration(span)) + "</small></figcaption>" +
      '<svg viewBox="0 0 ' + WIDTH + " " + HEIGHT + '" preserveAspectRatio="none" role="img" aria-label="' +
      esc(title) + '">' + polys + "</svg><ul>" + legend + "</ul></figure>";
  }

  function sizes(v) {
    var b = v.message_sizes, top = 1;
    b.forEach(function (x) { top = Math.max(top, x.count); });
    return '<table class="sizes"><tbody>' + b.map(function (x) {
      var label = x.le === null ? "> " + fmtBytes(b[b.length - 2].le) : "<= " + fmtBytes(x.le);
      return "<tr><td>" + esc(label) + '</td><td class="bar"><meter min="0" max="100" value="' +
        Math.round(100 * x.count / top) + '"></meter></td><td>' + esc(x.count) + "</td></tr>";
    }).join("") + "</tbody></table>";
  }

  function cell(row, key) {
    var v = row[key];
    if (key === "age" || key === "idle") { return fmtDuration(v); }
    if (key === "tls_client" || key === "tls_server") { return v ? "yes" : "no"; }
    return v === null || v === undefined ? "-" : String(v);
  }

  function sessionRows(v, filter, sortKey) {
    var rows = v.sessions.slice();
    if (sortKey) {
      rows.sort(function (a, b) {
        var x = a[sortKey], y = b[sortKey];
        if (x === y) { return 0; }
        if (x === null || x === undefined) { return -sortDir; }
        if (y === null || y === undefined) { return sortDir; }
        return (x < y ? -1 : 1) * sortDir;
      });
    }
    var html = "";
    rows.forEach(function (row) {
      var cells = COLUMNS.map(function (k) { return cell(row, k); });
      if (filter && cells.join(" ").toLowerCase().indexOf(filter) < 0) { return; }
      html += "<tr><td>" + cells.map(esc).join("</td><td>") + "</td></tr>";
    });
    if (!html) {
      html = '<tr class="empty"><td colspan="' + COLUMNS.length + '">' +
             (v.sessions.length ? "No session matches the filter" : "No sessions") + "</td></tr>";
    }
    return html;
  }

  function alerts(v) {
    if (!v.alerts.length) { return '<p class="none">No alerts</p>'; }
    return '<table class="alerts"><thead><tr><th>Time</th><th>Worker</th><th>Tag</th><th>Client</th>' +
      "<th>Text</th></tr></thead><tbody>" + v.alerts.map(function (a) {
        return "<tr><td>" + [fmtTime(a.time), a.worker === null || a.worker === undefined ? "-" : a.worker,
          a.tag, a.client, a.text].map(esc).join("</td><td>") + "</td></tr>";
      }).join("") + "</tbody></table>";
  }

  function counterTable(rows) {
    if (!rows || !rows.length) { return '<p class="none">not configured</p>'; }
    var keys = {};
    rows.forEach(function (r) { Object.keys(r.labels).forEach(function (k) { keys[k] = true; }); });
    keys = Object.keys(keys).sort();
    return '<table class="counter"><thead><tr>' + keys.map(function (k) { return "<th>" + esc(k) + "</th>"; }).join("") +
      "<th>count</th></tr></thead><tbody>" + rows.map(function (r) {
        return "<tr>" + keys.map(function (k) { return "<td>" + esc(r.labels[k]) + "</td>"; }).join("") +
          "<td>" + esc(fmtNumber(r.value)) + "</td></tr>";
      }).join("") + "</tbody></table>";
  }

  function otherCounters(v) {
    var known = {};
    COUNTER_SECTIONS.forEach(function (s) { known[s[1]] = true; });
    var html = Object.keys(v.counters).sort().filter(function (n) { return !known[n]; }).map(function (n) {
      return "<h3>" + esc(n) + "</h3>" + counterTable(v.counters[n]);
    }).join("");
    return html || '<p class="none">none</p>';
  }

  function body(id, html) { document.querySelector("#" + id + " .body").innerHTML = html; }

  function drawSessions() {
    if (lastView) {
      var filter = document.getElementById("filter").value.trim().toLowerCase();
      document.querySelector("#session-table tbody").innerHTML = sessionRows(lastView, filter, sortKey);
    }
  }

  /* The parts of the page a refresh redraws, by name (mailguard/statuspage.py has the same sections). */
  function sections(v) {
    var parts = {
      mode: modeText(v),
      glance: glance(v),
      workers: workers(v),
      charts: CHARTS.map(function (spec) { return chart(v, spec); }).join(""),
      sizes: sizes(v),
      session_rows: sessionRows(v, "", null),
      alerts: alerts(v),
      counters: otherCounters(v)
    };
    COUNTER_SECTIONS.forEach(function (s) { parts[s[0]] = counterTable(v.counters[s[1]]); });
    return parts;
  }

  function draw(v) {
    lastView = v;
    var parts = sections(v);
    var mode = document.getElementById("mode");
    mode.className = "mode-" + v.mode;
    mode.textContent = parts.mode;
    var updated = document.getElementById("updated");
    updated.className = "";
    updated.textContent = "live, " + fmtTime(v.time);
    ["glance", "workers", "charts", "sizes", "alerts", "counters"].forEach(function (id) { body(id, parts[id]); });
    COUNTER_SECTIONS.forEach(function (s) { body(s[0], parts[s[0]]); });
    document.getElementById("session-count").textContent = v.sessions.length;
    drawSessions();
  }

  function refresh() {
    fetch("status.json", {cache: "no-store", credentials: "same-origin"})
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(draw)
      .catch(function (e) {
        var updated = document.getElementById("updated");
        updated.className = "stale";
        updated.textContent = "no answer (" + e.message + "), showing " + (lastView ? fmtTime(lastView.time) : "the snapshot");
      })
      .then(function () { setTimeout(refresh, REFRESH_MS); });
  }

  function setup() {
    var filter = document.getElementById("filter");
    filter.hidden = false;
    filter.addEventListener("input", drawSessions);
    document.querySelectorAll("#session-table th[data-key]").forEach(function (th) {
      th.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        sortDir = sortKey === key ? -sortDir : 1;
        sortKey = key;
        document.querySelectorAll("#session-table th").forEach(function (other) { other.className = ""; });
        th.className = sortDir > 0 ? "asc" : "desc";
        drawSessions();
      });
    });
    refresh();
  }

  /* For tests and other tools: the same rendering as the server's, from any status.json view. */
  window.mailguardStatus = {sections: sections};

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", setup);
  } else {
    setup();
  }
})();
