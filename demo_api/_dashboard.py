"""The dashboard page at ``/``: one HTML document, inline CSS and JS, no build step, no CDN.

It polls ``/api/stats`` every second and shows the cap, the connections open, in use and idle
overall and per pool, the checkouts waiting, and the manager's health.
"""

from __future__ import annotations

__all__ = ["DASHBOARD_HTML"]

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tenantpool demo</title>
<style>
  :root { --bg: #f6f7f9; --card: #fff; --ink: #1d2330; --muted: #6b7280; --line: #e3e6eb;
          --use: #2f6fdf; --idle: #9ec1f7; --ok: #1f9d55; --warn: #d97706; --bad: #dc2626; }
  * { box-sizing: border-box; }
  body { margin: 0; padding: 24px 32px; background: var(--bg); color: var(--ink);
         font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
  header { display: flex; align-items: baseline; gap: 16px; }
  h1 { font-size: 22px; margin: 0 0 16px; }
  .badge { padding: 2px 10px; border-radius: 999px; color: #fff; background: var(--muted);
           font-weight: 600; font-size: 13px; }
  .badge.ok { background: var(--ok); } .badge.degraded { background: var(--warn); }
  .badge.failing, .badge.unreachable { background: var(--bad); }
  .cards { display: grid; grid-template-columns: repeat(5, minmax(120px, 1fr)); gap: 12px; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
          padding: 12px 14px; }
  .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
           letter-spacing: .04em; }
  .value { font-size: 28px; font-weight: 650; font-variant-numeric: tabular-nums; }
  .bar { display: flex; height: 8px; border-radius: 4px; background: var(--line);
         overflow: hidden; margin-top: 6px; min-width: 80px; }
  .bar .use { background: var(--use); } .bar .idle { background: var(--idle); }
  #reasons { color: var(--warn); min-height: 1.4em; margin: 10px 0; }
  table { width: 100%; border-collapse: collapse; background: var(--card);
          border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
  th, td { text-align: left; padding: 8px 12px; border-bottom: 1px solid var(--line); }
  th { font-size: 12px; color: var(--muted); text-transform: uppercase;
       letter-spacing: .04em; }
  td.num { font-variant-numeric: tabular-nums; }
  td.name { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; }
  tr.empty td { color: var(--muted); }
  footer { color: var(--muted); font-size: 13px; margin-top: 12px; }
</style>
</head>
<body data-loaded="false">
<header>
  <h1>tenantpool demo</h1>
  <span id="status" class="badge">loading</span>
</header>
<section class="cards">
  <div class="card"><div class="label">cap</div><div class="value" id="cap">-</div>
    <div class="bar" title="open connections against the cap">
      <div class="use" id="cap-use"></div><div class="idle" id="cap-idle"></div></div></div>
  <div class="card"><div class="label">open</div><div class="value" id="total">-</div></div>
  <div class="card"><div class="label">in use</div><div class="value" id="in-use">-</div></div>
  <div class="card"><div class="label">idle</div><div class="value" id="idle">-</div></div>
  <div class="card"><div class="label">waiting</div><div class="value" id="waiting">-</div></div>
</section>
<p id="reasons"></p>
<table>
  <thead><tr><th>pool (no passwords)</th><th>in use</th><th>idle</th><th>waiting</th>
    <th>size / max</th><th></th></tr></thead>
  <tbody id="pools"><tr class="empty"><td colspan="6">no pools yet</td></tr></tbody>
</table>
<footer>checkouts <span id="checkouts">-</span> &middot; timeouts <span id="timeouts">-</span>
  &middot; steals <span id="steals">-</span> &middot; updated <span id="updated">never</span>
  &middot; <a href="/docs">API</a> &middot; <a href="/metrics">metrics</a></footer>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

function setText(id, value) { $(id).textContent = String(value); }

function bar(inUse, idle, max) {
  const wrap = document.createElement("div");
  wrap.className = "bar";
  for (const [cls, n] of [["use", inUse], ["idle", idle]]) {
    const part = document.createElement("div");
    part.className = cls;
    part.style.width = (max > 0 ? (100 * n) / max : 0) + "%";
    wrap.appendChild(part);
  }
  return wrap;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = String(text);
  if (cls) td.className = cls;
  return td;
}

function render(s) {
  const status = $("status");
  status.textContent = s.status;
  status.className = "badge " + s.status;
  setText("cap", s.cap === null ? "none" : s.cap);
  setText("total", s.total);
  setText("in-use", s.in_use);
  setText("idle", s.idle);
  setText("waiting", s.waiting);
  setText("checkouts", s.checkouts);
  setText("timeouts", s.timeouts);
  setText("steals", s.steals);
  const cap = s.cap === null ? Math.max(s.total, 1) : s.cap;
  $("cap-use").style.width = (100 * s.in_use) / cap + "%";
  $("cap-idle").style.width = (100 * s.idle) / cap + "%";
  setText("reasons", s.reasons.join("; "));
  const rows = s.pools.map((p) => {
    const tr = document.createElement("tr");
    tr.dataset.pool = p.name;
    tr.append(cell(p.name, "name"), cell(p.in_use, "num"), cell(p.idle, "num"),
              cell(p.waiting, "num"), cell(p.size + " / " + p.max_size, "num"));
    const td = document.createElement("td");
    td.appendChild(bar(p.in_use, p.idle, p.max_size));
    tr.appendChild(td);
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell("no pools yet: create a tenant and a note", "");
    td.colSpan = 6;
    tr.appendChild(td);
    rows.push(tr);
  }
  $("pools").replaceChildren(...rows);
  setText("updated", new Date().toLocaleTimeString());
  document.body.dataset.loaded = "true";
}

async function refresh() {
  try {
    const response = await fetch("/api/stats", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (err) {
    const status = $("status");
    status.textContent = "unreachable";
    status.className = "badge unreachable";
  }
}

refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
